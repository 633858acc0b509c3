"""Rigid-body geometry and pinhole camera helpers (batched torch, any device).

Conventions (spec §1.7): poses are 4×4 model→camera matrices (OpenCV camera: x right, y down,
z forward), metres. Twists are δ = (v_x, v_y, v_z, ω_x, ω_y, ω_z), translation first, and updates
multiply on the left: T ← exp(δ^)·T. Pixel (x = column, y = row) has the integer coordinate (x, y).

Every function accepts any leading batch dimensions ``...`` and never synchronises with the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Below this rotation angle the exp/log coefficients use their Taylor series (spec §2.10).
SE3_TAYLOR_THRESHOLD = 1e-4
# Default minimum depth of the projection (spec §1.7): Z is clamped to at least this, metres.
PROJECTION_MIN_DEPTH = 0.01


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


def _exp_coefficients(theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A = sinθ/θ, B = (1 − cosθ)/θ², C = (θ − sinθ)/θ³ with Taylor series for θ < 1e-4."""
    small = theta < SE3_TAYLOR_THRESHOLD
    # A safe angle keeps the unused branch finite so that gradients through torch.where stay finite.
    t = torch.where(small, torch.ones_like(theta), theta)
    t2 = t * t
    a = torch.where(small, 1.0 - theta**2 / 6.0, torch.sin(t) / t)
    b = torch.where(small, 0.5 - theta**2 / 24.0, (1.0 - torch.cos(t)) / t2)
    c = torch.where(small, 1.0 / 6.0 - theta**2 / 120.0, (t - torch.sin(t)) / (t2 * t))
    return a, b, c


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
    and the golden fixture records exactly that. Pass float64 twists where that matters.

    Args:
        xi: (..., 6) twists (v in metres, ω in radians), floating point.

    Returns:
        (..., 4, 4) homogeneous transforms, dtype of ``xi``.
    """
    v, omega = xi[..., :3], xi[..., 3:]
    theta = _safe_norm(omega)
    a, b, c = _exp_coefficients(theta)
    W = skew(omega)
    W2 = W @ W
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand(W.shape)
    R = eye + a[..., None, None] * W + b[..., None, None] * W2
    V = eye + b[..., None, None] * W + c[..., None, None] * W2
    t = (V @ v[..., None])[..., 0]
    return make_pose(R, t)


def make_pose(R: Tensor, t: Tensor) -> Tensor:
    """Assemble (..., 4, 4) transforms from rotations (..., 3, 3) and translations (..., 3)."""
    top = torch.cat((R, t[..., None]), -1)
    bottom = torch.zeros((*top.shape[:-2], 1, 4), dtype=R.dtype, device=R.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat((top, bottom), -2)


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
        min_depth: lower clamp of Z, metres (spec §1.7: 0.01). Points behind the camera therefore
            project to finite but meaningless pixels; callers mask them with Z themselves.

    Returns:
        (..., N, 2) pixel coordinates (x = column, y = row).
    """
    X, Y, Z = points.unbind(-1)
    Z = Z.clamp_min(min_depth)
    fx, fy = K[..., 0, 0, None], K[..., 1, 1, None]
    cx, cy = K[..., 0, 2, None], K[..., 1, 2, None]
    return torch.stack((fx * (X / Z) + cx, fy * (Y / Z) + cy), -1)


def pixel_grid(height: int, width: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """(H, W, 2) integer pixel coordinates, channel 0 = x (column), channel 1 = y (row)."""
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
