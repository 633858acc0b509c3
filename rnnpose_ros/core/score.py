"""The refiner's score: a confidence in [0, 1] that a refined pose is right, comparable between objects.

Evidence comes from the last render iteration. Its reference pixels p (rendered depth above the
solver's ``min_depth``; N of them) lift to X0_p and, under the final relative pose T_rel, project to
π(K, T_rel·X0_p). Every inner step k of that iteration gave a correspondence target x*_kp with a
confidence weight w_kp ∈ [0, 1] (classical: forward–backward consistency of the region and the
relit-texture flow; learned: the descriptor-similarity weight). Over all steps:

    A = Σ_k Σ_p w_kp · [‖x*_kp − π(K, T_rel·X0_p)‖ < τ]      (confident evidence that agrees)
    W = Σ_k Σ_p w_kp                                          (confident evidence)
    image = A / max(W, κ · K·N)                               (τ = ``inlier_px``, κ = MIN_EVIDENCE_SHARE)

``image`` is the share of the confident evidence that the pose explains. Pixels whose correspondence
is not confident — hidden by an occluder (the flow there is inconsistent forwards and backwards),
without texture or outside the image — count neither for nor against the pose, so a correctly posed
object scores high whether it is plain, textured or partly hidden. The floor κ·N keeps a handful of
confident pixels from confirming a pose: below κ of the silhouette's pixels per step, missing evidence
counts as disagreement.

RGB only: score = image. With a depth image (:mod:`rnnpose_ros.core.depth_term`):

    score = agreement · (1 − s + s · image),     s = IMAGE_SHARE_WITH_DEPTH

``agreement`` being the share of the visible rendered surface that the observed depth confirms within
its noise (pixels behind a nearer occluder excluded). Depth is the stronger, object-independent
evidence; the image part separates poses depth cannot (e.g. a box turned about its face normal).

Meaning, measured on synthetic scenes of three textured meshes with and without occluders (README):
converged results score ≳ 0.8 (median > 0.9), results outside ADD(-S)@0.1d mostly below.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rnnpose_ros.core.depth_term import DepthTerm
from rnnpose_ros.core.geometry import backproject_depth, project_points
from rnnpose_ros.core.loop import Correspondences

# Share of the rendered silhouette (per inner step) that the confident correspondences must weigh for
# their agreement to count fully; less confident evidence than that counts as disagreement. It sits
# low because a flat, weakly textured face (a box) gives confident flow on only 9–25 % of its pixels
# even at the right pose (README, "RGB-D": how it was chosen).
MIN_EVIDENCE_SHARE = 0.2
# Score with depth: the share of the image agreement beside the depth agreement.
IMAGE_SHARE_WITH_DEPTH = 0.25


def pose_score(
    depth: Tensor,
    K: Tensor,
    steps: Sequence[Correspondences],
    relative: Tensor,
    depth_term: DepthTerm | None,
    inlier_px: float,
    min_depth: float,
) -> Tensor:
    """(B,) float64 score in [0, 1] of the final poses (module docstring).

    Args:
        depth: (B, h, w) rendered reference depth of the last render iteration, metres.
        K: (B, 3, 3) intrinsics of its crop.
        steps: the correspondences of every inner step of that iteration (targets (B, h, w, 2) crop
            pixels, weights (B, h, w) in [0, 1]).
        relative: (B, 4, 4) final pose relative to the render pose.
        depth_term: the iteration's depth term, None without a depth image.
        inlier_px: τ, crop pixels.
        min_depth: reference pixels at or below this depth (metres) are background.
    """
    batch = depth.shape[0]
    rel = relative.to(torch.float64)
    K64 = K.to(torch.float64)
    X0 = backproject_depth(depth.to(torch.float64), K64).reshape(batch, -1, 3)
    pixels = project_points(X0 @ rel[:, :3, :3].transpose(-1, -2) + rel[:, None, :3, 3], K64)
    foreground = depth.reshape(batch, -1) > min_depth
    agreeing = torch.zeros(batch, dtype=torch.float64, device=depth.device)
    evidence = torch.zeros_like(agreeing)
    for corr in steps:
        residual = torch.linalg.vector_norm(
            corr.target.reshape(batch, -1, 2).to(torch.float64) - pixels, dim=-1
        )
        weight = corr.weight.reshape(batch, -1).to(torch.float64).clamp(0.0, 1.0) * foreground
        agreeing = agreeing + (weight * (residual < inlier_px)).sum(-1)
        evidence = evidence + weight.sum(-1)
    floor = MIN_EVIDENCE_SHARE * len(steps) * foreground.sum(-1)
    image = agreeing / torch.maximum(evidence, floor).clamp_min(1e-12)
    if depth_term is None:
        return image.clamp(0.0, 1.0)
    agreement, _ = depth_term.agreement(relative)
    return (agreement * (1.0 - IMAGE_SHARE_WITH_DEPTH + IMAGE_SHARE_WITH_DEPTH * image)).clamp(0.0, 1.0)
