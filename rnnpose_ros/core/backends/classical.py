"""Classical correspondence backend: render-and-compare with dense DIS optical flow (no learned weights).

Per render iteration, for all B instances of a frame:

1. crop window around the projected model at the current pose (square, ``margin`` on each side),
   resampled to ``crop_size``² pixels — the observed image is cropped with the same affine map whose
   intrinsics K_crop the renderer uses, so the crop only changes intrinsics;
2. render RGB + metric depth at the current pose with K_crop (one batched renderer call), and composite
   the rendering over the observed crop: background pixels are then identical in both images, so the
   flow sees the object's displacement only and is not pulled by background texture;
3. OpenCV DIS optical flow from the composite to the observed crop (dense, full crop resolution) and
   back; the forward–backward error e(p) = ‖F(p) + B(p + F(p))‖ gives the weight
   w = 1 / (1 + (e/σ)²) (Cauchy), zero beyond ``fb_max_px``, on the rendered object pixels eroded by
   ``edge_erosion`` pixels (silhouette pixels mix object and background motion);
4. correspondences: rendered pixel p with depth z(p) lifts to X0 = z·K_crop⁻¹(p, 1) and should
   project to x* = p + F(p); the refiner's LM (Huber IRLS on the reprojection residual) solves for
   the relative pose, ``inner_steps`` times on the same flow, and the next iteration re-renders.

Early iterations use a wider, coarser crop (large initial errors need context and small images are
cheap), later ones a tight full-resolution crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch import Tensor

from rnnpose_ros.core.backends.base import (
    BackendConfig,
    BackendError,
    CorrespondenceBackend,
    Correspondences,
    FrameState,
    LMConfig,
    RenderState,
)
from rnnpose_ros.core.objects import ObjectModel

# Vertices projected to place the crop window (a deterministic subset of big meshes is enough).
MAX_WINDOW_VERTICES = 2000
# Smallest crop window side in image pixels (guards against a degenerate projection).
MIN_WINDOW_PX = 8.0


@dataclass
class CropStage:
    """Crop used from render iteration ``start`` on.

    Attributes:
        start: first render iteration (from 0) of this stage.
        crop_size: side of the square crop, pixels.
        margin: window side = (1 + 2·margin) × larger side of the projected model's bounding box.
    """

    start: int
    crop_size: int
    margin: float


def _default_stages() -> list[CropStage]:
    return [CropStage(start=0, crop_size=160, margin=0.5), CropStage(start=4, crop_size=224, margin=0.25)]


def _default_lm() -> LMConfig:
    # Huber IRLS at 2 crop pixels: outliers of the flow (occlusion, texture-less areas) are
    # down-weighted; float64 poses so that converged steps of < 0.1 mm are not lost to rounding.
    return LMConfig(num_iters=1, robust="huber", robust_scale=2.0, min_depth=0.02, pose_dtype=torch.float64)


@dataclass
class ClassicalConfig(BackendConfig):
    """Schedule and parameters of the classical backend.

    Attributes (besides :class:`BackendConfig`):
        stages: crop schedule over the render iterations (sorted by ``start``).
        dis_finest_scale: finest DIS pyramid level (0 = full crop resolution).
        dis_patch_size, dis_patch_stride: DIS patch size / stride, pixels.
        dis_gradient_iterations: DIS inverse-search iterations per patch.
        dis_variational_iterations: DIS variational refinement iterations per level.
        fb_scale_px: Cauchy scale of the forward–backward error, crop pixels.
        fb_max_px: forward–backward error above which a pixel gets weight 0, crop pixels.
        edge_erosion: rendered-mask erosion (pixels) before correspondences are used.
        composite: render over the observed crop (True) or over black.
    """

    outer_iterations: int = 12
    inner_steps: int = 2
    lm: LMConfig = field(default_factory=_default_lm)
    published_conventions: bool = False
    stages: list[CropStage] = field(default_factory=_default_stages)
    dis_finest_scale: int = 0
    dis_patch_size: int = 8
    dis_patch_stride: int = 4
    dis_gradient_iterations: int = 16
    dis_variational_iterations: int = 5
    fb_scale_px: float | None = 1.0
    fb_max_px: float = 3.0
    edge_erosion: int = 1
    composite: bool = True

    def stage(self, iteration: int) -> CropStage:
        """The crop stage in force at render iteration ``iteration``."""
        current = self.stages[0]
        for stage in self.stages:
            if stage.start <= iteration:
                current = stage
        return current


@dataclass
class ClassicalFrame(FrameState):
    """Per-frame state: the observed image (cropped per render iteration)."""


@dataclass
class CropBatch:
    """Rendered and observed crops of one render iteration (numpy, host memory).

    Attributes:
        poses: (B, 4, 4) float64 render poses; K: (B, 3, 3) float64 crop intrinsics.
        observed: (B, h, w, 3) uint8 observed crops; rendered: (B, h, w, 3) uint8 composites.
        depth: (B, h, w) float32 rendered depth, metres, 0 = background; mask: (B, h, w) bool.
    """

    poses: np.ndarray
    K: np.ndarray
    observed: np.ndarray
    rendered: np.ndarray
    depth: np.ndarray
    mask: np.ndarray


@dataclass
class ClassicalView(RenderState):
    """Per-render state: flow targets and weights, fixed during the inner steps.

    Attributes (besides :class:`RenderState`):
        target: (B, h, w, 2) float32 flow targets p + F(p), crop pixels.
        weight: (B, h, w) float32 forward–backward weights in [0, 1].
        crops: the host-side crops (for debugging and visualisation).
    """

    target: Tensor
    weight: Tensor
    crops: CropBatch


class ClassicalBackend(CorrespondenceBackend):
    """DIS optical flow between the rendering and the observed crop, forward–backward weights."""

    name = "classical"

    def __init__(self, device: torch.device, config: ClassicalConfig | None = None, renderer=None) -> None:
        if config is None:
            config = ClassicalConfig()
        if not isinstance(config, ClassicalConfig):
            raise BackendError(f"the classical backend needs a ClassicalConfig, got {type(config).__name__}")
        if not config.stages:
            raise BackendError("ClassicalConfig.stages must name at least one crop stage")
        self.config = config
        self.device = torch.device(device)
        self._renderer = renderer
        self._window_vertices: dict[int, np.ndarray] = {}  # id(model) -> (M, 3) float64 subset
        self._flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self._flow.setFinestScale(config.dis_finest_scale)
        self._flow.setPatchSize(config.dis_patch_size)
        self._flow.setPatchStride(config.dis_patch_stride)
        self._flow.setGradientDescentIterations(config.dis_gradient_iterations)
        self._flow.setVariationalRefinementIterations(config.dis_variational_iterations)
        self._flow.setUseMeanNormalization(True)  # robust to the rendering's different brightness
        self._flow.setUseSpatialPropagation(True)

    @property
    def renderer(self):
        """The renderer (created on first use: it opens an OpenGL context)."""
        if self._renderer is None:
            from rnnpose_ros.core.render import Renderer

            self._renderer = Renderer()
        return self._renderer

    def prepare_objects(self, models: Sequence[ObjectModel]) -> None:
        for model in models:
            if id(model) not in self._window_vertices:
                vertices = np.asarray(model.vertices, dtype=np.float64)
                if len(vertices) > MAX_WINDOW_VERTICES:
                    step = int(np.ceil(len(vertices) / MAX_WINDOW_VERTICES))
                    vertices = vertices[::step]
                self._window_vertices[id(model)] = vertices

    def prepare_frame(
        self, image: np.ndarray, K: np.ndarray, models: Sequence[ObjectModel], poses: Tensor
    ) -> ClassicalFrame:
        return ClassicalFrame(image=image, K=np.asarray(K, dtype=np.float64), models=list(models))

    def prepare_render(self, frame: FrameState, poses: Tensor, iteration: int) -> ClassicalView:
        stage = self.config.stage(iteration)
        poses_np = poses.detach().cpu().numpy().astype(np.float64)
        crops = self.render_crops(frame, poses_np, stage)
        target, weight = self.flow_targets(crops)
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        scale = crops.K[:, 0, 0] / frame.K[0, 0]
        return ClassicalView(
            K=as_tensor(crops.K.astype(np.float32)),
            depth=as_tensor(crops.depth.astype(np.float32)),
            crop_scale=as_tensor(scale.astype(np.float32)),
            target=as_tensor(target),
            weight=as_tensor(weight),
            crops=crops,
        )

    def correspondences(
        self, frame: FrameState, view: RenderState, relative_pose: Tensor, step: int
    ) -> Correspondences:
        # The flow does not depend on the relative pose: the inner steps are IRLS iterations of the
        # solver's robust kernel on the same targets.
        assert isinstance(view, ClassicalView)
        return Correspondences(target=view.target, weight=view.weight)

    # --- stages ----------------------------------------------------------------------------------------

    def crop_windows(self, frame: FrameState, poses: np.ndarray, stage: CropStage) -> np.ndarray:
        """Square windows around the projected models: (B, 3) float64 (x0, y0, side) in image pixels."""
        windows = np.empty((len(poses), 3))
        K = frame.K
        for b, (model, pose) in enumerate(zip(frame.models, poses, strict=True)):
            vertices = self._window_vertices[id(model)]
            cam = vertices @ pose[:3, :3].T + pose[:3, 3]
            z = np.maximum(cam[:, 2], 1e-3)  # a pose that drifted behind the camera still gets a window
            pixels = cam[:, :2] / z[:, None] * np.diag(K)[:2] + K[:2, 2]
            pixels = np.clip(pixels, -1e5, 1e5)
            lo, hi = pixels.min(0), pixels.max(0)
            side = max(float((hi - lo).max()) * (1.0 + 2.0 * stage.margin), MIN_WINDOW_PX)
            centre = (lo + hi) / 2.0
            windows[b] = (centre[0] - side / 2.0, centre[1] - side / 2.0, side)
        return windows

    def render_crops(self, frame: FrameState, poses: np.ndarray, stage: CropStage) -> CropBatch:
        """Crop the observed image, render at ``poses`` (B, 4, 4) and composite, for one stage."""
        size = stage.crop_size
        windows = self.crop_windows(frame, poses, stage)
        batch = len(poses)
        K_crop = np.empty((batch, 3, 3))
        observed = np.empty((batch, size, size, 3), dtype=np.uint8)
        for b, (x0, y0, side) in enumerate(windows):
            # Crop pixel i covers image [x0 + i/s, x0 + (i+1)/s]: x_crop = s·(x − x0) − 0.5 (centres at
            # integer coordinates on both sides), so fx' = s·fx and cx' = s·(cx − x0) − 0.5.
            s = size / side
            affine = np.array([[s, 0.0, -s * x0 - 0.5], [0.0, s, -s * y0 - 0.5]])
            K_crop[b] = np.vstack((affine @ frame.K, (0.0, 0.0, 1.0)))
            observed[b] = cv2.warpAffine(
                frame.image, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
            )
        render = self.renderer.render(frame.models, poses, K_crop, (size, size))
        rendered_rgb = np.round(np.clip(render.rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
        mask = render.mask & (render.depth > 0)
        background = observed if self.config.composite else np.zeros_like(observed)
        rendered = np.where(mask[..., None], rendered_rgb, background)
        return CropBatch(
            poses=poses, K=K_crop, observed=observed, rendered=rendered, depth=render.depth, mask=mask
        )

    def flow_targets(self, crops: CropBatch) -> tuple[np.ndarray, np.ndarray]:
        """Targets (B, h, w, 2) float32 and weights (B, h, w) float32 from DIS flow both ways."""
        config = self.config
        batch, height, width = crops.mask.shape
        grid = np.stack(np.meshgrid(np.arange(width), np.arange(height)), -1).astype(np.float32)
        targets = np.zeros((batch, height, width, 2), dtype=np.float32)
        weights = np.zeros((batch, height, width), dtype=np.float32)
        kernel = np.ones((2 * config.edge_erosion + 1,) * 2, np.uint8) if config.edge_erosion > 0 else None
        for b in range(batch):
            mask = crops.mask[b].astype(np.uint8)
            if kernel is not None:
                mask = cv2.erode(mask, kernel)
            if not mask.any():
                continue
            rendered = cv2.cvtColor(crops.rendered[b], cv2.COLOR_RGB2GRAY)
            observed = cv2.cvtColor(crops.observed[b], cv2.COLOR_RGB2GRAY)
            forward = self._flow.calc(rendered, observed, None)
            backward = self._flow.calc(observed, rendered, None)
            target = grid + forward
            back_at_target = cv2.remap(
                backward, target[..., 0], target[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
            )
            fb_error = np.linalg.norm(forward + back_at_target, axis=-1)
            inside = (
                (target[..., 0] >= 0)
                & (target[..., 0] <= width - 1)
                & (target[..., 1] >= 0)
                & (target[..., 1] <= height - 1)
            )
            if config.fb_scale_px is None:
                weight = np.ones_like(fb_error)
            else:
                weight = 1.0 / (1.0 + (fb_error / config.fb_scale_px) ** 2)
            weight = np.where((fb_error <= config.fb_max_px) & inside & (mask > 0), weight, 0.0)
            targets[b] = target
            weights[b] = weight
        return targets, weights
