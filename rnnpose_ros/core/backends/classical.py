"""Classical correspondence backend: render-and-compare with dense DIS optical flow (no learned weights).

Per render iteration, for all B instances of a frame:

1. crop window around the projected model at the current pose (square, ``margin`` on each side of
   the projected bounding box), resampled to ``crop_size``² pixels — the observed image is cropped
   with the same affine map whose intrinsics K_crop the renderer uses, so a crop only changes
   intrinsics;
2. render the object (albedo, metric depth, silhouette) at the current pose with K_crop, one batched
   renderer call;
3. build two single-channel images and compute OpenCV DIS optical flow from the rendering to the
   observed crop and back (at half the crop resolution; the backward flow only weighs the forward
   one, and the relit flow of the last render iteration is computed at full resolution). What
   the images show depends on the stage's ``flow_input``:

   - ``"region"`` (default): the rendered silhouette against the observed crop's object probability,
     P(object | colour) from chromaticity histograms of the observed crop inside the eroded
     silhouette and outside the dilated one (region-based alignment, as in PWP3D/RBOT). It ignores
     lighting, shading and camera colour response, which make the photograph and a rendering differ
     far more than the pose does; texture-poor objects such as the duck are aligned by their
     silhouette;
   - ``"relit"``: the rendered albedo re-shaded to the observed object (per-channel gain + order-2
     spherical-harmonic lighting on the rendered surface normals, fitted by IRLS), composited over
     the observed crop, in grey levels. The rim matters: started at the true pose, a shading model
     without the order-2 terms (one directional light on depth-derived normals) pulled the matched
     silhouette inwards by ≈ 1 % of the object's size (+15–40 mm of depth on a 10 cm object at 0.8 m);
     this one by ≈ 0.2 %;
   - ``"gray"``: the rendering composited over the observed crop, in grey levels;
   - ``"region+relit"``: both flows; the inner steps alternate between them (region, relit, region…),
     so the LM sees the silhouette and the object's interior texture (beak, eyes, shading);

4. weights: the forward–backward error e(p) = ‖F(p) + B(p + F(p))‖ gives w = 1 / (1 + (e/σ)²)
   (Cauchy), zero beyond ``fb_max_px``, on the rendered pixels eroded by ``edge_erosion``;
5. correspondences: rendered pixel p with depth z(p) lifts to X0 = z·K_crop⁻¹(p, 1) and should
   project to x* = p + F(p); the refiner's LM (Huber IRLS on the reprojection residual) solves for
   the relative pose, ``inner_steps`` times on the same flow(s), and the next iteration re-renders.

The default schedule (12 render iterations × 3 LM steps): 3 iterations in a wide 160² crop using only
the robust median shift of the flow (``motion="translation"``: a large initial error makes the
dense flow unreliable in its details, and its divergence would otherwise throw the weakly
constrained depth far off), 2 iterations of full 6-DoF region flow in that crop, then 7 in a tight
224² crop with region and relit flows, the last one with the relit flow at full resolution.
Results scoring below 0.9 (0.85 with depth) are refined again from four rotation hypotheses
(``restart_below_score``, see :mod:`rnnpose_ros.core.refiner`).

Why not plain grey-level flow: on photographs whose lighting differs from
the rendering (the synthetic scenes vary light direction, strengths and colour gain, then blur and
add noise), DIS on grey levels is biased by the contrast difference (mean-normalised patch matching
pulls low-contrast edges), and the LM turns that bias into large depth errors; started at the ground
truth it drifted by 40–70 mm on average, the region flow by ~10 mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch import Tensor

from rnnpose_ros.core.backends import BackendError
from rnnpose_ros.core.backends.base import (
    CorrespondenceBackend,
    FrameState,
    ObjectCache,
    RenderState,
)
from rnnpose_ros.core.loop import Convergence, Correspondences, RefinerConfig
from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.observation import Observation
from rnnpose_ros.core.pinhole import project_to_pixels
from rnnpose_ros.core.render import Lighting
from rnnpose_ros.core.solver import LMConfig

# Vertices projected to place the crop window (a deterministic subset of big meshes is enough).
MAX_WINDOW_VERTICES = 2000
# Smallest crop window side in image pixels (guards against a degenerate projection).
MIN_WINDOW_PX = 8.0
FLOW_INPUTS = ("region", "relit", "gray", "region+relit")
MOTIONS = ("full", "translation")


@dataclass
class CropStage:
    """Crop and flow used from render iteration ``start`` on.

    Attributes:
        start: first render iteration (from 0) of this stage.
        crop_size: side of the square crop, pixels.
        margin: window side = (1 + 2·margin) × larger side of the projected model's bounding box.
        flow_input: what the flow compares (see the module docstring): "region", "relit" or "gray".
        motion: "full" (dense flow) or "translation" (its robust median shift only).
        relit_finest_scale: finest DIS pyramid level of this stage's relit flow (0 = full crop
            resolution, 1 = half, a quarter of the time): the object's interior texture at full
            resolution is worth its time in the last render iterations only.
    """

    start: int
    crop_size: int
    margin: float
    flow_input: str = "region"
    motion: str = "full"
    relit_finest_scale: int = 1


def _default_stages() -> list[CropStage]:
    return [
        CropStage(start=0, crop_size=160, margin=0.8, motion="translation"),
        CropStage(start=3, crop_size=160, margin=0.8),
        CropStage(start=5, crop_size=224, margin=0.4, flow_input="region+relit"),
        CropStage(start=11, crop_size=224, margin=0.4, flow_input="region+relit", relit_finest_scale=0),
    ]


# Depth and silhouette only: the renderer skips the texture lookups of a black rendering.
_NO_LIGHT = Lighting(ambient=0.0, diffuse=0.0, specular=0.0)


def _flat_lighting() -> Lighting:
    # Albedo only: the photograph's lighting is unknown; "region" ignores colours, "relit" re-shades.
    return Lighting(ambient=1.0, diffuse=0.0, specular=0.0)


@dataclass
class ClassicalConfig:
    """Options of the classical backend (its loop policy is :meth:`ClassicalBackend.default_loop`).

    Attributes:
        stages: crop/flow schedule over the render iterations (sorted by ``start``).
        dis_finest_scale: finest DIS pyramid level of the region and grey flows (0 = full crop
            resolution, 1 = half: a quarter of the flow's time; the region images are blurred
            silhouettes). The relit flow's level is the stage's (``CropStage.relit_finest_scale``).
        backward_finest_scale: the backward flows, which only weigh the forward ones (their
            forward–backward consistency), stop at this level or the forward flow's, whichever is
            coarser.
        dis_patch_size, dis_patch_stride: DIS patch size / stride, pixels.
        dis_gradient_iterations: DIS inverse-search iterations per patch.
        dis_variational_iterations: DIS variational refinement iterations per level (relit and grey
            flows).
        region_variational_iterations: the same for the region flow, whose blurred silhouettes the
            variational smoothing does not improve (same recall, half the region flow's time).
        fb_scale_px: Cauchy scale of the forward–backward error, crop pixels (None: no weighting).
        fb_max_px: forward–backward error above which a pixel gets weight 0, crop pixels.
        edge_erosion: rendered-mask erosion (pixels) before correspondences are used.
        region_bins: chromaticity histogram bins per axis ("region").
        region_inner_band, region_outer_band: the object colour model uses the silhouette eroded by
            the inner band, the background model what lies beyond the outer band (crop-side fractions):
            thin parts (the duck's beak) stay in the object model, and a misplaced silhouette does
            not teach it background colours.
        lighting: renderer lighting (albedo only by default).
    """

    stages: list[CropStage] = field(default_factory=_default_stages)
    dis_finest_scale: int = 1
    backward_finest_scale: int = 1
    dis_patch_size: int = 8
    dis_patch_stride: int = 4
    dis_gradient_iterations: int = 16
    dis_variational_iterations: int = 5
    region_variational_iterations: int = 0
    fb_scale_px: float | None = 1.0
    fb_max_px: float = 3.0
    edge_erosion: int = 1
    region_bins: int = 16
    region_inner_band: float = 1 / 48
    region_outer_band: float = 1 / 24
    lighting: Lighting = field(default_factory=_flat_lighting)

    def stage(self, iteration: int) -> CropStage:
        """The stage in force at render iteration ``iteration``."""
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
        observed: (B, h, w, 3) uint8 observed crops; rendered: (B, h, w, 3) uint8 rendering (albedo)
            composited over the observed crop (the object black where the stage's flow compares no
            colours: "region" looks at the silhouette only).
        depth: (B, h, w) float32 rendered depth, metres, 0 = background; mask: (B, h, w) bool.
        normals: (B, h, w, 3) float32 camera-frame unit surface normals, 0 on background; None where
            the stage's flow does not re-shade (only "relit" uses them).
        observed_depth: (B, h, w) float32 observed depth in the crop (nearest), metres, 0 = none;
            None for an RGB-only frame.
    """

    poses: np.ndarray
    K: np.ndarray
    observed: np.ndarray
    rendered: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    normals: np.ndarray | None
    observed_depth: np.ndarray | None = None


@dataclass
class ClassicalView(RenderState):
    """Per-render state: flow targets and weights, fixed during the inner steps.

    Attributes (besides :class:`RenderState`):
        target: (B, h, w, 2) float32 flow targets p + F(p), crop pixels.
        weight: (B, h, w) float32 forward–backward weights in [0, 1].
        crops: the host-side crops (for debugging and visualisation).
        alternates: further (target, weight) pairs ("region+relit"); inner step k uses pair
            k mod (1 + len(alternates)), the first being (target, weight).
    """

    target: Tensor
    weight: Tensor
    crops: CropBatch
    alternates: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class ClassicalBackend(CorrespondenceBackend[ClassicalFrame, ClassicalView]):
    """DIS optical flow between the rendering and the observed crop, forward–backward weights."""

    name = "classical"
    config_class = ClassicalConfig

    def __init__(
        self, device: torch.device | str, config: ClassicalConfig | None = None, renderer=None
    ) -> None:
        super().__init__(device, config, renderer)
        config = self.config
        if not config.stages:
            raise BackendError("ClassicalConfig.stages must name at least one stage")
        for stage in config.stages:
            if stage.flow_input not in FLOW_INPUTS or stage.motion not in MOTIONS:
                raise BackendError(
                    f"stage {stage}: flow_input must be one of {FLOW_INPUTS} and motion one of {MOTIONS}"
                )
        self._window_vertices = ObjectCache(_window_vertices)
        # DIS "medium" preset made explicit (finest scale and variational iterations set per flow);
        # mean normalisation of the patches absorbs brightness offsets between the two images.
        self._flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self._flow.setPatchSize(config.dis_patch_size)
        self._flow.setPatchStride(config.dis_patch_stride)
        self._flow.setGradientDescentIterations(config.dis_gradient_iterations)
        self._flow.setUseMeanNormalization(True)
        self._flow.setUseSpatialPropagation(True)

    @staticmethod
    def default_loop() -> RefinerConfig:
        """12 render iterations × 3 LM steps (four stages, see the module docstring), Huber IRLS at 1
        crop pixel (flow outliers from occlusion or clutter of the same colour count less), float64
        poses (converged steps below 0.1 mm are not lost to rounding), correspondences from 2 cm depth
        on (the published 10 cm would ignore close objects), the solve on the rendered pixels of every
        second row and column only (most of a crop is background, the flow already synchronised with
        the host, and the flows are computed at half resolution), and restarts
        below score 0.9 (0.85 with depth): out-of-plane rotation errors above ≈ 25° are beyond
        the flow's basin, and restarting weak results from ±25° hypotheses recovers most of them
        (README, evaluation)."""
        return RefinerConfig(
            outer_iterations=12,
            inner_steps=3,
            lm=LMConfig(
                num_iters=1,
                robust="huber",
                robust_scale=1.0,
                min_depth=0.02,
                pose_dtype=torch.float64,
                sparse=True,
                pixel_stride=2,
            ),
            restart_below_score=0.9,
            restart_below_score_with_depth=0.85,
            # Not before two iterations of the tight-crop stage (the first five are coarse stages).
            convergence=Convergence(min_iterations=7),
        )

    def prepare_objects(self, models: Sequence[ObjectModel]) -> None:
        self._window_vertices.prepare(models)

    def prepare_frame(
        self, observation: Observation, models: Sequence[ObjectModel], poses: Tensor
    ) -> ClassicalFrame:
        return ClassicalFrame(observation=observation, models=list(models))

    def prepare_render(self, frame: ClassicalFrame, poses: Tensor, iteration: int) -> ClassicalView:
        stage = self.config.stage(iteration)
        # Host synchronisation: OpenCV flow and the OpenGL rasteriser work on host arrays.
        poses_np = poses.detach().cpu().numpy().astype(np.float64)
        crops = self.render_crops(frame, poses_np, stage)
        alternates = []
        if stage.flow_input == "region+relit":
            target, weight = self.flow_targets(crops, "region")
            alternates.append(self.flow_targets(crops, "relit", stage.relit_finest_scale))
        else:
            target, weight = self.flow_targets(crops, stage.flow_input, stage.relit_finest_scale)
        if stage.motion == "translation":
            target = _median_shift_targets(target, weight)
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        return ClassicalView(
            K=as_tensor(crops.K.astype(np.float32)),
            depth=as_tensor(crops.depth.astype(np.float32)),
            target=as_tensor(target),
            weight=as_tensor(weight),
            crops=crops,
            alternates=[(as_tensor(t), as_tensor(w)) for t, w in alternates],
            observed_depth=None if crops.observed_depth is None else as_tensor(crops.observed_depth),
        )

    def correspondences(
        self, frame: ClassicalFrame, view: ClassicalView, relative_pose: Tensor, step: int
    ) -> Correspondences:
        # The flow does not depend on the relative pose: the inner steps are IRLS iterations of the
        # solver's robust kernel on the same targets.
        choices = [(view.target, view.weight), *view.alternates]
        target, weight = choices[step % len(choices)]
        return Correspondences(target=target, weight=weight)

    # --- stages ----------------------------------------------------------------------------------------

    def crop_windows(self, frame: ClassicalFrame, poses: np.ndarray, stage: CropStage) -> np.ndarray:
        """Square windows around the projected models: (B, 3) float64 (x0, y0, side) in image pixels."""
        windows = np.empty((len(poses), 3))
        K = frame.observation.K
        for b, (model, pose) in enumerate(zip(frame.models, poses, strict=True)):
            cam = self._window_vertices[model] @ pose[:3, :3].T + pose[:3, 3]
            # A pose that drifted behind the camera still gets a window.
            pixels = np.clip(project_to_pixels(cam, K, min_depth=1e-3), -1e5, 1e5)
            lo, hi = pixels.min(0), pixels.max(0)
            side = max(float((hi - lo).max()) * (1.0 + 2.0 * stage.margin), MIN_WINDOW_PX)
            centre = (lo + hi) / 2.0
            windows[b] = (centre[0] - side / 2.0, centre[1] - side / 2.0, side)
        return windows

    def render_crops(self, frame: ClassicalFrame, poses: np.ndarray, stage: CropStage) -> CropBatch:
        """Crop the observed image, render at ``poses`` (B, 4, 4) and composite, for one stage."""
        size = stage.crop_size
        windows = self.crop_windows(frame, poses, stage)
        batch = len(poses)
        K_crop = np.empty((batch, 3, 3))
        observed = np.empty((batch, size, size, 3), dtype=np.uint8)
        depth_image = frame.observation.depth
        observed_depth = None if depth_image is None else np.empty((batch, size, size), dtype=np.float32)
        for b, (x0, y0, side) in enumerate(windows):
            # Crop pixel i covers image [x0 + i/s, x0 + (i+1)/s]: x_crop = s·(x − x0) − 0.5 (centres at
            # integer coordinates on both sides), so fx' = s·fx and cx' = s·(cx − x0) − 0.5.
            s = size / side
            affine = np.array([[s, 0.0, -s * x0 - 0.5], [0.0, s, -s * y0 - 0.5]])
            K_crop[b] = np.vstack((affine @ frame.observation.K, (0.0, 0.0, 1.0)))
            observed[b] = cv2.warpAffine(
                frame.observation.image,
                affine,
                (size, size),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
            )
            if observed_depth is not None:
                # Nearest: interpolating across a depth edge would invent surfaces between object
                # and background.
                observed_depth[b] = cv2.warpAffine(
                    depth_image,
                    affine,
                    (size, size),
                    flags=cv2.INTER_NEAREST,
                    borderMode=cv2.BORDER_CONSTANT,
                )
        lighting = _NO_LIGHT if stage.flow_input == "region" else self.config.lighting
        render = self.renderer.render(frame.models, poses, K_crop, (size, size), lighting=lighting)
        mask = render.mask & (render.depth > 0)
        rendered_rgb = np.round(np.clip(render.rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
        rendered = np.where(mask[..., None], rendered_rgb, observed)
        return CropBatch(
            poses=poses,
            K=K_crop,
            observed=observed,
            rendered=rendered,
            depth=render.depth,
            mask=mask,
            normals=self.renderer.surface_normals(frame.models, poses, render)
            if "relit" in stage.flow_input
            else None,
            observed_depth=observed_depth,
        )

    def flow_images(self, crops: CropBatch, b: int, flow_input: str) -> tuple[np.ndarray, np.ndarray]:
        """The (h, w) uint8 rendered and observed images the flow of instance ``b`` is computed on."""
        if flow_input == "region":
            config = self.config
            return _region_images(
                crops.observed[b],
                crops.mask[b],
                config.region_bins,
                config.region_inner_band,
                config.region_outer_band,
            )
        rendered = crops.rendered[b]
        if flow_input == "relit":
            rendered = _relight(rendered, crops.observed[b], crops.mask[b], crops.normals[b])
        return cv2.cvtColor(rendered, cv2.COLOR_RGB2GRAY), cv2.cvtColor(crops.observed[b], cv2.COLOR_RGB2GRAY)

    def flow_targets(
        self, crops: CropBatch, flow_input: str = "region", relit_finest_scale: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Targets (B, h, w, 2) float32 and weights (B, h, w) float32 from DIS flow both ways (the relit
        flow's finest pyramid level ``relit_finest_scale``, the others' ``config.dis_finest_scale``)."""
        config = self.config
        finest = relit_finest_scale if flow_input == "relit" else config.dis_finest_scale
        self._flow.setVariationalRefinementIterations(
            config.region_variational_iterations
            if flow_input == "region"
            else config.dis_variational_iterations
        )
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
            rendered, observed = self.flow_images(crops, b, flow_input)
            self._flow.setFinestScale(finest)
            forward = self._flow.calc(rendered, observed, None)
            self._flow.setFinestScale(max(finest, config.backward_finest_scale))
            backward = self._flow.calc(observed, rendered, None)
            target = grid + forward
            back_at_target = cv2.remap(
                backward, target[..., 0], target[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
            )
            round_trip = forward + back_at_target
            fb_error = cv2.magnitude(round_trip[..., 0], round_trip[..., 1])
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
            weights[b] = np.where((fb_error <= config.fb_max_px) & inside & (mask > 0), weight, 0.0)
            targets[b] = target
        return targets, weights


def _window_vertices(model: ObjectModel) -> np.ndarray:
    """(M, 3) float64 model vertices that place the crop window (a deterministic subset of big meshes)."""
    vertices = np.asarray(model.vertices, dtype=np.float64)
    if len(vertices) > MAX_WINDOW_VERTICES:
        vertices = vertices[:: int(np.ceil(len(vertices) / MAX_WINDOW_VERTICES))]
    return vertices


def _median_shift_targets(target: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Replace each dense flow by its median shift over the weighted pixels: (B, h, w, 2) targets."""
    batch, height, width, _ = target.shape
    grid = np.stack(np.meshgrid(np.arange(width), np.arange(height)), -1).astype(np.float32)
    out = target.copy()
    for b in range(batch):
        valid = weight[b] > 0
        if valid.sum() >= 10:
            out[b] = grid + np.median(target[b][valid] - grid[valid], axis=0)
    return out


def _object_and_background(
    mask: np.ndarray, inner_band: float, outer_band: float
) -> tuple[np.ndarray, np.ndarray]:
    """(inner object pixels, background pixels): the mask eroded by ``inner_band`` and the complement
    of its dilation by ``outer_band`` (fractions of the crop side; at least 1 and 2 pixels)."""
    side = max(mask.shape)
    mask_u8 = mask.astype(np.uint8)
    disc = lambda r: cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))  # noqa: E731
    inner = cv2.erode(mask_u8, disc(max(1, round(inner_band * side)))) > 0
    background = cv2.dilate(mask_u8, disc(max(2, round(outer_band * side)))) == 0
    return inner, background


def _colour_bins(image: np.ndarray, bins: int) -> tuple[np.ndarray, int]:
    """(h, w) int64 histogram bin of every pixel of an (h, w, 3) uint8 image, and the number of bins.

    Chromaticity (r, g) = (R, G) / (R + G + B) in bins × bins cells is invariant to shading, so an
    object's self-shadowed rim falls in the same bins as its lit front; two brightness levels keep
    black/white/grey apart, and nearly black pixels (no reliable chromaticity) get their own bin.
    """
    rgb = image.astype(np.float32)
    total = rgb[..., 0] + rgb[..., 1] + rgb[..., 2]  # a sum over the short last axis is ~20× slower
    safe = np.maximum(total, 1.0)
    r = np.minimum((rgb[..., 0] / safe * bins).astype(np.int64), bins - 1)
    g = np.minimum((rgb[..., 1] / safe * bins).astype(np.int64), bins - 1)
    bright = (total > 3 * 128).astype(np.int64)
    index = (bright * bins + r) * bins + g
    n_chroma = 2 * bins * bins
    return np.where(total < 3 * 20, n_chroma, index), n_chroma + 1


def _region_images(
    observed: np.ndarray, mask: np.ndarray, bins: int, inner_band: float = 1 / 48, outer_band: float = 1 / 24
) -> tuple[np.ndarray, np.ndarray]:
    """Rendered silhouette and observed object probability, both (h, w) uint8 (255 = object).

    Colour histograms of the observed crop inside the eroded silhouette (object) and outside the
    dilated silhouette (background) give P(object | colour) per observed pixel. The band around the
    silhouette is left out of both models so that a misplaced silhouette does not teach the object
    model its background colours (the region would grow from one iteration to the next).
    """
    inner, background = _object_and_background(mask, inner_band, outer_band)
    if not inner.any():
        inner = mask
    index, n_bins = _colour_bins(observed, bins)
    fg = np.bincount(index[inner], minlength=n_bins).astype(np.float32)
    bg = np.bincount(index[background], minlength=n_bins).astype(np.float32)
    fg /= max(fg.sum(), 1.0)
    bg /= max(bg.sum(), 1.0)
    seen = fg + bg > 0
    prob = np.where(seen, fg / np.where(seen, fg + bg, 1.0), 0.5)
    objectness = cv2.GaussianBlur(prob[index].astype(np.float32), (0, 0), 1.0)
    silhouette = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0)
    return (silhouette * 255).astype(np.uint8), (objectness * 255).astype(np.uint8)


def _shading_basis(normals: np.ndarray) -> np.ndarray:
    """(..., 8) real spherical harmonics of order 1 and 2 (unnormalised) of (..., 3) unit normals.

    With a constant term per channel they describe Lambertian shading under any distant lighting to
    within a few percent, rim darkening included (the n_z² term)."""
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    return np.stack((x, y, z, x * y, x * z, y * z, x * x - y * y, 3.0 * z * z - 1.0), -1)


def _relight(rendered: np.ndarray, observed: np.ndarray, mask: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Re-shade the rendered albedo like the observed object: I_c ≈ A_c·(α_c + Y(n)·β), α (3) per-channel
    gain and β (8) spherical-harmonic lighting shared by the channels, fitted by IRLS on the inner object
    pixels of every second row and column (11 parameters need far fewer pixels than an object covers;
    a quarter of the fit's time). A shading mismatch at the rim (the observed rim darker or brighter
    than the rendered one) would move the matched silhouette inwards or outwards, i.e. bias the depth.

    Args:
        rendered: (h, w, 3) uint8 albedo composited over the observed crop; observed: (h, w, 3) uint8.
        mask: (h, w) bool rendered object pixels; normals: (h, w, 3) float32 camera-frame unit normals.
    Returns:
        (h, w, 3) uint8; background pixels unchanged.
    """
    inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    inner[1::2] = False
    inner[:, 1::2] = False
    if inner.sum() < 20:
        return rendered
    # Only the object's pixels change: work on them alone (row-major order, like observed[inner]).
    albedo = rendered[mask].astype(np.float32) / 255.0  # (M, 3)
    basis = _shading_basis(normals[mask])  # (M, 8)
    inner_of_mask = inner[mask]
    A = albedo[inner_of_mask].astype(np.float64)  # (n, 3)
    Y = basis[inner_of_mask].astype(np.float64)  # (n, 8)
    seen = observed[inner].astype(np.float64) / 255.0  # (n, 3)
    weight = np.ones_like(A)  # per pixel and channel
    for _ in range(3):  # IRLS: background seen under a misplaced silhouette counts less
        # Weighted normal equations of the rows A_ic·[e_c, Y_i] (11 × 11), summed block by block:
        # the least-squares solution at a fraction of the cost of factorising the 3n rows. lstsq
        # keeps a channel without albedo (a zero row and column) from making it singular.
        u, v = weight * A * A, weight * A * seen  # (n, 3)
        cross = u.T @ Y  # (3, 8)
        # Channel sums written out: a sum over the short last axis is ~20× slower.
        u_pixel, v_pixel = u[:, 0] + u[:, 1] + u[:, 2], v[:, 0] + v[:, 1] + v[:, 2]
        normal = np.block([[np.diag(u.sum(0)), cross], [cross.T, (Y * u_pixel[:, None]).T @ Y]])
        params = np.linalg.lstsq(normal, np.concatenate((v.sum(0), Y.T @ v_pixel)), rcond=None)[0]
        residual = A * (params[:3] + (Y @ params[3:])[:, None]) - seen
        weight = 0.05 / np.maximum(np.abs(residual), 0.05)
    shading = params[None, :3] + (basis @ params[3:])[:, None]
    relit = rendered.copy()
    relit[mask] = np.round(np.clip(albedo * shading, 0.0, 1.0) * 255.0).astype(np.uint8)
    return relit
