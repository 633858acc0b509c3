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

from rnnpose_ros.core.geometry import backproject_depth, se3_exp

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
        sparse: a render iteration solves on the foreground pixels of its reference depth only
            (``pixels`` of :func:`solve_lm_step`, chosen by :func:`foreground_pixels`): the same sums
            at a fraction of the cost where most of a crop is background, for one host
            synchronisation per render iteration (host backends; the learned path keeps fixed shapes).
        pixel_stride: the solve uses the foreground pixels of every ``pixel_stride``-th row and column
            only (> 1 implies ``sparse``): where the correspondences come from a flow computed at
            half the crop's resolution, neighbouring pixels repeat nearly the same information.
    """

    num_iters: int = 1
    robust: str | None = None
    robust_scale: float = 2.0
    ep_lambda: float = EP_LAMBDA
    lm_lambda: float = LM_LAMBDA
    min_depth: float = MIN_DEPTH
    max_step: float = MAX_STEP
    pose_dtype: torch.dtype = torch.float32
    sparse: bool = False
    pixel_stride: int = 1

    def solver_options(self) -> dict:
        """The keyword arguments of :func:`solve_lm_step` (all but ``pose_dtype``, ``sparse`` and
        ``pixel_stride``, which choose its ``pixels``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SOLVER_OPTIONS}

    def solve_pixels(self, depth: Tensor) -> Tensor | None:
        """The ``pixels`` of :func:`solve_lm_step` for a render iteration's reference depth (B, H, W):
        None (every pixel) unless ``sparse`` or ``pixel_stride`` > 1."""
        if self.pixel_stride < 1:
            raise SolverInputError(f"pixel_stride must be ≥ 1, got {self.pixel_stride}")
        if not self.sparse and self.pixel_stride == 1:
            return None
        return foreground_pixels(depth, self.min_depth, self.pixel_stride)

    def correspondence_count(self, num_valid: Tensor) -> Tensor:
        """The weighted correspondences (B,) that a solve's ``num_valid`` stands for: each pixel of a
        solve on every s-th row and column (``pixel_stride``) stands for s² pixels."""
        return num_valid if self.pixel_stride == 1 else num_valid * self.pixel_stride**2


_NOT_SOLVER_OPTIONS = ("pose_dtype", "sparse", "pixel_stride")


