"""The published RNNPose training losses (docs/method.md §4.1), written from their description.

Total loss of one training sample::

    L = w_c·L_circle + Σ_{i < outer·inner} (w_a·L_align,i + w_f·L_flow,i + w_r·L_reproj,i)

with the published weights w_c = 1 (the published config's 0.001 is never read), w_a = 1, w_f = 0.5,
w_r = 0, no decay over the 12 iterations, and the published gradient truncation: each inner step's
relative pose starts detached (:func:`rnnpose_ros.core.loop.run_render_iteration`), and the render
pose Ti and the target T_gt·Ti⁻¹ are detached.

* :func:`flow_targets`, :func:`flow_loss`, :func:`reprojection_loss`: the flow a ground-truth
  relative pose induces on the rendered reference, and the L1 loss of the predicted flow against it.
* :func:`point_alignment_loss`: mean per-point L1 distance between the model points under the
  predicted and the ground-truth pose.
* :func:`descriptor_correspondences`, :func:`sample_descriptor_pairs`, :func:`circle_loss`,
  :func:`descriptor_recall`: the circle (metric) loss between 2D descriptors of foreground pixels and
  3D vertex descriptors, with background descriptors pushed away as one far-away cluster.

Every function is batched where the published code is not (it only supports batch size 1): the
published behaviour is the batch-of-one case, checked against fixtures of the published code by
``python -m rnnpose_ros.tools.check_parity`` (``tools/parity_losses.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import Tensor

from .geometry import backproject_depth, pixel_grid, project_points, se3_inverse, transform_points
from .recurrent import DEPTH_EPSILON

#: Both depths must exceed this for a pixel to enter the flow loss, metres (the solver's threshold).
FLOW_MIN_DEPTH = 0.1
#: Ground-truth flows at least this long are excluded from the flow loss, pixels.
MAX_FLOW = 400.0
#: The reprojection term's per-element clamp, pixels.
REPROJ_CLAMP = 100.0
#: Coordinate given to every background pixel on both sides of the circle loss (normalised units).
BACKGROUND_COORDINATE = 1e7


class LossInputError(ValueError):
    """Inputs a loss cannot be computed from (wrong shapes, no correspondences)."""


@dataclass(frozen=True)
class LossWeights:
    """Weights of the total loss (published values)."""

    circle: float = 1.0
    align: float = 1.0
    flow: float = 0.5
    reproj: float = 0.0


@dataclass(frozen=True)
class CircleConfig:
    """Circle-loss constants (published values; radii in normalised model units).

    Attributes:
        correspondence_radius: 2D–3D matches are vertices within this radius of a lifted pixel.
        correspondence_k: at most this many matches per pixel, nearest first.
        pos_radius: a sampled pair closer than this is a positive (published 0.01 + 0.001).
        safe_radius: a sampled pair farther than this is a negative.
        pos_optimal, neg_optimal: optimal descriptor distances of positives / negatives.
        pos_margin, neg_margin: margins of positives / negatives.
        log_scale: the scale γ of the log-sum-exp.
        max_pairs: at most this many sampled pairs (a random subset of all pairs).
        background_ratio: background pairs drawn per correspondence.
    """

    correspondence_radius: float = 0.01
    correspondence_k: int = 5
    pos_radius: float = 0.011
    safe_radius: float = 0.02
    pos_optimal: float = 0.1
    neg_optimal: float = 1.4
    pos_margin: float = 0.1
    neg_margin: float = 1.4
    log_scale: float = 16.0
    max_pairs: int = 256
    background_ratio: float = 0.1


# ---------------------------------------------------------------------------------------------
# Flow and reprojection (docs/method.md §2.11)
# ---------------------------------------------------------------------------------------------


@dataclass
class FlowTargets:
    """Ground-truth flow of one inner step on the rendered reference.

    Attributes:
        relative_gt: (B, 4, 4) T_gt·Ti⁻¹, the relative pose that would align the render (detached).
        flow: (B, 2, H, W) float32 ground-truth flow π(K, G·X0) − (x, y), pixels.
        valid: (B, H, W) bool: reference depth and both transformed depths (under the ground-truth
            and under the predicted relative pose) above :data:`FLOW_MIN_DEPTH`.
        lifted: (B, H, W, 3) reference points X0, metres.
    """

    relative_gt: Tensor
    flow: Tensor
    valid: Tensor
    lifted: Tensor


def relative_target(T_gt: Tensor, Ti: Tensor) -> Tensor:
    """(B, 4, 4) detached T_gt·Ti⁻¹ (closed-form inverse, float32 product as published)."""
    return (T_gt @ se3_inverse(Ti)).detach()


def _induced(lifted: Tensor, T: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """(flow (B, H, W, 2), transformed depth (B, H, W)) of reference points under T."""
    batch, height, width, _ = lifted.shape
    moved = transform_points(T, lifted.flatten(1, 2))
    pixels = project_points(moved, K).reshape(batch, height, width, 2)
    grid = pixel_grid(height, width, pixels.dtype, pixels.device)
    return pixels - grid, moved[..., 2].reshape(batch, height, width)


def flow_targets(depth: Tensor, K: Tensor, Ti: Tensor, T_gt: Tensor, relative_pred: Tensor) -> FlowTargets:
    """Ground-truth flow and validity of one inner step.

    Args:
        depth: (B, H, W) rendered reference depth at Ti, metres, 0 = background.
        K: (B, 3, 3) intrinsics of the reference crop.
        Ti: (B, 4, 4) render pose; T_gt: (B, 4, 4) ground-truth pose.
        relative_pred: (B, 4, 4) the predicted relative pose of this step: published, its depth
            test enters the mask too.
    """
    relative_gt = relative_target(T_gt, Ti)
    lifted = backproject_depth(depth + DEPTH_EPSILON, K)
    flow, z_gt = _induced(lifted, relative_gt, K)
    with torch.no_grad():
        _, z_pred = _induced(lifted, relative_pred.detach(), K)
    z0 = lifted[..., 2]
    valid = (z0 > FLOW_MIN_DEPTH) & (z_gt > FLOW_MIN_DEPTH) & (z_pred > FLOW_MIN_DEPTH)
    return FlowTargets(relative_gt, flow.permute(0, 3, 1, 2).detach(), valid, lifted)


def flow_loss(flow_pred: Tensor, targets: FlowTargets, max_flow: float = MAX_FLOW) -> tuple[Tensor, Tensor]:
    """L1 flow loss: mean over **all** B·2·H·W elements of valid·|pred − gt| (published).

    Args:
        flow_pred: (B, 2, H, W) predicted flow, crop pixels.
        targets: from :func:`flow_targets`.
        max_flow: ground-truth flows at least this long (pixels) are excluded.

    Returns:
        ``(loss () float32, valid (B, H, W) bool)``: the pixels that entered the loss.
    """
    if flow_pred.shape != targets.flow.shape:
        raise LossInputError(f"flow_pred {tuple(flow_pred.shape)} != targets {tuple(targets.flow.shape)}")
    valid = targets.valid & (targets.flow.square().sum(1).sqrt() < max_flow)
    loss = (valid[:, None].to(flow_pred.dtype) * (flow_pred - targets.flow).abs()).mean()
    return loss, valid


def flow_metrics(flow_pred: Tensor, targets: FlowTargets, valid: Tensor) -> dict[str, float]:
    """End-point error (pixels) over ``valid`` and the fractions within 1, 3 and 5 px."""
    with torch.no_grad():
        epe = (flow_pred - targets.flow).square().sum(1).sqrt()[valid]
        if epe.numel() == 0:
            return {"epe": float("nan"), "1px": float("nan"), "3px": float("nan"), "5px": float("nan")}
        return {
            "epe": float(epe.mean()),
            "1px": float((epe < 1).float().mean()),
            "3px": float((epe < 3).float().mean()),
            "5px": float((epe < 5).float().mean()),
        }


def reprojection_loss(relative_pred: Tensor, targets: FlowTargets, K: Tensor) -> Tensor:
    """Mean over B·H·W·2 of valid·clamp(|flow(T_pred) − flow_gt|, ±100) (published weight 0).

    Args:
        relative_pred: (B, 4, 4) predicted relative pose (gradients flow into it).
        targets: from :func:`flow_targets`; K: (B, 3, 3) crop intrinsics.
    """
    flow, _ = _induced(targets.lifted, relative_pred, K)
    error = (flow - targets.flow.permute(0, 2, 3, 1)).abs().clamp(-REPROJ_CLAMP, REPROJ_CLAMP)
    return (targets.valid[..., None].to(error.dtype) * error).mean()


# ---------------------------------------------------------------------------------------------
# Point alignment
# ---------------------------------------------------------------------------------------------


def point_alignment_loss(points: Tensor, pose_pred: Tensor, pose_gt: Tensor) -> Tensor:
    """Per-sample mean L1 norm ‖T_pred·p − T_gt·p‖₁ over the model points, metres.

    Args:
        points: (N, 3) or (B, N, 3) model points, metres (raw, not normalised).
        pose_pred: (B, 4, 4) predicted pose (Tij·Ti); pose_gt: (B, 4, 4) target ((T_gt·Ti⁻¹)·Ti).

    Returns:
        (B,) float32 losses; the published loss is their sum (it used batch element 0 only).
    """
    difference = transform_points(pose_pred, points) - transform_points(pose_gt, points)
    return 3.0 * difference.abs().flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# Circle (descriptor) loss
# ---------------------------------------------------------------------------------------------


@dataclass
class DescriptorCorrespondences:
    """Ground-truth 2D–3D matches of one sample (the published data pre-processing).

    Attributes:
        model_points: (N, 3) float32 vertices, normalised (centred, largest bbox side 1).
        lifted_points: (P, 3) float32 foreground pixels lifted into the normalised model frame,
            row-major pixel order.
        pixels: (P, 2) int64 (x, y) of those pixels.
        matches: (M, 2) int64 [index into lifted_points, vertex index], ≤ k per pixel, nearest first.
    """

    model_points: np.ndarray
    lifted_points: np.ndarray
    pixels: np.ndarray
    matches: np.ndarray


def normalised_pose(pose: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(3, 4) float32 pose of the centred model: t ← R·mean + t (rotation unchanged, no scale)."""
    pose = np.asarray(pose, dtype=np.float32)
    R, t = pose[:3, :3], pose[:3, 3]
    return np.concatenate([R, (R @ mean + t)[:, None]], 1).astype(np.float32)


