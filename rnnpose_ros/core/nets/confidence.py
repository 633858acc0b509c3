"""Descriptor-agreement confidence of dense correspondences (docs/method.md §1.5 step 5).

For every reference pixel p = (x, y) with flow F(p), the target is x* = p + F(p). The observed
2D descriptor map is sampled bilinearly at x*, compared with the rendered 3D descriptor at p by
a dot product s, and the weight is w = exp(−|1 − s| / σ) on rendered foreground, 0 elsewhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rnnpose_ros.core.geometry import pixel_grid


class ConfidenceInputError(ValueError):
    """Descriptor maps, flow and depth with inconsistent shapes."""


class Confidence(NamedTuple):
    """Result of :func:`descriptor_confidence` (B batch, H×W reference pixels).

    ``target``: (B, H, W, 2) float32 correspondence targets x* in pixels (x, y).
    ``warped_observed``: (B, C, H, W) observed descriptors sampled at the targets.
    ``similarity``: (B, H, W) dot products s (no re-normalisation after interpolation).
    ``weight``: (B, H, W) weights in [0, 1], 0 where the rendered depth is 0.
    """

    target: torch.Tensor
    warped_observed: torch.Tensor
    similarity: torch.Tensor
    weight: torch.Tensor


def correspondence_target(flow: torch.Tensor) -> torch.Tensor:
    """Targets x* = (x + F_x, y + F_y) of a (B, 2, H, W) flow, as (B, H, W, 2) pixels."""
    return pixel_grid(*flow.shape[-2:], flow.dtype, flow.device) + flow.permute(0, 2, 3, 1)


def sample_at_pixels(
    features: torch.Tensor, target: torch.Tensor, published_conventions: bool
) -> torch.Tensor:
    """Bilinearly sample (B, C, H, W) ``features`` at (B, h, w, 2) pixel positions, zero outside.

    Positions are normalised as 2·x/(W−1) − 1. With ``published_conventions`` they are then
    sampled with ``align_corners=False`` as the published code does, which shifts the lookup by
    up to half a pixel (docs/method.md §1.8); otherwise with ``align_corners=True``, which samples exactly
    at x* under the pixel-centres-at-integers convention.
    """
    height, width = features.shape[-2:]
    gx = 2 * target[..., 0] / (width - 1) - 1
    gy = 2 * target[..., 1] / (height - 1) - 1
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(
        features, grid, mode="bilinear", padding_mode="zeros", align_corners=not published_conventions
    )


def descriptor_confidence(
    rendered_descriptors: torch.Tensor,
    observed_descriptors: torch.Tensor,
    flow: torch.Tensor,
    rendered_depth: torch.Tensor,
    sigma: torch.Tensor | float,
    published_conventions: bool = True,
) -> Confidence:
    """Per-pixel confidence of the correspondences p → p + F(p).

    Args:
        rendered_descriptors: (B, C, H, W) float32 rendered 3D descriptors (unit norm, 0 on background).
        observed_descriptors: (B, C, H, W) float32 observed 2D descriptors on the same crop.
        flow: (B, 2, H, W) float32 flow in crop pixels (channel 0 = x).
        rendered_depth: (B, H, W) or (B, 1, H, W) rendered depth in metres, 0 = background.
        sigma: positive temperature σ (scalar tensor of shape () or (1,), learned: ``motion_net.sigma.0``).
        published_conventions: sample as the published code (see :func:`sample_at_pixels`).

    Returns:
        :class:`Confidence`.
    """
    batch, _, height, width = rendered_descriptors.shape
    if observed_descriptors.shape != rendered_descriptors.shape or flow.shape != (batch, 2, height, width):
        raise ConfidenceInputError(
            f"shapes disagree: rendered {tuple(rendered_descriptors.shape)}, observed "
            f"{tuple(observed_descriptors.shape)}, flow {tuple(flow.shape)}"
        )
    if rendered_depth.dim() == 4:
        rendered_depth = rendered_depth.squeeze(1)
    if rendered_depth.shape != (batch, height, width):
        raise ConfidenceInputError(
            f"depth shape {tuple(rendered_depth.shape)} does not match {(batch, height, width)}"
        )
    target = correspondence_target(flow)
    warped = sample_at_pixels(observed_descriptors, target, published_conventions)
    similarity = (rendered_descriptors * warped).sum(dim=1)
    sigma = torch.as_tensor(sigma, dtype=similarity.dtype, device=similarity.device).reshape(())
    weight = torch.exp(-(1 - similarity).abs() / sigma) * (rendered_depth > 0).to(similarity.dtype)
    return Confidence(target, warped, similarity, weight)