@dataclass
class LMStep:
    """Result of :func:`solve_lm_step`.

    Attributes:
        pose: (B, 4, 4) updated pose exp(δ_n)···exp(δ_1)·T, dtype of the input pose.
        delta: (B, 6) last increment (v metres, ω radians), dtype of the input pose.
        deltas: (num_iters, B, 6) increments of every iteration.
        hessian: (B, 6, 6) float64 damped normal matrix of the last iteration.
        gradient: (B, 6) float64 right-hand side b = Σ ω·Jᵀr of the last iteration.
        num_valid: (B,) number of pixels with non-zero weight ω in the last iteration (of ``pixels``
            where given).
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


def _normal_equations(
    X1: Tensor,
    K: Tensor,
    target: Tensor,
    omega: Tensor,
    proj_min_depth: float,
    jacobian_min_depth: float,
    robust: str | None,
    robust_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """All weighted sums of one Gauss–Newton iteration from a single batched reduction.

    Each pixel contributes two rows (x and y) of an augmented matrix A = [J | r | e] with
    J = [Jπ | X1 × Jπ] (the closed form of J_proj·[I | −[X1]×], Jπ the 2×3 projection Jacobian),
    r the residual and e = (1, 0); one weighted Gram product Aᵀ·ω·A (B, 8, 8) then holds
    H = Σ ω·JᵀJ, b = Σ ω·Jᵀr, Σ ω‖r‖² and Σ ω. The projection and Jπ are evaluated in the input
    dtype as published (their rounding shows in r and H); everything after them in float64.

    Args:
        X1: (B, P, 3) moved reference points, metres, dtype of the pose.
        K: (B, 3, 3) intrinsics, dtype of the pose.
        target: (B, P, 2) float64 target pixels.
        omega: (B, P) float64 pixel weights (validity × confidence), before robust weighting.

    Returns:
        H (B, 6, 6) undamped, b (B, 6), Σ ω‖r‖² (B,), Σ ω (B,) and the robustly weighted ω (B, P);
        all float64.
    """
    z = X1[..., 2:]
    focal = torch.diagonal(K[:, :2, :2], dim1=-2, dim2=-1)[:, None]  # (B, 1, 2) fx, fy
    centre = K[:, None, :2, 2]  # (B, 1, 2) cx, cy
    pixels = focal * (X1[..., :2] / z.clamp_min(proj_min_depth)) + centre
    residual = target - pixels.to(torch.float64)  # (B, P, 2)
    if robust is not None:
        omega = omega * robust_weights(residual, robust, robust_scale)

    near = z <= jacobian_min_depth
    # The inner where keeps 1/z finite where it is discarded, so that gradients stay finite.
    inv_z = torch.where(near, 0.0, 1.0 / torch.where(near, 1.0, z))  # (B, P, 1)
    diagonal = focal * inv_z  # (B, P, 2): fx/z, fy/z
    depth_column = -focal * X1[..., :2] * inv_z * inv_z  # (B, P, 2): −fx·x/z², −fy·y/z²
    # Jπ in the input dtype, then float64 (the published rounding, which H inherits).
    J_proj = torch.cat((torch.diag_embed(diagonal), depth_column[..., None]), -1).to(torch.float64)
    p = X1.to(torch.float64)
    J_rot = torch.linalg.cross(p[..., None, :].expand_as(J_proj), J_proj)  # (B, P, 2, 3)
    unit = _UNIT_ROW.to(residual.device).expand(*residual.shape, 1)
    A = torch.cat((J_proj, J_rot, residual[..., None], unit), -1)  # (B, P, 2, 8)
    gram = (A * omega[..., None, None]).flatten(1, 2).transpose(1, 2) @ A.flatten(1, 2)  # (B, 8, 8)
    return gram[:, :6, :6], gram[:, :6, 6], gram[:, 6, 6], gram[:, 7, 7], omega


#: e = (1, 0) per pixel (x row, y row): its Gram entry is Σ ω.
_UNIT_ROW = torch.tensor([[1.0], [0.0]], dtype=torch.float64)


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
    reference_points: Tensor | None = None,
    extra_terms: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    pixels: Tensor | None = None,
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
        reference_points: (B, H, W, 3) ``backproject_depth(depth, K)`` in the dtype of T, when the
            caller has it (it is constant over the inner steps of a render iteration).
        extra_terms: pose (B, 4, 4) -> (H_x (B, 6, 6), b_x (B, 6)) float64, evaluated at the pose of
            every iteration and added to the normal equations before damping (module docstring).
        pixels: (P',) int64 flat (row-major) indices of the only pixels to use, shared by the batch
            (e.g. :func:`foreground_pixels`). The result equals the dense solve's (up to the order of
            the sums) when every pixel left out has weight 0 or reference depth ≤ ``min_depth``.

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
    if reference_points is None:
        reference_points = backproject_depth(depth.to(dtype), K)
    X0 = reference_points.reshape(batch, -1, 3)  # (B, P, 3)
    target64 = target.reshape(batch, -1, 2)
    w = weight.reshape(batch, -1)
    if pixels is not None:
        X0, target64, w = X0[:, pixels], target64[:, pixels], w[:, pixels]
    target64, w = target64.to(torch.float64), w.to(dtype)
    damping_scale, damping_shift = _damping(ep_lambda, lm_lambda, T.device)
    reference_valid = X0[..., 2] > min_depth

    deltas = []
    for _ in range(num_iters):
        X1 = X0 @ T[:, :3, :3].transpose(-1, -2) + T[:, None, :3, 3]
        valid = reference_valid & (X1[..., 2] > min_depth)
        omega = torch.where(valid, w, 0.0).to(torch.float64)
        H, b, sq_sum, weight_sum, omega = _normal_equations(
            X1, K, target64, omega, proj_min_depth, jacobian_min_depth, robust, robust_scale
        )
        if extra_terms is not None:  # e.g. the depth residual (core/depth_term.py)
            H_x, b_x = extra_terms(T)
            H, b = H + H_x, b + b_x
        H = H * damping_scale + damping_shift  # H + λ_lm·diag(H) + λ_ep·I

        delta = solve_clamped(H, b, max_step).to(dtype)
        T = se3_exp(delta) @ T
        deltas.append(delta)

    # Σ ω = 0 implies Σ ω‖r‖² = 0: the clamp only avoids 0/0 and leaves an RMS of 0.
    rms = torch.sqrt(sq_sum / weight_sum.clamp_min(torch.finfo(torch.float64).tiny)).to(dtype)
    return LMStep(
        pose=T,
        delta=deltas[-1],
        deltas=torch.stack(deltas),
        hessian=H,
        gradient=b,
        num_valid=(omega > 0).sum(-1),
        residual_rms=rms,
    )


def foreground_pixels(depth: Tensor, min_depth: float, stride: int = 1) -> Tensor:
    """(P',) int64 flat indices of the pixels where any instance's depth (B, H, W) exceeds
    ``min_depth`` — the only ones that can contribute to :func:`solve_lm_step` — in every ``stride``-th
    row and column (data-dependent size, a host synchronisation)."""
    foreground = (depth.to(torch.float64) > min_depth).any(0)
    if stride > 1:
        on_grid = torch.zeros_like(foreground)
        on_grid[::stride, ::stride] = True
        foreground = foreground & on_grid
    return torch.nonzero(foreground.reshape(-1), as_tuple=True)[0]


def _damping(ep_lambda: float, lm_lambda: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """(6, 6) float64 factors with H·scale + shift = H + λ_lm·diag(H) + λ_ep·I."""
    eye = torch.eye(6, dtype=torch.float64, device=device)
    return 1.0 + lm_lambda * eye, ep_lambda * eye


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
