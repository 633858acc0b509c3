"""Learned RNNPose correspondence backend (docs/method.md §1): the product's refinement stage.

Once per object (:meth:`LearnedBackend.prepare_objects`): load its weight file strictly, build
the KPConv point pyramid of its vertex cloud, run the descriptor and context nets, and keep the
per-vertex attribute A = [context (256) ‖ descriptor (32)] on the device.

Once per frame (:meth:`~LearnedBackend.prepare_frame`): the first 320×320 crop around each
instance (docs/method.md §1.3) and its 2D descriptors.

Once per render iteration (:meth:`~LearnedBackend.prepare_render`): the 240×240 zoom crop of the
first crop and of its descriptors (docs/method.md §1.4), a render at the current pose with the crop's
intrinsics (RGB, per-pixel surface lookup → A interpolated in torch, nearest-vertex depth as
published), RAFT features, correlation pyramid and GRU state (:mod:`rnnpose_ros.core.recurrent`).

Per inner step (:meth:`~LearnedBackend.correspondences`): one GRU update on top of the flow the
relative pose induces, convex upsampling, and descriptor-agreement weights; the refiner solves the
LM step.

Batching: every stage runs once over all B instances. The networks are per object (one weight file
per class, as published), so the network stages run once per *weights group* on the instances of
that group (several instances of one class share one pass). Host synchronisation happens only at
the renderer (an OpenGL rasteriser reads poses and returns pixels on the host).

Meshes whose vertex count exceeds ``max_cloud_points`` are handled by decoupling: the KPConv nets
run on a deterministic subsample of the vertices, and every render vertex takes the
inverse-distance blend of its three nearest cloud points' features (never a silent permutation of
the render mesh, which broke the published code, docs/method.md §6.7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from rnnpose_ros.core.backends import BackendError
from rnnpose_ros.core.backends.base import (
    CorrespondenceBackend,
    FrameState,
    ObjectCache,
    RenderState,
)
from rnnpose_ros.core.checkpoint import CheckpointError, load_checkpoint, mesh_fingerprint
from rnnpose_ros.core.geometry import CropWindow, first_crop_window, sample_crop, zoom_crop_window
from rnnpose_ros.core.loop import Convergence, Correspondences, RefinerConfig
from rnnpose_ros.core.model import CONTEXT_DIM, DESCRIPTOR_DIM, RNNPoseNet
from rnnpose_ros.core.nets.kpconv_pyramid import build_point_pyramid
from rnnpose_ros.core.nets.raft import FLOW_DOWNSAMPLING
from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.observation import Observation
from rnnpose_ros.core.recurrent import (
    CONTEXT_SCALE,
    RecurrentState,
    RenderedReference,
    predict_correspondences,
    solver_depth,
    start_render_iteration,
)
from rnnpose_ros.core.solver import LMConfig
from rnnpose_ros.core.surface import (
    SurfaceTable,
    coarse_context,
    nearest_vertex_depth,
    pixel_corners,
    pixel_descriptors,
)

#: Largest vertex cloud fed to the KPConv nets (the published data loader's ``max_points``).
MAX_CLOUD_POINTS = 20000
#: Render vertices take the features of this many nearest cloud points (decoupled meshes only).
FEATURE_NEIGHBOURS = 3


@dataclass
class LearnedConfig:
    """RNNPose options (its loop policy, 3 renders × 4 recurrent steps as published, is
    :meth:`LearnedBackend.default_loop`).

    Attributes:
        weights: class_id → weight file, overriding the registry's ``weights`` entries.
        published_conventions: reproduce the published quirks (docs/method.md §1.8) — keep True with the
            published checkpoints, which were trained with them.
        first_crop_size, zoom_crop_size: crop sides, pixels (published 320 and 240).
        interpolated_depth: use the interpolated z-buffer instead of the published nearest-vertex
            depth (for weights trained that way).
        mixed_precision: fp16 autocast of the encoder and update block on CUDA, as published.
        max_cloud_points: vertex count above which the feature cloud is decoupled from the mesh.
    """

    published_conventions: bool = True
    weights: dict[str, Path] = field(default_factory=dict)
    first_crop_size: int = 320
    zoom_crop_size: int = 240
    interpolated_depth: bool = False
    mixed_precision: bool = True
    max_cloud_points: int = MAX_CLOUD_POINTS


@dataclass
class ObjectFeatures:
    """Per-object cache on the device.

    Attributes:
        net: the object's networks (shared by classes naming the same weight file).
        attributes: (N, 288) float32 per render vertex: context (raw) then unit descriptor.
        vertices: (N, 3) float32 render vertices, metres (for the crop windows).
        faces: (F, 3) int64 render faces.
        neighbor_limits: KPConv neighbour limits used for the cloud (store them with the weights).
    """

    net: RNNPoseNet
    attributes: Tensor
    vertices: Tensor
    faces: Tensor
    neighbor_limits: tuple[int, ...]


@dataclass
class LearnedFrame(FrameState):
    """Per-frame tensors.

    Attributes (besides :class:`FrameState`):
        features: the B instances' object caches.
        window: the first crop window of every instance.
        crop_rgb: (B, 3, S, S) float32 first crop in [0, 1].
        crop_descriptors: (B, 32, S, S) float32 2D descriptors of the first crop.
        groups: (net, (G,) int64 instance indices) per weights group, in first-appearance order.
        vertices: (B, Nmax, 3) float32 render vertices, zero-padded; vertex_mask: (B, Nmax) bool.
        surface: the B instances' faces and per-vertex tables, for the per-pixel lookups of a render.
        crop_depth: (B, 1, S, S) float32 observed depth of the first crop (nearest neighbour),
            metres, 0 = unknown; None for an RGB-only frame.
    """

    features: list[ObjectFeatures]
    window: CropWindow
    crop_rgb: Tensor
    crop_descriptors: Tensor
    groups: list[tuple[RNNPoseNet, Tensor]]
    vertices: Tensor
    vertex_mask: Tensor
    surface: SurfaceTable
    crop_depth: Tensor | None = None

    @property
    def single_group(self) -> bool:
        """One network serves every instance: stages run on the whole batch without index copies."""
        return len(self.groups) == 1


@dataclass
class LearnedView(RenderState):
    """Per-render-iteration state: the rendered reference, its zoom crop window, and the recurrent
    state of each weights group (same order as ``LearnedFrame.groups``)."""

    reference: RenderedReference
    window: CropWindow
    states: list[RecurrentState]


class LearnedBackend(CorrespondenceBackend[LearnedFrame, LearnedView]):
    """RNNPose: GRU correspondence fields weighted by 3D–2D descriptor agreement."""

    name = "rnnpose"
    config_class = LearnedConfig

    def __init__(
        self, device: torch.device | str, config: LearnedConfig | None = None, renderer=None
    ) -> None:
        super().__init__(device, config, renderer)
        self._nets: dict[Path, tuple[RNNPoseNet, dict]] = {}  # weight file → (net, per-object metadata)
        self._objects = ObjectCache(self.object_features)

    @staticmethod
    def default_loop() -> RefinerConfig:
        """As published: 3 render iterations × 4 recurrent steps, the published LM constants, no
        restarts; an instance whose second render already agrees with the image (sub-pixel flow, a
        negligible update) skips the third."""
        return RefinerConfig(
            outer_iterations=3, inner_steps=4, lm=LMConfig(), convergence=Convergence(min_iterations=2)
        )

    @property
    def mixed_precision(self) -> bool:
        return self.config.mixed_precision and self.device.type == "cuda"

    # --- once per object ---------------------------------------------------------------------------

    def weights_path(self, model: ObjectModel) -> Path:
        """The weight file of ``model``: the config override, else the registry entry."""
        path = self.config.weights.get(model.class_id) or model.weights
        if path is None:
            raise BackendError(
                f"object {model.class_id!r} has no weights: set 'weights' in objects.yaml or pass "
                f"weights for it (the classical backend needs none)"
            )
        return Path(path).expanduser().resolve()

    def _load_net(self, path: Path) -> tuple[RNNPoseNet, dict]:
        if path not in self._nets:
            net = RNNPoseNet()
            try:
                info = load_checkpoint(path, net)
            except CheckpointError as exc:
                raise BackendError(str(exc)) from exc
            self._nets[path] = (net.eval().to(self.device), info.objects)
        return self._nets[path]

    def prepare_objects(self, models: Sequence[ObjectModel]) -> None:
        self._objects.prepare(models)

    @torch.no_grad()
    def object_features(self, model: ObjectModel) -> ObjectFeatures:
        """Pyramid + both KPConv nets for one object (docs/method.md §1.2); cached per object."""
        net, stored = self._load_net(self.weights_path(model))
        vertices = np.asarray(model.vertices, dtype=np.float32)
        faces = np.asarray(model.faces, dtype=np.int64)
        cloud = self.feature_cloud(vertices)
        meta = stored.get(model.class_id)
        limits = None
        if meta is not None and meta.mesh_sha256 == mesh_fingerprint(cloud, faces):
            limits = list(meta.neighbor_limits)
        pyramid = build_point_pyramid(cloud, neighbor_limits=limits).to(self.device)
        context = net.ctx3d(pyramid)
        descriptors = net.desc3d(pyramid)
        attributes = torch.cat([context, descriptors], dim=1)
        if len(cloud) != len(vertices):
            attributes = _interpolate_cloud_features(cloud, vertices, attributes)
        return ObjectFeatures(
            net=net,
            attributes=attributes,
            vertices=torch.from_numpy(vertices).to(self.device),
            faces=torch.from_numpy(faces).to(self.device),
            neighbor_limits=tuple(pyramid.neighbor_limits),
        )

    def feature_cloud(self, vertices: np.ndarray) -> np.ndarray:
        """The vertices themselves (published), or a deterministic even subsample of a big mesh."""
        limit = self.config.max_cloud_points
        if len(vertices) <= limit:
            return vertices
        keep = np.linspace(0, len(vertices) - 1, limit).round().astype(np.int64)
        return vertices[np.unique(keep)]

    # --- once per frame ----------------------------------------------------------------------------

    @torch.no_grad()
    def prepare_frame(
        self, observation: Observation, models: Sequence[ObjectModel], poses: Tensor
    ) -> LearnedFrame:
        config = self.config
        image, K = observation.image, observation.K
        features = [self._objects[m] for m in models]
        vertices, vertex_mask = _pad_clouds([f.vertices for f in features])
        batch = len(models)
        image_t = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        image_t = image_t.permute(2, 0, 1)[None].float() / 255.0
        K_t = torch.as_tensor(K, dtype=torch.float32, device=self.device).expand(batch, 3, 3)
        window = first_crop_window(
            vertices,
            poses.float(),
            K_t,
            image.shape[:2],
            size=config.first_crop_size,
            vertex_mask=vertex_mask,
            published_conventions=config.published_conventions,
        )
        crop_rgb = sample_crop(image_t, window)
        crop_depth = None
        if observation.depth is not None:
            depth_t = torch.from_numpy(observation.depth).to(self.device)[None, None]
            crop_depth = sample_crop(depth_t, window, mode="nearest")  # never blend across depth edges
        groups = _weights_groups([f.net for f in features], self.device)
        if len(groups) == 1:
            crop_descriptors = groups[0][0].desc2d(crop_rgb).descriptors
        else:
            crop_descriptors = crop_rgb.new_zeros(batch, DESCRIPTOR_DIM, *crop_rgb.shape[-2:])
            for net, index in groups:
                crop_descriptors[index] = net.desc2d(crop_rgb[index]).descriptors
        return LearnedFrame(
            observation=observation,
            models=list(models),
            features=features,
            window=window,
            crop_rgb=crop_rgb,
            crop_descriptors=crop_descriptors,
            groups=groups,
            vertices=vertices,
            vertex_mask=vertex_mask,
            surface=surface_table(features),
            crop_depth=crop_depth,
        )

    # --- once per render iteration -----------------------------------------------------------------

    @torch.no_grad()
    def prepare_render(self, frame: LearnedFrame, poses: Tensor, iteration: int) -> LearnedView:
        config = self.config
        window = zoom_crop_window(
            frame.vertices,
            poses.float(),
            frame.window.K,
            tuple(frame.crop_rgb.shape[-2:]),
            size=config.zoom_crop_size,
            vertex_mask=frame.vertex_mask,
            published_conventions=config.published_conventions,
        )
        reference = render_reference(
            self.renderer,
            frame.models,
            frame.features,
            poses,
            window,
            sample_crop(frame.crop_rgb, window),
            sample_crop(frame.crop_descriptors, window),
            interpolated_depth=config.interpolated_depth,
            surface=frame.surface,
        )
        states = [
            start_render_iteration(
                net,
                reference if frame.single_group else _select(reference, index),
                config.published_conventions,
                self.mixed_precision,
            )
            for net, index in frame.groups
        ]
        observed_depth = None
        if frame.crop_depth is not None:
            observed_depth = sample_crop(frame.crop_depth, window, mode="nearest")[:, 0]
        return LearnedView(
            K=window.K,
            depth=solver_depth(reference.depth),
            reference=reference,
            window=window,
            states=states,
            observed_depth=observed_depth,
        )

    # --- per inner step ----------------------------------------------------------------------------

    @torch.no_grad()
    def correspondences(
        self, frame: LearnedFrame, view: LearnedView, relative_pose: Tensor, step: int
    ) -> Correspondences:
        if frame.single_group:
            predicted = predict_correspondences(
                frame.groups[0][0],
                view.states[0],
                relative_pose.float(),
                self.config.published_conventions,
                self.mixed_precision,
            )
            return Correspondences(target=predicted.target, weight=predicted.weight)
        batch, height, width = view.depth.shape
        target = view.depth.new_zeros(batch, height, width, 2)
        weight = view.depth.new_zeros(batch, height, width)
        for (net, index), state in zip(frame.groups, view.states, strict=True):
            predicted = predict_correspondences(
                net,
                state,
                relative_pose[index].float(),
                self.config.published_conventions,
                self.mixed_precision,
            )
            target[index] = predicted.target
            weight[index] = predicted.weight
        return Correspondences(target=target, weight=weight)


def render_reference(
    renderer: Any,
    models: Sequence[ObjectModel],
    features: Sequence[ObjectFeatures],
    poses: Tensor,
    window: CropWindow,
    observed_rgb: Tensor,
    observed_descriptors: Tensor,
    interpolated_depth: bool = False,
    surface: SurfaceTable | None = None,
) -> RenderedReference:
    """Render the B instances at ``poses`` in the zoom crop ``window`` and pair them with the observed
    crop (docs/method.md §1.4). Differentiable with respect to the per-vertex attributes in
    ``features`` (training calls it with gradients on; the refiner under ``no_grad``).

    The context map is evaluated only on the flow grid, where it initialises the GRU
    (``RenderedReference.coarse_context``; :mod:`rnnpose_ros.core.surface`).

    Args:
        renderer: a :class:`~rnnpose_ros.core.renderers.RendererLike` (results on the poses' device).
        models, features: the B object models and their caches.
        poses: (B, 4, 4) render poses, model → camera, metres.
        window: the zoom crop windows (``window.K``: (B, 3, 3) crop intrinsics, ``window.side``).
        observed_rgb: (B, 3, S, S) float32 observed zoom crop in [0, 1].
        observed_descriptors: (B, 32, S, S) float32 observed 2D descriptors on the same crop.
        interpolated_depth: interpolated z-buffer depth instead of the published nearest-vertex depth.
        surface: ``surface_table(features)`` if already built (once per frame).
    """
    size = observed_rgb.shape[-1]
    surface = surface if surface is not None else surface_table(features)
    # On the device with the Warp renderer; the OpenGL renderer reads poses and K back to the host
    # (its one synchronisation point).
    rendered = renderer.render_tensors(list(models), poses.detach(), window.K.detach(), (size, size))
    corners = pixel_corners(rendered.face_index, rendered.barycentric, surface)
    if interpolated_depth:
        depth = rendered.depth
    else:
        depth = nearest_vertex_depth(corners, surface, poses, size, size)
    coarse = _flow_grid_side(size)
    return RenderedReference(
        rgb=rendered.rgb.permute(0, 3, 1, 2),
        context=None,
        descriptors=pixel_descriptors(corners, surface, size, size),
        depth=depth,
        observed_rgb=observed_rgb,
        observed_descriptors=observed_descriptors,
        K=window.K,
        coarse_context=coarse_context(corners, surface, size, size, (coarse, coarse), CONTEXT_SCALE),
    )


def _flow_grid_side(size: int) -> int:
    """Side of the RAFT encoder's output for a ``size`` crop: each stride-2 convolution rounds up."""
    side = size
    for _ in range(FLOW_DOWNSAMPLING.bit_length() - 1):
        side = (side + 1) // 2
    return side


def surface_table(features: Sequence[ObjectFeatures]) -> SurfaceTable:
    """The per-pixel lookup tables of B instances (attribute channels: context, then descriptor); each
    distinct object's tables appear once, however many of its instances the batch holds."""
    distinct: dict[int, int] = {}
    objects: list[ObjectFeatures] = []
    for f in features:
        if id(f) not in distinct:
            distinct[id(f)] = len(objects)
            objects.append(f)
    return SurfaceTable.build(
        [f.faces for f in objects],
        [f.vertices for f in objects],
        [f.attributes for f in objects],
        [distinct[id(f)] for f in features],
        CONTEXT_DIM,
    )


def _pad_clouds(clouds: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack (N_b, 3) clouds into (B, Nmax, 3) with a (B, Nmax) validity mask."""
    longest = max(len(c) for c in clouds)
    padded = clouds[0].new_zeros(len(clouds), longest, 3)
    mask = torch.zeros(len(clouds), longest, dtype=torch.bool, device=clouds[0].device)
    for b, cloud in enumerate(clouds):
        padded[b, : len(cloud)] = cloud
        mask[b, : len(cloud)] = True
    return padded, mask


def _weights_groups(nets: Sequence[RNNPoseNet], device: torch.device) -> list[tuple[RNNPoseNet, Tensor]]:
    """Instances sharing one network, as (net, (G,) int64 indices), in first-appearance order."""
    groups: dict[int, tuple[RNNPoseNet, list[int]]] = {}
    for b, net in enumerate(nets):
        groups.setdefault(id(net), (net, []))[1].append(b)
    return [(net, torch.tensor(index, dtype=torch.int64, device=device)) for net, index in groups.values()]


def _select(reference: RenderedReference, index: Tensor) -> RenderedReference:
    """The instances ``index`` of a batched reference."""
    return RenderedReference(
        **{name: None if value is None else value[index] for name, value in vars(reference).items()}
    )


def _interpolate_cloud_features(cloud: np.ndarray, vertices: np.ndarray, features: Tensor) -> Tensor:
    """(N, C) features at ``vertices`` from (M, C) features at ``cloud``: inverse-distance blend of
    the nearest FEATURE_NEIGHBOURS cloud points (exact where a vertex is a cloud point)."""
    distances, index = cKDTree(cloud).query(vertices, k=FEATURE_NEIGHBOURS)
    inverse = 1.0 / np.maximum(distances, 1e-9)
    blend = torch.from_numpy((inverse / inverse.sum(1, keepdims=True)).astype(np.float32)).to(features.device)
    gathered = features[torch.from_numpy(index).to(features.device)]  # (N, k, C)
    blended = (gathered * blend[..., None]).sum(1)
    # Descriptors are unit vectors: a blend of them is not, so renormalise that part.
    descriptors = torch.nn.functional.normalize(blended[:, CONTEXT_DIM:], dim=1)
    return torch.cat([blended[:, :CONTEXT_DIM], descriptors], dim=1)
