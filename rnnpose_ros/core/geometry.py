"""Rigid-body geometry and pinhole camera helpers (batched torch, any device).

Conventions (docs/method.md §1.7): poses are 4×4 model→camera matrices (OpenCV camera: x right, y down,
z forward), metres. Twists are δ = (v_x, v_y, v_z, ω_x, ω_y, ω_z), translation first, and updates
multiply on the left: T ← exp(δ^)·T. Pixel (x = column, y = row) has the integer coordinate (x, y).

Every function accepts any leading batch dimensions ``...`` and never synchronises with the host.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this rotation angle the exp/log coefficients use their Taylor series (docs/method.md §2.10).
SE3_TAYLOR_THRESHOLD = 1e-4
# Default minimum depth of the projection (docs/method.md §1.7): Z is clamped to at least this, metres.
PROJECTION_MIN_DEPTH = 0.01


class GeometryInputError(ValueError):
    """Inputs of a geometry function have inconsistent shapes."""


def skew(v: Tensor) -> Tensor:
    """Cross-product matrix [v]× such that [v]×·u = v × u.

    Args:
        v: (..., 3) vectors.

    Returns:
        (..., 3, 3) skew-symmetric matrices, same dtype/device as ``v``.
    """
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    rows = (
        torch.stack((zero, -z, y), -1),
        torch.stack((z, zero, -x), -1),
        torch.stack((-y, x, zero), -1),
    )
    return torch.stack(rows, -2)


def _vee(W: Tensor) -> Tensor:
    """Inverse of :func:`skew` applied to the antisymmetric part ``W − Wᵀ`` (not halved): (..., 3)."""
    return torch.stack(
        (W[..., 2, 1] - W[..., 1, 2], W[..., 0, 2] - W[..., 2, 0], W[..., 1, 0] - W[..., 0, 1]), -1
    )


def _safe_norm(v: Tensor) -> Tensor:
    """Euclidean norm over the last axis whose gradient is finite (zero) at v = 0."""
    sq = (v * v).sum(-1)
    nonzero = sq > 0
    return torch.where(
        nonzero, torch.sqrt(torch.where(nonzero, sq, torch.ones_like(sq))), torch.zeros_like(sq)
    )


def se3_exp(xi: Tensor) -> Tensor:
    """Closed-form SE(3) exponential of a translation-first twist.

    R = I + A·W + B·W², t = (I + B·W + C·W²)·v with W = [ω]×, θ = ‖ω‖ (Taylor branch for θ < 1e-4).
    Evaluated in the input dtype, as the published code does: in float32 the coefficient C loses
    most of its digits just above the Taylor switch (about 1e-6 m of translation error at θ ≈ 1e-4),
    and the golden fixture records exactly that. Pass float64 twists where that matters. The three
    coefficients and both matrices are formed together, in a fixed small number of tensor operations
    (it runs after every inner step).

    Args:
        xi: (..., 6) twists (v in metres, ω in radians), floating point.

    Returns:
        (..., 4, 4) homogeneous transforms, dtype of ``xi``.
    """
    dtype, device = xi.dtype, xi.device
    v, omega = xi[..., :3], xi[..., 3:]
    theta_sq = (omega * omega).sum(-1, keepdim=True)  # (..., 1)
    small = theta_sq < SE3_TAYLOR_THRESHOLD**2
    # A safe angle keeps the unused branch finite so that gradients through torch.where stay finite.
    t = torch.sqrt(torch.where(small, 1.0, theta_sq))
    sin_t = torch.sin(t)
    exact = torch.cat((sin_t, 1.0 - torch.cos(t), t - sin_t), -1) / t ** _EXP_POWERS.to(
        dtype=dtype, device=device
    )
    series = _EXP_SERIES.to(dtype=dtype, device=device)
    coefficients = torch.where(small, series[0] - theta_sq * series[1], exact)  # (..., 3): A, B, C
    W = (omega @ _SKEW_GENERATORS.to(dtype=dtype, device=device)).unflatten(-1, (3, 3))
    powers = torch.stack((W, W @ W), -3)  # (..., 2, 3, 3): W, W²
    # Row 0: A·W + B·W² (rotation), row 1: B·W + C·W² (left Jacobian), both + I.
    pairs = torch.stack((coefficients[..., :2], coefficients[..., 1:]), -2)  # (..., 2, 2)
    RV = (pairs @ powers.flatten(-2)).unflatten(-1, (3, 3)) + torch.eye(3, dtype=dtype, device=device)
    R, V = RV.unbind(-3)
    return make_pose(R, (V @ v[..., None])[..., 0])


#: Exponents of θ in the denominators of A, B, C.
_EXP_POWERS = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
#: Taylor series of A, B, C: row 0 − θ²·row 1.
_EXP_SERIES = torch.tensor([[1.0, 0.5, 1.0 / 6.0], [1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0]], dtype=torch.float64)
#: ω ↦ [ω]× as a linear map: (3,) → (9,) row-major.
_SKEW_GENERATORS = torch.tensor(
    [
        [0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0],
        [0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ],
    dtype=torch.float64,
)


def make_pose(R: Tensor, t: Tensor) -> Tensor:
    """Assemble (..., 4, 4) transforms from rotations (..., 3, 3) and translations (..., 3)."""
    top = torch.cat((R, t[..., None]), -1)
    bottom = _POSE_BOTTOM_ROW.to(dtype=R.dtype, device=R.device).expand(*top.shape[:-2], 1, 4)
    return torch.cat((top, bottom), -2)


_POSE_BOTTOM_ROW = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)


def so3_log(R: Tensor) -> Tensor:
    """Rotation vector ω (..., 3) of rotation matrices R (..., 3, 3), computed in float64.

    Robust over the whole range: the antisymmetric part gives ω for θ ≤ π/2, and the symmetric part
    R + Rᵀ = 2cosθ·I + 2(1 − cosθ)·aaᵀ gives the axis for θ > π/2, where sinθ → 0 would lose precision.
    θ = π returns one of the two equivalent axes. Returned in the input dtype.
    """
    R64 = R.to(torch.float64)
    vee = _vee(R64)  # = 2·sinθ·a
    sin_theta = 0.5 * _safe_norm(vee)
    cos_theta = ((R64[..., 0, 0] + R64[..., 1, 1] + R64[..., 2, 2] - 1.0) * 0.5).clamp(-1.0, 1.0)
    theta = torch.atan2(sin_theta, cos_theta)

    # θ ≤ π/2: ω = θ/(2·sinθ)·vee, with θ/sinθ ≈ 1 + θ²/6 near zero.
    small = theta < SE3_TAYLOR_THRESHOLD
    safe_sin = torch.where(small, torch.ones_like(sin_theta), sin_theta)
    factor = torch.where(small, 0.5 + theta**2 / 12.0, 0.5 * theta / safe_sin)
    omega_small = factor[..., None] * vee

    # θ > π/2: axis from the column of aaᵀ with the largest diagonal, sign from vee.
    eye = torch.eye(3, dtype=torch.float64, device=R.device)
    one_minus_cos = torch.where(theta > math.pi / 2, 1.0 - cos_theta, torch.ones_like(cos_theta))
    aat = (0.5 * (R64 + R64.transpose(-1, -2)) - cos_theta[..., None, None] * eye) / one_minus_cos[
        ..., None, None
    ]
    column = torch.diagonal(aat, dim1=-2, dim2=-1).argmax(-1)
    col = torch.take_along_dim(aat, column[..., None, None].expand((*aat.shape[:-1], 1)), dim=-1)[..., 0]
    axis = col / _safe_norm(col).clamp_min(1e-12)[..., None]
    sign = torch.where((axis * vee).sum(-1) < 0, -1.0, 1.0).to(torch.float64)
    omega_large = (sign * theta)[..., None] * axis

    omega = torch.where((theta > math.pi / 2)[..., None], omega_large, omega_small)
    return omega.to(R.dtype)


def se3_log(T: Tensor) -> Tensor:
    """Twist ξ = (v, ω) (..., 6) with se3_exp(ξ) = T, computed in float64, returned in T's dtype.

    v = V⁻¹·t with V⁻¹ = I − W/2 + (1/θ²)(1 − θ·sinθ / (2(1 − cosθ)))·W² (series 1/12 + θ²/720 near 0).
    Rotation angles are returned in [0, π].
    """
    T64 = T.to(torch.float64)
    omega = so3_log(T64[..., :3, :3])
    theta = _safe_norm(omega)
    small = theta < 1e-3
    t = torch.where(small, torch.ones_like(theta), theta)
    coeff_large = (1.0 - t * torch.sin(t) / (2.0 * (1.0 - torch.cos(t)))) / (t * t)
    coeff = torch.where(small, 1.0 / 12.0 + theta**2 / 720.0, coeff_large)
    W = skew(omega)
    eye = torch.eye(3, dtype=torch.float64, device=T.device)
    V_inv = eye - 0.5 * W + coeff[..., None, None] * (W @ W)
    v = (V_inv @ T64[..., :3, 3:4])[..., 0]
    return torch.cat((v, omega), -1).to(T.dtype)


def se3_inverse(T: Tensor) -> Tensor:
    """Closed-form inverse [Rᵀ | −Rᵀt] of rigid transforms (..., 4, 4)."""
    R_t = T[..., :3, :3].transpose(-1, -2)
    t = T[..., :3, 3]
    return make_pose(R_t, -(R_t @ t[..., None])[..., 0])


def se3_compose(A: Tensor, B: Tensor) -> Tensor:
    """A·B for (..., 4, 4) transforms (apply B first); leading dims broadcast."""
    return A @ B


def transform_points(T: Tensor, points: Tensor) -> Tensor:
    """R·p + t for transforms (..., 4, 4) and points (..., N, 3); returns (..., N, 3)."""
    R = T[..., :3, :3]
    t = T[..., :3, 3]
    return points @ R.transpose(-1, -2) + t[..., None, :]


def project_points(points: Tensor, K: Tensor, min_depth: float = PROJECTION_MIN_DEPTH) -> Tensor:
    """Pinhole projection u = fx·X/Z + cx, v = fy·Y/Z + cy with Z clamped to ≥ ``min_depth``.

    Args:
        points: (..., N, 3) camera-frame points, metres.
        K: (..., 3, 3) intrinsics (broadcast against the leading dims of ``points``).
        min_depth: lower clamp of Z, metres (docs/method.md §1.7: 0.01). Points behind the camera therefore
            project to finite but meaningless pixels; callers mask them with Z themselves.

    Returns:
        (..., N, 2) pixel coordinates (x = column, y = row).
    """
    # (x, y)-vector form of fx·(X/Z) + cx, fy·(Y/Z) + cy: the same arithmetic per element, fewer ops.
    focal = torch.diagonal(K[..., :2, :2], dim1=-2, dim2=-1)[..., None, :]  # (..., 1, 2)
    centre = K[..., None, :2, 2]  # (..., 1, 2)
    return focal * (points[..., :2] / points[..., 2:].clamp_min(min_depth)) + centre


def pixel_grid(
    height: int, width: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """(H, W, 2) integer pixel coordinates, channel 0 = x (column), channel 1 = y (row).

    The grid is cached per size, dtype and device (it is a constant of every inner step): the returned
    tensor is shared and must not be modified in place.
    """
    return _pixel_grid(
        height, width, dtype, torch.device(device) if device is not None else torch.device("cpu")
    )


@functools.lru_cache(maxsize=32)
def _pixel_grid(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # A normal tensor even when first asked for under inference mode, so that autograd may save it.
    with torch.inference_mode(False), torch.no_grad():
        ys = torch.arange(height, dtype=dtype, device=device)
        xs = torch.arange(width, dtype=dtype, device=device)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack((gx, gy), -1)


def backproject_depth(depth: Tensor, K: Tensor) -> Tensor:
    """Camera-frame points X = depth·K⁻¹·(x, y, 1)ᵀ at integer pixel coordinates.

    Evaluated as X = depth·(x − cx)/fx, Y = depth·(y − cy)/fy (K without skew), the float32
    rounding order that reproduces the published solver's normal equations best.

    Args:
        depth: (B, H, W) depth (camera z), metres; zeros stay at the camera centre.
        K: (B, 3, 3) pinhole intrinsics (the skew entry is ignored).

    Returns:
        (B, H, W, 3) points in the camera frame, dtype of ``depth``.
    """
    _, height, width = depth.shape
    grid = pixel_grid(height, width, depth.dtype, depth.device)
    K = K.to(depth.dtype)
    fx, fy = K[:, 0, 0, None, None], K[:, 1, 1, None, None]
    cx, cy = K[:, 0, 2, None, None], K[:, 1, 2, None, None]
    X = depth * (grid[..., 0] - cx) / fx
    Y = depth * (grid[..., 1] - cy) / fy
    return torch.stack((X, Y, depth), -1)


# ---------------------------------------------------------------------------------------------
# Crop windows (docs/method.md §1.3 first crop, §1.4 zoom crop)
# ---------------------------------------------------------------------------------------------

FIRST_CROP_SIZE = 320
FIRST_CROP_MARGIN_RATIO = 0.85
ZOOM_CROP_SIZE = 240
ZOOM_CROP_MARGIN = 0.4
# Mask vertices need positive depth; projecting them with this tiny clamp keeps the pixels finite.
_MASK_MIN_DEPTH = 1e-6
# Smallest zoom window side, source pixels: keeps the crop intrinsics finite for a one-pixel mask.
_MIN_ZOOM_SIDE = 1.0


class CropStatus(IntEnum):
    """Why a crop window is (not) usable; stored per instance as an int64 tensor."""

    OK = 0
    BEHIND_CAMERA = 1  # no model vertex (first crop) or the model origin (zoom) has positive depth
    OUTSIDE_IMAGE = 2  # no vertex in front of the camera projects inside the source image


@dataclass
class CropWindow:
    """A square window of a source image resampled to ``size × size`` pixels, one per instance.

    Output pixel (j, i) samples the source at ``origin + step·(j, i)`` with
    origin = top_left + step/2 − 1/2: the window covers the source coordinates
    [top_left − ½, top_left − ½ + side] (pixel centres at integers) and the output pixels divide it
    evenly — OpenCV's resize and ``grid_sample(align_corners=False)`` geometry.

    Attributes:
        top_left: (B, 2) window corner (x, y), source pixels: the first covered pixel's centre for
            the first crop (integer x0, y0), c − S/2 for the zoom crop (published convention).
        side: (B,) window side in source pixels (L of §1.3, S of §1.4).
        K: (B, 3, 3) intrinsics of the crop. With ``published_conventions`` these are the
            published formulas, which disagree with the sampling by up to a pixel (docs/method.md §1.8).
        status: (B,) int64 :class:`CropStatus` codes; windows of invalid instances are finite.
        size: output side, pixels.
        source_size: (H, W) of the source image.
        clamp_to_window: sample the window like a zero-padded canvas resized by OpenCV: sample
            positions are clamped to the window (edge replication of the canvas) — first crop.
        published_conventions: the window was built with the published conventions.
    """

    top_left: Tensor
    side: Tensor
    K: Tensor
    status: Tensor
    size: int
    source_size: tuple[int, int]
    clamp_to_window: bool
    published_conventions: bool

    @property
    def step(self) -> Tensor:
        """(B,) source pixels per output pixel."""
        return self.side / self.size

    @property
    def origin(self) -> Tensor:
        """(B, 2) source position sampled by output pixel (0, 0)."""
        return self.top_left + (0.5 * self.step - 0.5)[:, None]

    @property
    def valid(self) -> Tensor:
        """(B,) bool: status is OK."""
        return self.status == CropStatus.OK


def _vertex_mask_bbox(
    vertices: Tensor, poses: Tensor, K: Tensor, image_size: tuple[int, int], vertex_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bounding box of the sparse vertex mask (docs/method.md §1.3.1): projected vertices with positive depth,
    rounded to pixels and clamped into the image.

    Returns:
        bbox_min (B, 2), bbox_max (B, 2) inclusive pixel coordinates (0 where nothing is in
        front of the camera), any_in_front (B,) bool, any_inside (B,) bool (some vertex in front of
        the camera projects inside the image before clamping).
    """
    height, width = image_size
    camera_points = transform_points(poses, vertices.expand(poses.shape[0], -1, -1))
    in_front = camera_points[..., 2] > 0
    if vertex_mask is not None:
        in_front = in_front & vertex_mask
    pixels = torch.round(project_points(camera_points, K, min_depth=_MASK_MIN_DEPTH))
    # Per-axis scalar bounds: no host-to-device tensor is created (no sync on the GPU path).
    px, py = pixels.unbind(-1)
    inside = in_front & (px >= 0) & (px <= width - 1) & (py >= 0) & (py <= height - 1)
    clamped = torch.stack((px.clamp(0, width - 1), py.clamp(0, height - 1)), -1)
    big = torch.full_like(clamped, float("inf"))
    bbox_min = torch.where(in_front[..., None], clamped, big).amin(-2)
    bbox_max = torch.where(in_front[..., None], clamped, -big).amax(-2)
    any_in_front = in_front.any(-1)
    bbox_min = torch.where(any_in_front[:, None], bbox_min, torch.zeros_like(bbox_min))
    bbox_max = torch.where(any_in_front[:, None], bbox_max, torch.zeros_like(bbox_max))
    return bbox_min, bbox_max, any_in_front, inside.any(-1)


