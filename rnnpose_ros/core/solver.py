"""Weighted, damped Gauss–Newton / Levenberg–Marquardt pose step on dense 3D–2D correspondences.

Implements docs/method.md §2.10 exactly (the published ``reprojction_optim`` behaviour, checked against the
golden ``lm_step.pt``), batched over B instances and differentiable through ``torch.linalg``:

- X0 = depth·K⁻¹(x, y, 1) at integer pixels, X1 = T·X0, x1 = π(K, X1) with Z clamped to ≥ 0.01 m;
- residual r = x* − x1 (pixels), J = J_proj·[I | −[X1]×] with 1/Z, 1/Z² zeroed where Z ≤ 0.02 m;
- pixel weight ω = v·w, v = [Z0 > 0.1 m]·[Z1 > 0.1 m];
- H = Σ ω·JᵀJ + 100·I + 1e-4·diag(H), b = Σ ω·Jᵀr in float64; δ = H⁻¹b by Cholesky; NaN → 0;
  clamp to [−1, 1]; cast to the pose dtype; T ← exp(δ^)·T.

A robust variant (classical backend) multiplies w by Huber or Cauchy weights of the residual norm,
re-evaluated at every iteration (iteratively reweighted least squares).

An optional further term (``extra_terms``, e.g. the depth term of :mod:`rnnpose_ros.core.depth_term`)
contributes its own float64 (H_x, b_x) at the current pose, added before damping:
H = Σ ω·JᵀJ + H_x, b = Σ ω·Jᵀr + b_x. It must be whitened to the 2D term's unit (squared pixels,
one correspondence = σ of 1 px); the depth term weights a pixel by (σ_px / σ_z(z))² with the sensor's
axial noise σ_z(z) = σ₀ + σ₂·(z − z₀)² in metres (px²/m² · m² residuals = px²).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from rnnpose_ros.core.geometry import backproject_depth, se3_exp, skew

# Published constants (docs/method.md §2.10, §1.7).
EP_LAMBDA = 100.0
LM_LAMBDA = 1e-4
MIN_DEPTH = 0.1
PROJECTION_MIN_DEPTH = 0.01
JACOBIAN_MIN_DEPTH = 0.02
MAX_STEP = 1.0
ROBUST_KINDS = ("huber", "cauchy")


class SolverInputError(ValueError):
    """Inputs of the LM solver have inconsistent shapes or an unknown option."""


@dataclass
class LMConfig:
    """Options of :func:`solve_lm_step` for every inner step of a refinement (published defaults).

    Attributes:
        num_iters: Gauss–Newton iterations per inner step on the same correspondences (published: 1).
        robust: None (published), "huber" or "cauchy": IRLS kernel on the reprojection residual.
        robust_scale: kernel scale, pixels of the crop.
        ep_lambda: constant damping λ_ep (published 100).
        lm_lambda: relative damping λ_lm (published 1e-4).
        min_depth: correspondences need reference and moved depth above this, metres (published 0.1).
        max_step: per-component clamp of one increment, metres / radians (published 1).
        pose_dtype: dtype of the relative pose in the solve (published: float32).
    """

    num_iters: int = 1
    robust: str | None = None
    robust_scale: float = 2.0
    ep_lambda: float = EP_LAMBDA
    lm_lambda: float = LM_LAMBDA
    min_depth: float = MIN_DEPTH
    max_step: float = MAX_STEP
    pose_dtype: torch.dtype = torch.float32

    def solver_options(self) -> dict:
        """The keyword arguments of :func:`solve_lm_step` (everything but ``pose_dtype``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pose_dtype"}


@dataclass
class LMStep:
    """Result of :func:`solve_lm_step`.

    Attributes:
        pose: (B, 4, 4) updated pose exp(δ_n)···exp(δ_1)·T, dtype of the input pose.
        delta: (B, 6) last increment (v metres, ω radians), dtype of the input pose.
        deltas: (num_iters, B, 6) increments of every iteration.
        hessian: (B, 6, 6) float64 damped normal matrix of the last iteration.
        gradient: (B, 6) float64 right-hand side b = Σ ω·Jᵀr of the last iteration.
        num_valid: (B,) number of pixels with non-zero weight ω in the last iteration.
        residual_rms: (B,) weighted RMS reprojection residual (pixels) before the last update,
            √(Σ ω‖r‖² / Σ ω), 0 where no pixel is valid.
    """

    pose: Tensor
    delta: Tensor
    deltas: Tensor
    hessian: Tensor
    gradient: Tensor
    num_valid: Tensor
    residual_rms: Tensor


def robust_weights(residual: Tensor, kind: str, scale: float) -> Tensor:
    """IRLS weights of 2D residuals.

    Args:
        residual: (..., 2) reprojection residuals, pixels.
        kind: "huber" (w = 1 for ‖r‖ ≤ s, s/‖r‖ beyond) or "cauchy" (w = 1 / (1 + (‖r‖/s)²)).
        scale: s, pixels: residuals up to about s count fully.

    Returns:
        (...) weights in (0, 1], same dtype as ``residual``.
    """
    if kind not in ROBUST_KINDS:
        raise SolverInputError(f"unknown robust kernel {kind!r}; expected one of {ROBUST_KINDS}")
    if scale <= 0:
        raise SolverInputError(f"robust scale must be positive, got {scale}")
    norm = torch.linalg.vector_norm(residual, dim=-1)
    if kind == "huber":
        return scale / torch.maximum(norm, torch.full_like(norm, scale))
    return 1.0 / (1.0 + (norm / scale) ** 2)


def _projection_and_jacobian(
    X1: Tensor, K: Tensor, proj_min_depth: float, jacobian_min_depth: float
) -> tuple[Tensor, Tensor]:
    """Pixels (B, P, 2) and float64 Jacobians (B, P, 2, 6) of π(K, exp(δ^)·X1) at δ = 0.

    Both factors are formed in the input dtype and promoted before their product, as published.
    """
    x, y, z = X1.unbind(-1)
    fx, fy = K[:, 0, 0, None], K[:, 1, 1, None]
    cx, cy = K[:, 0, 2, None], K[:, 1, 2, None]
    z_clamped = z.clamp_min(proj_min_depth)
    pixels = torch.stack((fx * (x / z_clamped) + cx, fy * (y / z_clamped) + cy), -1)

    near = z <= jacobian_min_depth
    inv_z = torch.where(near, torch.zeros_like(z), 1.0 / torch.where(near, torch.ones_like(z), z))
    zero = torch.zeros_like(z)
    row_x = torch.stack((fx * inv_z, zero, -fx * x * inv_z * inv_z), -1)
    row_y = torch.stack((zero, fy * inv_z, -fy * y * inv_z * inv_z), -1)
    J_proj = torch.stack((row_x, row_y), -2)  # (B, P, 2, 3)
    eye = torch.eye(3, dtype=X1.dtype, device=X1.device).expand((*X1.shape[:-1], 3, 3))
    J_pose = torch.cat((eye, -skew(X1)), -1)  # (B, P, 3, 6), left perturbation
    return pixels, J_proj.to(torch.float64) @ J_pose.to(torch.float64)


def solve_lm_step(
    T: Tensor,
    depth: Tensor,
    K: Tensor,
    target: Tensor,
    weight: Tensor,
    *,
    num_iters: int = 1,
    ep_lambda: float = EP_LAMBDA,
    lm_lambda: float = LM_LAMBDA,
    min_depth: float = MIN_DEPTH,
    proj_min_depth: float = PROJECTION_MIN_DEPTH,
    jacobian_min_depth: float = JACOBIAN_MIN_DEPTH,
    max_step: float = MAX_STEP,
    robust: str | None = None,
    robust_scale: float = 2.0,
    extra_terms: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> LMStep:
    """Run ``num_iters`` damped Gauss–Newton steps on T (docs/method.md §2.10), batched over instances.

    Args:
        T: (B, 4, 4) pose taking reference-camera points to the target camera (float32 in the
            published path; float64 works end to end, e.g. for gradcheck).
        depth: (B, H, W) reference depth, metres (background ≤ ``min_depth`` is ignored).
        K: (B, 3, 3) intrinsics of the image in which ``depth`` and ``target`` live.
        target: (B, H, W, 2) target pixel x* for every reference pixel (x = column).
        weight: (B, H, W) per-pixel confidence w ≥ 0.
        num_iters: Gauss–Newton iterations on the same correspondences (published: 1).
        ep_lambda: constant damping λ_ep added to the diagonal.
        lm_lambda: relative damping λ_lm·diag(H).
        min_depth: validity threshold on Z0 and Z1, metres (published 0.1).
        proj_min_depth: lower clamp of Z in the projection, metres.
        jacobian_min_depth: 1/Z and 1/Z² are zeroed where Z ≤ this, metres.
        max_step: per-component clamp of δ (metres / radians).
        robust: None (published), "huber" or "cauchy": multiply w by robust weights of ‖r‖.
        robust_scale: robust kernel scale, pixels.
        extra_terms: pose (B, 4, 4) -> (H_x (B, 6, 6), b_x (B, 6)) float64, evaluated at the pose of
            every iteration and added to the normal equations before damping (module docstring).

    Returns:
        :class:`LMStep`.
    """
    if T.ndim != 3 or T.shape[-2:] != (4, 4):
        raise SolverInputError(f"T must be (B, 4, 4), got {tuple(T.shape)}")
    batch = T.shape[0]
    if depth.ndim != 3 or depth.shape[0] != batch:
        raise SolverInputError(f"depth must be (B, H, W) with B={batch}, got {tuple(depth.shape)}")
    if K.shape != (batch, 3, 3):
        raise SolverInputError(f"K must be ({batch}, 3, 3), got {tuple(K.shape)}")
    if target.shape != (*depth.shape, 2):
        raise SolverInputError(f"target must be {(*tuple(depth.shape), 2)}, got {tuple(target.shape)}")
    if weight.shape != depth.shape:
        raise SolverInputError(f"weight must be {tuple(depth.shape)}, got {tuple(weight.shape)}")
    if num_iters < 1:
        raise SolverInputError(f"num_iters must be ≥ 1, got {num_iters}")
    if robust is not None and robust not in ROBUST_KINDS:
        raise SolverInputError(f"unknown robust kernel {robust!r}; expected None or one of {ROBUST_KINDS}")

    dtype = T.dtype
    K = K.to(dtype)
    X0 = backproject_depth(depth.to(dtype), K).reshape(batch, -1, 3)  # (B, P, 3)
    target64 = target.reshape(batch, -1, 2).to(torch.float64)
    w = weight.reshape(batch, -1).to(dtype)
    eye6 = torch.eye(6, dtype=torch.float64, device=T.device)

    deltas = []
    for _ in range(num_iters):
        R, t = T[:, :3, :3], T[:, :3, 3]
        X1 = X0 @ R.transpose(-1, -2) + t[:, None, :]
        pixels, J = _projection_and_jacobian(X1, K, proj_min_depth, jacobian_min_depth)
        valid = (X0[..., 2] > min_depth) & (X1[..., 2] > min_depth)
        omega = torch.where(valid, w, torch.zeros_like(w)).to(torch.float64)
        residual = target64 - pixels.to(torch.float64)  # (B, P, 2)
        if robust is not None:
            omega = omega * robust_weights(residual, robust, robust_scale)

        wJ = omega[..., None, None] * J
        H = torch.einsum("bpki,bpkj->bij", wJ, J)
        b = torch.einsum("bpki,bpk->bi", wJ, residual)
        if extra_terms is not None:
            H_x, b_x = extra_terms(T)
            H, b = H + H_x, b + b_x
        H = H + ep_lambda * eye6 + lm_lambda * torch.diag_embed(torch.diagonal(H, dim1=-2, dim2=-1))

        delta = solve_clamped(H, b, max_step).to(dtype)
        T = se3_exp(delta) @ T
        deltas.append(delta)

    weight_sum = omega.sum(-1)
    sq_sum = (omega * (residual * residual).sum(-1)).sum(-1)
    has_weight = weight_sum > 0
    rms = torch.sqrt(sq_sum / torch.where(has_weight, weight_sum, torch.ones_like(weight_sum)))
    rms = torch.where(has_weight, rms, torch.zeros_like(rms)).to(dtype)
    return LMStep(
        pose=T,
        delta=deltas[-1],
        deltas=torch.stack(deltas),
        hessian=H,
        gradient=b,
        num_valid=(omega > 0).sum(-1),
        residual_rms=rms,
    )


def solve_clamped(H: Tensor, b: Tensor, max_step: float = MAX_STEP) -> Tensor:
    """δ = H⁻¹b for (..., 6, 6) SPD H and (..., 6) b by Cholesky; NaN → 0; clamped to ±max_step.

    A matrix that is not positive definite (possible only with non-finite inputs) gives a zero step
    instead of an exception, decided on the device (``cholesky_ex`` reports it without a host sync).
    """
    L, info = torch.linalg.cholesky_ex(H)
    delta = torch.cholesky_solve(b[..., None], L)[..., 0]
    failed = torch.isnan(delta) | (info != 0)[..., None]
    delta = torch.where(failed, torch.zeros_like(delta), delta)
    return delta.clamp(-max_step, max_step)
