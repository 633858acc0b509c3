"""Per-pixel lookups on a rendered batch: vertex attributes and nearest-vertex depth (docs/method.md §1.4.3).

A render gives, per pixel, the visible face (−1 on background) and its barycentrics. Everything the
learned backend needs from it is a gather from per-vertex tables; here the B instances' tables are
concatenated once per frame (:class:`SurfaceTable`) so that each lookup is a fixed number of batched
tensor operations, with no data-dependent shapes (no ``nonzero``) and hence no host synchronisation:
background pixels gather vertex 0 with zero weight.

The 256 context channels only initialise the GRU, on the flow grid (H/8 × W/8) through a bilinear
``align_corners=True`` resampling of the rendered context map. :func:`coarse_context` therefore
evaluates them only at the pixels that resampling reads (about 1/16 of the crop), then applies the
resampling weights, instead of interpolating 256 channels over the whole crop.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SurfaceTable:
    """The per-vertex tables of B instances, concatenated (built once per frame).

    Attributes:
        faces: (B, Fmax, 3) int64 rows of ``vertices`` (instance b's faces offset by its first row;
            padding faces point at row 0 and are never visible).
        vertices: (V, 3) float64 model-frame vertices of all instances, metres.
        context: (V, Cc) per-vertex context features (float32; gradients flow to the sources).
        descriptors: (V, Cd) per-vertex descriptors.
    """

    faces: Tensor
    vertices: Tensor
    context: Tensor
    descriptors: Tensor

    @classmethod
    def build(
        cls,
        faces: Sequence[Tensor],
        vertices: Sequence[Tensor],
        attributes: Sequence[Tensor],
        instance_object: Sequence[int],
        split: int,
    ) -> SurfaceTable:
        """Concatenate the tables of the distinct objects of a batch once each.

        Args:
            faces, vertices, attributes: per distinct object, (F_o, 3) int64 faces, (N_o, 3) vertices
                and (N_o, C) attributes.
            instance_object: for each of the B instances, the index of its object.
            split: attribute channels [0, split) are the context, [split, C) the descriptors.
        """
        sizes = [len(v) for v in vertices]
        offsets = [sum(sizes[:o]) for o in range(len(sizes))]
        longest = max(len(faces[o]) for o in instance_object)
        padded = faces[0].new_zeros(len(instance_object), longest, 3)
        for b, o in enumerate(instance_object):
            padded[b, : len(faces[o])] = faces[o] + offsets[o]
        table = torch.cat(list(attributes))
        return cls(
            faces=padded,
            vertices=torch.cat(list(vertices)).to(torch.float64),
            context=table[:, :split].contiguous(),
            descriptors=table[:, split:].contiguous(),
        )


@dataclass
class PixelCorners:
    """The surface under every pixel of a (B, H, W) render.

    Attributes:
        vertex: (B, H·W, 3) int64 table rows of the visible face's corners (0 on background).
        weight: (B, H·W, 3) barycentrics, 0 on background.
        foreground: (B, H·W) bool.
    """

    vertex: Tensor
    weight: Tensor
    foreground: Tensor


def pixel_corners(face_index: Tensor, barycentric: Tensor, table: SurfaceTable) -> PixelCorners:
    """Corners and weights of every pixel from a render's (B, H, W) face index (−1 = background) and
    (B, H, W, 3) barycentrics."""
    batch = face_index.shape[0]
    faces = face_index.reshape(batch, -1)
    foreground = faces >= 0
    vertex = torch.gather(table.faces, 1, faces.clamp_min(0)[..., None].expand(-1, -1, 3))
    weight = barycentric.reshape(batch, -1, 3).to(table.descriptors.dtype) * foreground[..., None]
    return PixelCorners(vertex, weight, foreground)


def interpolate(values: Tensor, vertex: Tensor, weight: Tensor) -> Tensor:
    """Σ_k w_k·values[vertex_k]: (V, C) table, (B, P, 3) rows and weights → (B, P, C).

    One corner at a time: peak memory (B, P, C) instead of (B, P, 3, C).
    """
    out = values[vertex[..., 0]] * weight[..., 0:1]
    out = out.addcmul(values[vertex[..., 1]], weight[..., 1:2])
    return out.addcmul(values[vertex[..., 2]], weight[..., 2:3])


def pixel_descriptors(corners: PixelCorners, table: SurfaceTable, height: int, width: int) -> Tensor:
    """(B, Cd, H, W) interpolated descriptors, 0 on background."""
    values = interpolate(table.descriptors, corners.vertex, corners.weight)
    return values.reshape(values.shape[0], height, width, -1).permute(0, 3, 1, 2)


def nearest_vertex_depth(
    corners: PixelCorners, table: SurfaceTable, poses: Tensor, height: int, width: int
) -> Tensor:
    """(B, H, W) float32 published depth: camera z (float64 under ``poses`` (B, 4, 4)) of the corner
    with the largest barycentric weight, metres, 0 on background."""
    nearest = corners.vertex.gather(-1, corners.weight.argmax(-1, keepdim=True))[..., 0]  # (B, P)
    poses = poses.to(torch.float64)
    z = (table.vertices[nearest] * poses[:, None, 2, :3]).sum(-1) + poses[:, None, 2, 3]
    return (z * corners.foreground).to(torch.float32).reshape(-1, height, width)


def coarse_context(
    corners: PixelCorners, table: SurfaceTable, height: int, width: int, coarse: tuple[int, int], scale: float
) -> Tensor:
    """(B, Cc, h, w) ``F.interpolate(scale·context_map, coarse, bilinear, align_corners=True)`` of the
    rendered context map, evaluated only at the (H, W) pixels that the resampling reads."""
    rows, row_weights = _resampling(height, coarse[0], corners.vertex.device)
    cols, col_weights = _resampling(width, coarse[1], corners.vertex.device)
    pixels = (rows[:, None] * width + cols[None, :]).reshape(-1)  # (R·C,)
    batch = corners.vertex.shape[0]
    sampled = interpolate(table.context, corners.vertex[:, pixels], corners.weight[:, pixels])
    sampled = (scale * sampled).reshape(batch, len(rows), len(cols), -1)
    return torch.einsum("ir,brsc,js->bcij", row_weights, sampled, col_weights)


@functools.lru_cache(maxsize=16)
def _resampling(size: int, coarse: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Source rows read by a bilinear ``align_corners=True`` resampling from ``size`` to ``coarse``
    samples, and its (coarse, rows) float32 weight matrix (torch's index and weight arithmetic)."""
    # Normal tensors even when first asked for under inference mode, so that autograd may save them.
    with torch.inference_mode(False), torch.no_grad():
        scale = torch.tensor((size - 1) / (coarse - 1) if coarse > 1 else 0.0, dtype=torch.float32)
        source = scale * torch.arange(coarse, dtype=torch.float32)
        lower = source.to(torch.int64).clamp_max(size - 1)
        upper = (lower + 1).clamp_max(size - 1)
        upper_weight = source - lower.to(torch.float32)
        rows = torch.unique(torch.cat((lower, upper)))
        weights = torch.zeros(coarse, len(rows), dtype=torch.float32)
        position = {int(r): i for i, r in enumerate(rows)}
        for i in range(coarse):
            weights[i, position[int(lower[i])]] += 1.0 - upper_weight[i]
            weights[i, position[int(upper[i])]] += upper_weight[i]
        return rows.to(device), weights.to(device)