def _check_crop_inputs(vertices: Tensor, poses: Tensor, K: Tensor, vertex_mask: Tensor | None) -> None:
    batch = poses.shape[0]
    if poses.ndim != 3 or poses.shape[-2:] != (4, 4):
        raise GeometryInputError(f"poses must be (B, 4, 4), got {tuple(poses.shape)}")
    if K.shape != (batch, 3, 3):
        raise GeometryInputError(f"K must be ({batch}, 3, 3), got {tuple(K.shape)}")
    if vertices.ndim != 3 or vertices.shape[-1] != 3 or vertices.shape[0] not in (1, batch):
        raise GeometryInputError(f"vertices must be (B or 1, N, 3), got {tuple(vertices.shape)}")
    if vertex_mask is not None and vertex_mask.shape != (batch, vertices.shape[1]):
        raise GeometryInputError(f"vertex_mask must be ({batch}, N), got {tuple(vertex_mask.shape)}")


def first_crop_window(
    vertices: Tensor,
    poses: Tensor,
    K: Tensor,
    image_size: tuple[int, int],
    *,
    size: int = FIRST_CROP_SIZE,
    margin_ratio: float = FIRST_CROP_MARGIN_RATIO,
    vertex_mask: Tensor | None = None,
    published_conventions: bool = False,
) -> CropWindow:
    """First square crop around each instance (docs/method.md §1.3), computed on the device.

    Sparse vertex mask → bbox (x, y, w, h) with w, h the inclusive pixel extents → centre
    c = (x + w/2, y + h/2) → side L = ⌊max(w, h)·(1 + 2·margin_ratio)⌋ → top-left
    (max(0, ⌊c_x − L/2⌋), max(0, ⌊c_y − L/2⌋)). The in-image part of the L×L window is resampled
    to size×size, zero beyond the image (so windows leaving on the right/bottom are padded, those
    leaving on the left/top are shifted).

    Sampling follows OpenCV's bilinear resize of the zero-padded canvas. Intrinsics: published
    fx' = s·fx, cx' = s·(cx − x0) with s = size/L (half a pixel off that sampling, up to
    0.5·(s − 1) px); default cx' = s·(cx − x0 + 0.5) − 0.5, which matches it.

    Args:
        vertices: (B or 1, N, 3) model vertices, metres (pad unequal clouds and pass vertex_mask).
        poses: (B, 4, 4) model→camera poses.
        K: (B, 3, 3) image intrinsics.
        image_size: (H, W) of the image.
        size: output side, pixels.
        margin_ratio: relative margin on each side of the bbox.
        vertex_mask: optional (B, N) bool, False for padding vertices.
        published_conventions: published intrinsics and nearest-neighbour sampling (see above).

    Returns:
        :class:`CropWindow` with ``clamp_to_window=True``. Status BEHIND_CAMERA when no vertex has
        positive depth, OUTSIDE_IMAGE when none of those projects inside the image.
    """
    _check_crop_inputs(vertices, poses, K, vertex_mask)
    bbox_min, bbox_max, in_front, inside = _vertex_mask_bbox(vertices, poses, K, image_size, vertex_mask)
    extent = bbox_max - bbox_min + 1.0  # (w, h)
    centre = bbox_min + 0.5 * extent
    side = torch.floor(extent.amax(-1) * (1.0 + 2.0 * margin_ratio)).clamp_min(1.0)
    top_left = torch.floor(centre - 0.5 * side[:, None]).clamp_min(0.0)

    scale = size / side
    K_crop = K.clone()
    K_crop[:, 0, 0] = K[:, 0, 0] * scale
    K_crop[:, 1, 1] = K[:, 1, 1] * scale
    shift = 0.0 if published_conventions else 0.5
    K_crop[:, 0, 2] = scale * (K[:, 0, 2] - top_left[:, 0] + shift) - shift
    K_crop[:, 1, 2] = scale * (K[:, 1, 2] - top_left[:, 1] + shift) - shift
    status = _status(in_front, inside)
    return CropWindow(top_left, side, K_crop, status, size, tuple(image_size), True, published_conventions)


