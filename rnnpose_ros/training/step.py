"""One training forward pass of RNNPose on one sample, with its losses (docs/method.md §4.1).

The pass is the refiner's (first crop and 2D descriptors at the initial pose, then
``outer_iterations`` render iterations of ``inner_steps`` recurrent steps each, through
:func:`~rnnpose_ros.core.loop.run_render_iteration`), with gradients on:

* the per-vertex features come from the KPConv nets of this pass (not the inference cache), so the
  rendered context and descriptors carry gradients into both 3D nets;
* the observed 2D descriptors carry gradients into the 2D net, both through the confidence weights
  and through the circle loss;
* gradients are truncated as published: the relative pose is detached before every inner step, and
  the render pose is detached between render iterations (the renderer rasterises on the host).

Batch size 1 per process, as published (one object per sample); data parallelism runs one sample per
process (``torch.distributed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from rnnpose_ros.core.backends.learned import ObjectFeatures, render_reference
from rnnpose_ros.core.geometry import first_crop_window, sample_crop, zoom_crop_window
from rnnpose_ros.core.loop import run_render_iteration
from rnnpose_ros.core.losses import (
    CircleConfig,
    LossWeights,
    descriptor_correspondences,
    descriptor_loss,
    flow_loss,
    flow_metrics,
    flow_targets,
    point_alignment_loss,
    reprojection_loss,
)
from rnnpose_ros.core.model import RNNPoseNet
from rnnpose_ros.core.nets.kpconv_pyramid import PointPyramid, build_point_pyramid
from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.recurrent import predict_correspondences, solver_depth, start_render_iteration
from rnnpose_ros.core.solver import LMConfig


class TrainingSampleError(ValueError):
    """A sample that cannot be trained on (object out of view, no correspondences)."""


@dataclass
class TrainingSample:
    """What one training step sees.

    Attributes:
        model: the object.
        image: (H, W, 3) uint8 RGB.
        K: (3, 3) float64 intrinsics, pixels.
        pose_gt: (4, 4) float64 ground-truth pose, model → camera, metres.
        pose_init: (4, 4) float64 initial (perturbed) pose.
    """

    model: ObjectModel
    image: np.ndarray
    K: np.ndarray
    pose_gt: np.ndarray
    pose_init: np.ndarray


@dataclass(frozen=True)
class StepConfig:
    """Schedule, crops and losses of a training pass (published values unless reduced for CPU).

    Attributes:
        outer_iterations, inner_steps: render iterations × recurrent steps (published 3 × 4).
        first_crop_size, zoom_crop_size: crop sides, pixels (published 320 / 240; both must be
            multiples of 8 — the inference backend must then use the same sizes).
        published_conventions: the published sub-pixel conventions (keep equal to inference).
        mixed_precision: fp16 autocast of the RAFT parts, as published (applies on CUDA only).
        weights: loss weights; circle: circle-loss constants.
        min_correspondences: a sample with fewer 2D–3D matches is rejected (published: 10).
    """

    outer_iterations: int = 3
    inner_steps: int = 4
    first_crop_size: int = 320
    zoom_crop_size: int = 240
    published_conventions: bool = True
    mixed_precision: bool = True
    weights: LossWeights = field(default_factory=LossWeights)
    circle: CircleConfig = field(default_factory=CircleConfig)
    min_correspondences: int = 10


@dataclass
class StepLosses:
    """Losses and diagnostics of one pass.

    Attributes:
        total: () float32, differentiable.
        circle, align, flow, reproj: () float32 detached: the circle loss and the sums over all
            iterations of each motion term (unweighted).
        per_iteration: per inner step (in order) a dict of align, flow, reproj and flow EPE.
        recall: descriptor recall of the circle loss's sampled pairs.
        final_pose: (4, 4) float64 pose after the last iteration.
        images: small diagnostic images of the last step (flow magnitude, weight map), (H, W) float32.
    """

    total: Tensor
    circle: Tensor
    align: Tensor
    flow: Tensor
    reproj: Tensor
    per_iteration: list[dict[str, float]]
    recall: float
    final_pose: np.ndarray
    images: dict[str, np.ndarray]

    def scalars(self) -> dict[str, float]:
        """Plain floats for logs."""
        last = self.per_iteration[-1]
        return {
            "loss/total": float(self.total.detach()),
            "loss/circle": float(self.circle),
            "loss/align": float(self.align),
            "loss/flow": float(self.flow),
            "loss/reproj": float(self.reproj),
            "metric/recall": self.recall,
            "metric/epe_last": last["epe"],
            "metric/align_last": last["align"],
        }


class ObjectPyramids:
    """KPConv pyramids of the training objects, built once per object (no network involved)."""

    def __init__(self) -> None:
        self._pyramids: dict[int, tuple[np.ndarray, PointPyramid]] = {}

    def get(self, model: ObjectModel, max_cloud_points: int) -> tuple[np.ndarray, PointPyramid]:
        """(cloud (M, 3) float32 metres, pyramid) of ``model``; the cloud is the vertices up to
        ``max_cloud_points`` (as the inference backend chooses it)."""
        if id(model) not in self._pyramids:
            vertices = np.asarray(model.vertices, np.float32)
            if len(vertices) > max_cloud_points:
                raise TrainingSampleError(
                    f"object {model.class_id!r} has {len(vertices)} vertices; training needs at most "
                    f"{max_cloud_points} (decimate the mesh: the rendered features index the vertices)"
                )
            self._pyramids[id(model)] = (vertices, build_point_pyramid(vertices))
        return self._pyramids[id(model)]


def object_features(
    net: RNNPoseNet, model: ObjectModel, pyramid: PointPyramid, device: torch.device
) -> ObjectFeatures:
    """Per-vertex attributes [context ‖ descriptor] of ``model`` with gradients into both 3D nets."""
    pyramid = pyramid.to(device)
    attributes = torch.cat([net.ctx3d(pyramid), net.desc3d(pyramid)], dim=1)
    return ObjectFeatures(
        net=net,
        attributes=attributes,
        vertices=torch.from_numpy(np.asarray(model.vertices, np.float32)).to(device),
        faces=torch.from_numpy(np.asarray(model.faces, np.int64)).to(device),
        neighbor_limits=tuple(pyramid.neighbor_limits),
    )


def training_pass(
    net: RNNPoseNet,
    renderer,
    sample: TrainingSample,
    pyramid: PointPyramid,
    rng: np.random.RandomState,
    config: StepConfig = StepConfig(),
) -> StepLosses:
    """The forward pass of one sample and its total loss (call ``.backward()`` on ``total``).

    Args:
        net: the networks (possibly a DDP-wrapped module's ``.module``: gradients are the caller's).
        renderer: a :class:`~rnnpose_ros.core.render.Renderer`.
        sample: the sample; pyramid: its object's KPConv pyramid (:class:`ObjectPyramids`).
        rng: the legacy numpy generator of the circle loss's pair sampling (part of the run state).
        config: schedule, crops, weights.

    Raises:
        TrainingSampleError: the object is not in view at the initial pose, or too few matches.
    """
    device = net.sigma.device
    amp = config.mixed_precision and device.type == "cuda"
    model = sample.model
    features = object_features(net, model, pyramid, device)
    vertices = features.vertices[None]
    image = (
        torch.from_numpy(np.ascontiguousarray(sample.image)).to(device).permute(2, 0, 1)[None].float() / 255
    )
    K = torch.as_tensor(sample.K, dtype=torch.float32, device=device)[None]
    T_gt = torch.as_tensor(sample.pose_gt, dtype=torch.float32, device=device)[None]
    T = torch.as_tensor(sample.pose_init, dtype=torch.float32, device=device)[None]

    window = first_crop_window(
        vertices,
        T,
        K,
        sample.image.shape[:2],
        size=config.first_crop_size,
        published_conventions=config.published_conventions,
    )
    if not bool(window.valid.all()):
        raise TrainingSampleError("the object is not in view at the initial pose")
    crop_rgb = sample_crop(image, window)
    descriptor_map = net.desc2d(crop_rgb).descriptors

    # Circle loss on the first crop, against the ground-truth depth of that crop.
    gt_render = renderer.render(
        [model], sample.pose_gt, window.K[0].detach().cpu().numpy(), crop_rgb.shape[-2:]
    )
    gt_depth = gt_render.depth[0].astype(np.float64)
    correspondences = descriptor_correspondences(
        np.asarray(model.vertices, np.float32),
        gt_depth,
        window.K[0].detach().cpu().numpy(),
        sample.pose_gt,
        config.circle,
    )
    if len(correspondences.matches) < config.min_correspondences:
        raise TrainingSampleError(f"only {len(correspondences.matches)} 2D–3D matches in the crop")
    circle = descriptor_loss(
        descriptor_map[0],
        features.attributes[:, -descriptor_map.shape[1] :],
        torch.from_numpy(gt_depth > 0).to(device),
        correspondences,
        rng,
        config.circle,
    )

    weights = config.weights
    lm = LMConfig()
    points = features.vertices
    motion = torch.zeros((), device=device)
    sums = {"align": 0.0, "flow": 0.0, "reproj": 0.0}
    per_iteration: list[dict[str, float]] = []
    images: dict[str, np.ndarray] = {}
    for _ in range(config.outer_iterations):
        T = T.detach()
        zoom = zoom_crop_window(
            vertices,
            T,
            window.K,
            tuple(crop_rgb.shape[-2:]),
            size=config.zoom_crop_size,
            published_conventions=config.published_conventions,
        )
        reference = render_reference(
            renderer,
            [model],
            [features],
            T,
            zoom,
            sample_crop(crop_rgb, zoom),
            sample_crop(descriptor_map, zoom),
        )
        state = start_render_iteration(net, reference, config.published_conventions, amp)

        def correspond(relative: Tensor, step: int, state=state):
            return predict_correspondences(net, state, relative, config.published_conventions, amp)

        identity = torch.eye(4, device=device)[None]
        relative = identity
        for step in run_render_iteration(
            correspond, solver_depth(reference.depth), zoom.K, identity, config.inner_steps, lm
        ):
            relative = step.solve.pose
            targets = flow_targets(reference.depth, zoom.K, T, T_gt, relative)
            flow_term, valid = flow_loss(step.correspondences.flow, targets)
            align_term = point_alignment_loss(points, relative @ T, targets.relative_gt @ T).sum()
            reproj_term = reprojection_loss(relative, targets, zoom.K)
            motion = (
                motion + weights.align * align_term + weights.flow * flow_term + weights.reproj * reproj_term
            )
            sums["align"] += float(align_term.detach())
            sums["flow"] += float(flow_term.detach())
            sums["reproj"] += float(reproj_term.detach())
            per_iteration.append(
                {
                    "align": float(align_term.detach()),
                    "flow": float(flow_term.detach()),
                    "reproj": float(reproj_term.detach()),
                    "epe": flow_metrics(step.correspondences.flow, targets, valid)["epe"],
                }
            )
            images = {
                "flow_magnitude": step.correspondences.flow[0].detach().norm(dim=0).cpu().numpy(),
                "weight": step.correspondences.weight[0].detach().cpu().numpy(),
            }
        T = relative.detach() @ T

    total = weights.circle * circle.loss + motion
    return StepLosses(
        total=total,
        circle=circle.loss.detach(),
        align=torch.tensor(sums["align"]),
        flow=torch.tensor(sums["flow"]),
        reproj=torch.tensor(sums["reproj"]),
        per_iteration=per_iteration,
        recall=float(circle.recall),
        final_pose=T[0].detach().double().cpu().numpy(),
        images=images,
    )