def lift_depth_to_model(
    depth: np.ndarray, K: np.ndarray, pose_normalised: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lift foreground pixels into the normalised model frame (pixel centres, float64 lifting).

    Args:
        depth: (H, W) float64 ground-truth depth, metres, 0 = background.
        K: (3, 3) intrinsics; pose_normalised: (3, 4) from :func:`normalised_pose`; scale: metres.

    Returns:
        ``(lifted (P, 3) float32, pixels (P, 2) int64 (x, y))`` in row-major order.
    """
    rows, cols = np.nonzero(depth)
    z = np.asarray(depth, dtype=np.float64)[rows, cols]
    # Pixel centres (x + 0.5, y + 0.5): the published lifting differs by half a pixel from the flow
    # code's integer convention; the fixtures keep it.
    xy = np.stack([cols, rows], 1).astype(np.float32) + np.float32(0.5)
    xy = (xy * z[:, None]).astype(np.float32)
    camera = (np.concatenate([xy, z[:, None]], 1) @ np.linalg.inv(np.asarray(K, np.float64)).T).astype(
        np.float32
    )
    R, t = pose_normalised[:, :3].astype(np.float32), pose_normalised[:, 3].astype(np.float32)
    lifted = ((camera - t) @ R) / np.float32(scale)
    return lifted.astype(np.float32), np.stack([cols, rows], 1).astype(np.int64)


def radius_matches(queries: np.ndarray, supports: np.ndarray, radius: float, k: int) -> np.ndarray:
    """(M, 2) int64 [query, support] pairs: for every query in order, the ≤ k supports within
    ``radius`` sorted by increasing distance (float64 search)."""
    tree = cKDTree(np.asarray(supports, np.float64))
    q64 = np.asarray(queries, np.float64)
    pairs = []
    for i, found in enumerate(tree.query_ball_point(q64, radius)):
        if not found:
            continue
        found = np.asarray(found, dtype=np.int64)
        distances = np.square(np.asarray(supports, np.float64)[found] - q64[i]).sum(1)
        nearest = found[np.argsort(distances, kind="stable")[:k]]
        pairs.append(np.stack([np.full(len(nearest), i, np.int64), nearest], 1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


def descriptor_correspondences(
    vertices: np.ndarray,
    depth: np.ndarray,
    K: np.ndarray,
    pose: np.ndarray,
    config: CircleConfig = CircleConfig(),
) -> DescriptorCorrespondences:
    """Ground-truth 2D–3D matches of one sample from its ground-truth depth.

    Args:
        vertices: (N, 3) model vertices, metres.
        depth: (H, W) ground-truth depth of the crop, metres, 0 = background (float64 as read).
        K: (3, 3) crop intrinsics; pose: (3, 4) or (4, 4) ground-truth pose, model → camera.
    """
    points = np.asarray(vertices, dtype=np.float32)
    mean = points.mean(axis=0)
    centred = points - mean
    scale = np.max(centred.max(axis=0) - centred.min(axis=0))
    model_points = (centred / scale).astype(np.float32)
    lifted, pixels = lift_depth_to_model(depth, K, normalised_pose(np.asarray(pose)[:3], mean), float(scale))
    matches = radius_matches(lifted, model_points, config.correspondence_radius, config.correspondence_k)
    return DescriptorCorrespondences(model_points, lifted, pixels, matches)


@dataclass
class DescriptorPairs:
    """The sampled pairs of one circle-loss evaluation.

    Attributes:
        pairs: (S, 2) int64 [source row, target row] after background pairs and sub-sampling.
        background_draw: (n,) int64 background indices drawn (with replacement).
        permutation: (n_pairs,) int64 permutation drawn to sub-sample, empty if none was needed.
    """

    pairs: np.ndarray
    background_draw: np.ndarray
    permutation: np.ndarray


def sample_descriptor_pairs(
    matches: np.ndarray,
    num_foreground: int,
    num_vertices: int,
    num_background: int,
    rng: np.random.RandomState | np.random.Generator,
    config: CircleConfig = CircleConfig(),
    replay: tuple[np.ndarray, np.ndarray] | None = None,
) -> DescriptorPairs:
    """Append background pairs and sub-sample to at most ``config.max_pairs``.

    The published code draws from numpy's global legacy generator: ``randint(0, n_bg,
    int(0.1·M))`` then, if there are more than ``max_pairs`` pairs, ``permutation(n_pairs)``. With a
    :class:`numpy.random.RandomState` seeded like it, the draws are identical; ``replay`` =
    (background_draw, permutation) reuses recorded draws instead.

    Args:
        matches: (M, 2) [foreground pixel, vertex] matches.
        num_foreground, num_vertices, num_background: sizes of the sides (source = foreground then
            background pixels; target = vertices then background pixels).
    """
    count = int(len(matches) * config.background_ratio)
    if replay is not None:
        draw = np.asarray(replay[0], dtype=np.int64)
    elif isinstance(rng, np.random.RandomState):
        draw = rng.randint(0, num_background, size=count).astype(np.int64)
    else:
        draw = rng.integers(0, num_background, size=count).astype(np.int64)
    if len(draw) and num_background == 0:
        raise LossInputError("background pairs requested but the crop has no background pixel")
    background = np.stack([num_foreground + draw, num_vertices + draw], 1)
    pairs = np.concatenate([np.asarray(matches, np.int64).reshape(-1, 2), background])
    permutation = np.zeros(0, np.int64)
    if len(pairs) > config.max_pairs:
        if replay is not None:
            permutation = np.asarray(replay[1], dtype=np.int64)
        else:
            permutation = np.asarray(rng.permutation(len(pairs)), dtype=np.int64)
        pairs = pairs[permutation[: config.max_pairs]]
    return DescriptorPairs(pairs, draw, permutation)


def pair_distance(a: Tensor, b: Tensor) -> Tensor:
    """(S, S) Euclidean distances between rows of a and b, computed exactly (float64 differences).

    The published code expands |a|² + |b|² − 2a·b in float32, which cancels to exactly 0 for two
    background points (both at 10⁷) on its CPU but not under other accumulation orders (TF32, other
    GEMMs); the direct differences give that 0 on every device, so background pairs are always
    mutual positives as published. The result is clamped like the published one (≥ 1e-6).
    """
    difference = a.double()[:, None, :] - b.double()[None, :, :]
    return difference.square().sum(-1).clamp_min(1e-12).sqrt().to(a.dtype)


def descriptor_distance(a: Tensor, b: Tensor) -> Tensor:
    """(S, S) √(2 − 2·a·b) between unit descriptors (clamped ≥ 1e-6), float32, differentiable."""
    return (2.0 - 2.0 * (a @ b.transpose(0, 1))).clamp_min(1e-12).sqrt()


def circle_loss(coords_dist: Tensor, feats_dist: Tensor, config: CircleConfig = CircleConfig()) -> Tensor:
    """Circle loss of one (S, S) pair matrix (rows: source descriptors, columns: target).

    Positives are pairs closer than ``pos_radius``, negatives farther than ``safe_radius``. Masked
    entries get weight 0 and so contribute exp(0) = 1 to the log-sum-exp (published, not −∞); the
    weights are detached. Rows and columns without both a positive and a negative are left out.
    """
    pos = coords_dist < config.pos_radius
    neg = coords_dist > config.safe_radius
    row_sel = pos.any(1) & neg.any(1)
    col_sel = pos.any(0) & neg.any(0)
    pos_weight = (feats_dist - 1e5 * (~pos).to(feats_dist.dtype) - config.pos_optimal).clamp_min(0).detach()
    neg_weight = (config.neg_optimal - (feats_dist + 1e5 * (~neg).to(feats_dist.dtype))).clamp_min(0).detach()
    pos_logits = config.log_scale * (feats_dist - config.pos_margin) * pos_weight
    neg_logits = config.log_scale * (config.neg_margin - feats_dist) * neg_weight
    loss_row = F.softplus(torch.logsumexp(pos_logits, 1) + torch.logsumexp(neg_logits, 1)) / config.log_scale
    loss_col = F.softplus(torch.logsumexp(pos_logits, 0) + torch.logsumexp(neg_logits, 0)) / config.log_scale
    return (loss_row[row_sel].mean() + loss_col[col_sel].mean()) / 2


def descriptor_recall(
    coords_dist: Tensor, feats_dist: Tensor, config: CircleConfig = CircleConfig()
) -> Tensor:
    """Fraction of rows with a positive whose nearest descriptor (column) is a positive."""
    with torch.no_grad():
        pos = coords_dist < config.pos_radius
        has_pos = pos.any(1)
        nearest = feats_dist.argmin(1)
        hit = coords_dist.gather(1, nearest[:, None])[:, 0] < config.pos_radius
        return hit[has_pos].float().sum() / (has_pos.float().sum() + 1e-12)


@dataclass
class CircleTerms:
    """One circle-loss evaluation.

    Attributes:
        loss: () float32 circle loss; recall: () float32 descriptor recall.
        coords_dist, feats_dist: (S, S) float32 pair distances (normalised units / descriptor).
        pairs: the sampled pairs.
    """

    loss: Tensor
    recall: Tensor
    coords_dist: Tensor
    feats_dist: Tensor
    pairs: DescriptorPairs


def descriptor_loss(
    descriptor_map: Tensor,
    descriptors_3d: Tensor,
    foreground: Tensor,
    correspondences: DescriptorCorrespondences,
    rng: np.random.RandomState | np.random.Generator,
    config: CircleConfig = CircleConfig(),
    replay: tuple[np.ndarray, np.ndarray] | None = None,
) -> CircleTerms:
    """Circle loss of one sample between its 2D descriptor map and its 3D vertex descriptors.

    Source side: descriptors of the foreground pixels (coordinates: lifted points) then of the
    background pixels (coordinate 10⁷); target side: the vertex descriptors (coordinates: normalised
    vertices) then the **same** background descriptors (published).

    Args:
        descriptor_map: (32, H, W) float32 unit 2D descriptors of the crop.
        descriptors_3d: (N, 32) float32 unit vertex descriptors.
        foreground: (H, W) bool: depth > 0 (must match ``correspondences.pixels``).
        correspondences: from :func:`descriptor_correspondences` on the same crop.
        rng, config, replay: see :func:`sample_descriptor_pairs`.
    """
    if len(correspondences.matches) == 0:
        raise LossInputError("no 2D–3D correspondence in the crop: the circle loss is undefined")
    device = descriptor_map.device
    fg_rows, fg_cols = torch.nonzero(foreground, as_tuple=True)
    bg_rows, bg_cols = torch.nonzero(~foreground, as_tuple=True)
    if len(fg_rows) != len(correspondences.lifted_points):
        raise LossInputError(
            f"{len(fg_rows)} foreground pixels but {len(correspondences.lifted_points)} lifted points"
        )
    fg_feats = descriptor_map[:, fg_rows, fg_cols].transpose(0, 1)
    bg_feats = descriptor_map[:, bg_rows, bg_cols].transpose(0, 1)
    num_fg, num_bg, num_vertices = len(fg_rows), len(bg_rows), len(descriptors_3d)
    sampled = sample_descriptor_pairs(
        correspondences.matches, num_fg, num_vertices, num_bg, rng, config, replay
    )
    pairs = torch.from_numpy(sampled.pairs).to(device)
    src_is_fg, tgt_is_vertex = pairs[:, 0] < num_fg, pairs[:, 1] < num_vertices
    lifted = torch.from_numpy(correspondences.lifted_points).to(device)
    model = torch.from_numpy(correspondences.model_points).to(device)
    far = torch.full((3,), BACKGROUND_COORDINATE, dtype=torch.float32, device=device)
    src_pcd = torch.where(src_is_fg[:, None], lifted[pairs[:, 0].clamp_max(num_fg - 1)], far)
    tgt_pcd = torch.where(tgt_is_vertex[:, None], model[pairs[:, 1].clamp_max(num_vertices - 1)], far)
    src_feats = torch.cat([fg_feats, bg_feats])[pairs[:, 0]]
    tgt_feats = torch.cat([descriptors_3d, bg_feats])[pairs[:, 1]]
    coords = pair_distance(src_pcd, tgt_pcd)
    feats = descriptor_distance(src_feats, tgt_feats)
    return CircleTerms(
        loss=circle_loss(coords, feats, config),
        recall=descriptor_recall(coords, feats, config),
        coords_dist=coords,
        feats_dist=feats,
        pairs=sampled,
    )