def zoom_crop_window(
    vertices: Tensor,
    poses: Tensor,
    K: Tensor,
    source_size: tuple[int, int] = (FIRST_CROP_SIZE, FIRST_CROP_SIZE),
    *,
    size: int = ZOOM_CROP_SIZE,
    margin: float = ZOOM_CROP_MARGIN,
    vertex_mask: Tensor | None = None,
    published_conventions: bool = False,
) -> CropWindow:
    """Zoom crop inside the first crop (docs/method.md §1.4.2), recomputed at every render iteration.

    Centre c = projection of the model origin (K·t)/t_z; half-extent h = largest distance from c
    to the four edges of the sparse-vertex-mask bbox (edges x and x + w); side S = 2·h·(1 + margin).
    Output pixel j samples c − S/2 + S·(j + 0.5)/size − 0.5 (bilinear, zeros outside), as the
    published ``affine_grid``/``grid_sample`` with align_corners=False does.

    Intrinsics: published K = A⁻¹·K_src with output pixels 0 and size−1 on the window edges, i.e.
    fx' = fx·(size − 1)/S, cx' = (cx − c_x + S/2)·(size − 1)/S (inconsistent with the sampling by
    up to 0.5 px and a size/(size−1) scale, docs/method.md §1.8); default fx' = fx·size/S,
    cx' = (cx − c_x + S/2 + 0.5)·size/S − 0.5, consistent with it.

    Args:
        vertices: (B or 1, N, 3) model vertices, metres.
        poses: (B, 4, 4) model→camera poses (current estimate Ti).
        K: (B, 3, 3) intrinsics of the source (first-crop) image.
        source_size: (H, W) of the source image.
        size: output side, pixels.
        margin: relative margin (published 0.4, not configurable there).
        vertex_mask: optional (B, N) bool, False for padding vertices.
        published_conventions: published intrinsics (see above).

    Returns:
        :class:`CropWindow` with ``clamp_to_window=False``. Status BEHIND_CAMERA when the model
        origin or every vertex is not in front of the camera, OUTSIDE_IMAGE when no vertex projects
        into the source image. The window stays finite in both cases.
    """
    _check_crop_inputs(vertices, poses, K, vertex_mask)
    bbox_min, bbox_max, in_front, inside = _vertex_mask_bbox(vertices, poses, K, source_size, vertex_mask)
    bbox_end = bbox_max + 1.0  # right/bottom edge x + w
    origin_in_front = poses[:, 2, 3] > 0
    # An origin behind the camera has no meaningful projection: fall back to the bbox centre.
    origin_pixel = project_points(poses[:, None, :3, 3], K, min_depth=_MASK_MIN_DEPTH)[:, 0]
    centre = torch.where(origin_in_front[:, None], origin_pixel, 0.5 * (bbox_min + bbox_end))
    distances = torch.cat((centre - bbox_min, bbox_end - centre), -1)
    side = (2.0 * distances.amax(-1) * (1.0 + margin)).clamp_min(_MIN_ZOOM_SIDE)
    top_left = centre - 0.5 * side[:, None]

    span = (size - 1) if published_conventions else size
    shift = 0.0 if published_conventions else 0.5
    scale = span / side
    K_crop = K.clone()
    K_crop[:, 0, 0] = K[:, 0, 0] * scale
    K_crop[:, 1, 1] = K[:, 1, 1] * scale
    K_crop[:, 0, 2] = (K[:, 0, 2] - top_left[:, 0] + shift) * scale - shift
    K_crop[:, 1, 2] = (K[:, 1, 2] - top_left[:, 1] + shift) * scale - shift
    status = _status(in_front & origin_in_front, inside)
    return CropWindow(top_left, side, K_crop, status, size, tuple(source_size), False, published_conventions)


def _status(in_front: Tensor, inside: Tensor) -> Tensor:
    """(B,) int64 CropStatus codes from the two visibility tests."""
    status = torch.full(in_front.shape, int(CropStatus.OK), dtype=torch.int64, device=in_front.device)
    status = torch.where(inside, status, torch.full_like(status, int(CropStatus.OUTSIDE_IMAGE)))
    return torch.where(in_front, status, torch.full_like(status, int(CropStatus.BEHIND_CAMERA)))


def crop_sampling_grid(window: CropWindow, mode: str = "bilinear") -> Tensor:
    """Sampling grid of a crop for ``F.grid_sample(..., align_corners=True)``.

    Args:
        window: the crop.
        mode: "bilinear" or "nearest". Nearest positions are rounded here (published first crop:
            OpenCV's ⌊j·L/size⌋, otherwise the bilinear position rounded), so grid_sample's own
            rounding never sees a tie.

    Returns:
        (B, size, size, 2) normalised coordinates (x then y), dtype of ``window.side``.
    """
    if mode not in ("bilinear", "nearest"):
        raise GeometryInputError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    j = torch.arange(window.size, dtype=window.side.dtype, device=window.side.device)
    step = window.step[:, None, None]
    if mode == "nearest" and window.published_conventions and window.clamp_to_window:
        positions = window.top_left[:, :, None] + torch.floor(j * step)  # (B, 2, size)
    else:
        positions = window.origin[:, :, None] + j * step
        if mode == "nearest":
            positions = torch.floor(positions + 0.5)
    if window.clamp_to_window:
        low = window.top_left[:, :, None]
        positions = torch.minimum(torch.maximum(positions, low), low + window.side[:, None, None] - 1.0)
    height, width = window.source_size
    gx = 2.0 * positions[:, 0] / max(width - 1, 1) - 1.0
    gy = 2.0 * positions[:, 1] / max(height - 1, 1) - 1.0
    gx = gx[:, None, :].expand(-1, window.size, -1)
    gy = gy[:, :, None].expand(-1, -1, window.size)
    return torch.stack((gx, gy), -1)


def sample_crop(images: Tensor, window: CropWindow, mode: str = "bilinear") -> Tensor:
    """Resample a crop from each instance's source image.

    Args:
        images: (B or 1, C, H, W) source images/maps (one image shared by all instances is
            broadcast without a copy).
        window: crop windows of the B instances.
        mode: "bilinear" (images, descriptor maps) or "nearest" (depth, masks).

    Returns:
        (B, C, size, size), zeros where the window leaves the source image.
    """
    batch = window.side.shape[0]
    if images.ndim != 4 or images.shape[0] not in (1, batch):
        raise GeometryInputError(
            f"images must be (B or 1, C, H, W) with B={batch}, got {tuple(images.shape)}"
        )
    if tuple(images.shape[-2:]) != tuple(window.source_size):
        raise GeometryInputError(
            f"images are {tuple(images.shape[-2:])}, window expects {window.source_size}"
        )
    grid = crop_sampling_grid(window, mode).to(images.dtype)
    return F.grid_sample(
        images.expand(batch, -1, -1, -1), grid, mode=mode, padding_mode="zeros", align_corners=True
    )
