"""The depth term of the LM step: rendered object surface against the observed depth, point to plane.

Per render iteration the reference pixels p of the render (depth z₀(p) in a crop with intrinsics K)
lift to surface points X₀ = z₀·K⁻¹(p, 1) with unit normals n₀ (from the rendered depth's
neighbours, facing the camera). At relative pose T = [R | t] (the solver's unknown), every point
moves to X₁ = R·X₀ + t, n₁ = R·n₀, projects to the nearest crop pixel q = round(π(K, X₁)), and meets
the observed point P = D(q)·K⁻¹(q, 1) of the registered depth image D (cropped like the colour
image, nearest-neighbour). The residual is the distance of P from the tangent plane at X₁,

    r = n₁ᵀ(P − X₁)                                             metres,

with the exact Jacobian for a left perturbation T ← exp(δ^)·T, δ = (v, ω):

    ∂r/∂v = −n₁ᵀ,    ∂r/∂ω = −(X₁ × n₁)ᵀ + (n₁ × (P − X₁))ᵀ.

Weighting against the 2D term: the 2D term sums squared reprojection residuals in crop pixels with
weights ≤ 1, i.e. it treats one correspondence as a measurement of σ_px = ``pixel_sigma`` (1 px).
A depth pixel is a measurement of σ_z(z) = ``sigma_0`` + ``sigma_2``·(z − ``z_0``)² metres (the
sensor's axial noise, z the observed depth in metres; default the RealSense D435 fit of
:mod:`rnnpose_ros.core.depth_sensor`, 3.6 mm at 1 m), so both terms are whitened alike by giving
each depth pixel the weight

    w_d = (σ_px / σ_z(z))² · ρ(r / (k·σ_z(z)))                 px²/m²,

ρ the Huber IRLS weight (1 up to k = ``robust_scale`` standard deviations, k·σ_z/|r| beyond). Then
H_d = Σ w_d·JᵀJ and b_d = −Σ w_d·Jᵀr (float64), to be added to the 2D term's (H, b) before damping.

Gating (what real depth does and must not pull the pose):

- holes: D(q) = 0 (unknown, NaN already mapped to 0 at the engine's edge);
- flying pixels: observed pixels whose 3×3 neighbourhood spans more than ``flying_jump_m`` (mixed
  foreground/background values at depth edges) are treated as holes;
- silhouette and grazing surface: reference pixels whose 4 neighbours are not all on the object, or
  whose surface is seen at more than ``max_grazing_deg`` from its normal, are not used;
- occluders and background: with e = D(q) − Z₁ the axial difference, a pixel is used only if
  |e − m| < max(``band_m``, ``gate_sigmas``·σ_z), where m is the object's depth layer: the densest
  offset, the middle of the ``mode_window_m`` wide interval holding the most values of an offset.
  Centring on m keeps the term active while the pose is still centimetres off in depth (then every
  e is far from 0); a median would follow any layer holding half the pixels.

  Which pixels vote for m: where the 2D correspondences of the same step are known
  (:meth:`DepthTerm.guide`), the observed depth at each reference pixel's 2D target x* — where the
  image shows that surface point — gives the offset g = D(x*) − Z₁, and m is the densest g over the
  confident targets (weight ≥ ``guide_min_weight``). The targets lie on the object in the image
  even when the rendering is centimetres off sideways and mostly covers the support surface behind
  (a small object that starts far off), so that surface, the layer with the most pixels under the
  rendering, does not win; an occluder (nearer) is a minority of the targets as long as most of the
  object is visible. Without confident targets (fewer than ``guide_min_share`` of the usable
  pixels), the candidates' own e vote: the object's surface is then the largest consistent layer of
  what the rendering covers. Either way only offsets within ±``max_layer_offset_m`` vote: a render
  iteration corrects the depth by at most about a detector's depth error, so a wall far behind a
  misplaced rendering is never taken for the object.

The term also measures, at a given pose, how well the observed depth agrees with the rendering
(:meth:`DepthTerm.agreement`, used by the refiner's score).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class DepthTermConfig:
    """Options of the depth term (module docstring; metres unless stated).

    Attributes:
        sigma_0, sigma_2, z_0: axial noise model σ_z(z) = sigma_0 + sigma_2·(z − z_0)² of the depth
            camera (defaults: RealSense D435 fit, see :mod:`rnnpose_ros.core.depth_sensor`).
        pixel_sigma: standard deviation of one 2D correspondence, crop pixels (the 2D term's unit).
        robust_scale: Huber scale of the point-to-plane residual, multiples of σ_z.
        gate_sigmas, band_m: gating band max(band_m, gate_sigmas·σ_z) around the densest offset.
        mode_window_m: width of the interval that finds the densest offset.
        guide_min_weight: 2D correspondences at least this confident vote for the depth layer.
        guide_min_share: the 2D targets choose the layer when at least this share of the usable
            reference pixels has a confident target with observed depth; else the candidates do.
        max_layer_offset_m: the layer is sought within ±this of the rendering: the largest depth
            correction one render iteration makes (about 3σ of a detector's depth error).
        flying_jump_m: an observed pixel whose 3×3 neighbourhood spans more than this is not used.
        max_grazing_deg: reference pixels seen more obliquely than this are not used, degrees.
        min_depth: reference pixels at or below this depth are background.
        agree_sigmas, min_agree_m: a pixel agrees when |e| ≤ max(agree_sigmas·σ_z, min_agree_m).
        min_evidence_share: the agreement's denominator is at least this share of the rendered
            pixels with observed depth, so that a pose hidden behind the observed surface cannot
            score by declaring everything occluded.
        max_points: usable reference pixels per instance at most; beyond, an evenly spaced subset
            is used, each sample weighted by the number of pixels it stands for (neighbouring depth
            pixels carry nearly the same information, and the cost of a step is linear in them).
    """

    sigma_0: float = 0.0
    sigma_2: float = 0.0036
    z_0: float = 0.0
    pixel_sigma: float = 1.0
    robust_scale: float = 2.0
    gate_sigmas: float = 4.0
    band_m: float = 0.015
    mode_window_m: float = 0.02
    guide_min_weight: float = 0.5
    guide_min_share: float = 0.03
    max_layer_offset_m: float = 0.15
    flying_jump_m: float = 0.02
    max_grazing_deg: float = 80.0
    min_depth: float = 0.02
    agree_sigmas: float = 3.0
    min_agree_m: float = 0.005
    min_evidence_share: float = 0.5
    max_points: int = 2048

    def sigma(self, z: Tensor) -> Tensor:
        """σ_z(z), metres, of depths ``z`` (metres), same shape and dtype."""
        return self.sigma_0 + self.sigma_2 * (z - self.z_0) ** 2


@dataclass
class DepthEquations:
    """The depth term's contribution to one LM iteration.

    Attributes:
        hessian: (B, 6, 6) float64 H_d = Σ w_d·JᵀJ.
        gradient: (B, 6) float64 b_d = −Σ w_d·Jᵀr.
        num_used: (B,) int64 pixels that passed the gating.
    """

    hessian: Tensor
    gradient: Tensor
    num_used: Tensor


def point_to_plane(T: Tensor, X0: Tensor, n0: Tensor, P: Tensor) -> tuple[Tensor, Tensor]:
    """Residuals r = (R·n₀)ᵀ(P − (R·X₀ + t)) and their Jacobians for T ← exp(δ^)·T.

    Args:
        T: (B, 4, 4) pose; X0, n0: (B, N, 3) reference points and unit normals; P: (B, N, 3)
            observed points (held fixed), metres.

    Returns:
        r (B, N) metres and J (B, N, 6) = ∂r/∂(v, ω), dtype of the inputs.
    """
    R, t = T[:, :3, :3], T[:, :3, 3]
    X1 = X0 @ R.transpose(-1, -2) + t[:, None, :]
    n1 = n0 @ R.transpose(-1, -2)
    gap = P - X1
    r = (n1 * gap).sum(-1)
    J = torch.cat((-n1, -torch.linalg.cross(X1, n1) + torch.linalg.cross(n1, gap)), -1)
    return r, J


class DepthTerm:
    """The depth term of one render iteration (module docstring).

    Args:
        reference_depth: (B, h, w) rendered depth of the crop at the render pose, metres (≤
            ``config.min_depth`` = background).
        K: (B, 3, 3) intrinsics of the crop.
        observed: (B, h, w) observed depth resampled into the same crop (nearest), metres, 0 = none.
        active: (B,) float 1 for instances still refined, 0 for failed ones (their term is 0).
        config: the options.
    """

    def __init__(
        self, reference_depth: Tensor, K: Tensor, observed: Tensor, active: Tensor, config: DepthTermConfig
    ) -> None:
        self.config = config
        depth = reference_depth.to(torch.float64)
        self.K = K.to(torch.float64)
        self.height, self.width = depth.shape[1:]
        self.index, self.X0, self.n0, usable, self.multiplicity = _reference_surface(depth, self.K, config)
        self.usable = usable & active.to(torch.bool)[:, None]
        self.observed = _without_flying_pixels(observed.float(), config.flying_jump_m).to(torch.float64)
        self.guide_depth: Tensor | None = None
        self.guide_mask: Tensor | None = None

    def guide(self, target: Tensor, weight: Tensor) -> None:
        """Let the 2D correspondences of the coming LM step choose the depth layer (module docstring).

        Args:
            target: (B, h, w, 2) target pixel x* of every reference pixel, crop pixels (x first).
            weight: (B, h, w) confidence in [0, 1] of every target.
        """
        batch = len(self.index)
        at = self.index[..., None].expand(-1, -1, 2)
        xy = torch.gather(target.reshape(batch, -1, 2).to(torch.float64), 1, at)
        confident = torch.gather(weight.reshape(batch, -1), 1, self.index) >= self.config.guide_min_weight
        qx, qy = torch.round(xy[..., 0]), torch.round(xy[..., 1])
        inside = (qx >= 0) & (qx <= self.width - 1) & (qy >= 0) & (qy <= self.height - 1)
        pixel = (qy.clamp(0, self.height - 1) * self.width + qx.clamp(0, self.width - 1)).long()
        self.guide_depth = torch.gather(self.observed.reshape(batch, -1), 1, pixel)
        self.guide_mask = self.usable & confident & inside & (self.guide_depth > 0)

    def _associate(self, T: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(observed points P (B, N, 3), axial differences e = D(q) − Z₁ (B, N), candidate mask (B, N))
        at relative pose T: nearest crop pixel of every moved reference point."""
        T = T.to(torch.float64)
        X1 = self.X0 @ T[:, :3, :3].transpose(-1, -2) + T[:, None, :3, 3]
        z1 = X1[..., 2]
        safe_z = torch.where(z1 > self.config.min_depth, z1, torch.ones_like(z1))
        fx, fy = self.K[:, 0, 0, None], self.K[:, 1, 1, None]
        cx, cy = self.K[:, 0, 2, None], self.K[:, 1, 2, None]
        qx = torch.round(fx * X1[..., 0] / safe_z + cx)
        qy = torch.round(fy * X1[..., 1] / safe_z + cy)
        inside = (qx >= 0) & (qx <= self.width - 1) & (qy >= 0) & (qy <= self.height - 1)
        index = (qy.clamp(0, self.height - 1) * self.width + qx.clamp(0, self.width - 1)).long()
        D = torch.gather(self.observed.reshape(len(T), -1), 1, index)
        P = torch.stack((D * (qx - cx) / fx, D * (qy - cy) / fy, D), -1)
        candidate = self.usable & inside & (D > 0) & (z1 > self.config.min_depth)
        return P, D - z1, candidate

    def normal_equations(self, T: Tensor) -> DepthEquations:
        """H_d, b_d (float64) of the depth term at relative pose T (B, 4, 4) (module docstring)."""
        config = self.config
        T64 = T.to(torch.float64)
        P, e, candidate = self._associate(T64)
        sigma = config.sigma(P[..., 2])
        offset = self._layer(T64, e, candidate)
        band = (config.gate_sigmas * sigma).clamp_min(config.band_m)
        used = candidate & ((e - offset[:, None]).abs() < band)
        r, J = point_to_plane(T64, self.X0, self.n0, P)
        scale = config.robust_scale * sigma
        huber = scale / torch.maximum(r.abs(), scale)
        whitened = (config.pixel_sigma / sigma) ** 2 * huber * self.multiplicity[:, None]
        weight = torch.where(used, whitened, torch.zeros_like(r))
        r = torch.where(used, r, torch.zeros_like(r))
        wJ = weight[..., None] * J
        return DepthEquations(
            hessian=torch.einsum("bni,bnj->bij", wJ, J),
            gradient=-torch.einsum("bni,bn->bi", wJ, r),
            num_used=used.sum(-1),
        )

    def _layer(self, T: Tensor, e: Tensor, candidate: Tensor) -> Tensor:
        """(B,) float64 offset m of the object's depth layer at relative pose T (module docstring),
        given the candidates' axial differences e (B, N) and mask (B, N)."""
        config = self.config
        own = _densest_offset(e, candidate & (e.abs() <= config.max_layer_offset_m), config.mode_window_m)
        if self.guide_depth is None or self.guide_mask is None:
            return own
        z1 = self.X0 @ T[:, 2, :3, None] + T[:, 2, None, 3:]
        g = self.guide_depth - z1[..., 0]
        voters = self.guide_mask & (g.abs() <= config.max_layer_offset_m)
        guided = _densest_offset(g, voters, config.mode_window_m)
        enough = voters.sum(-1) >= config.guide_min_share * self.usable.sum(-1).clamp_min(1)
        return torch.where(enough, guided, own)

    def solver_terms(self, T: Tensor) -> tuple[Tensor, Tensor]:
        """(H_d, b_d) at T, the ``extra_terms`` of :func:`~rnnpose_ros.core.solver.solve_lm_step`."""
        equations = self.normal_equations(T)
        return equations.hessian, equations.gradient

    def agreement(self, T: Tensor) -> tuple[Tensor, Tensor]:
        """How well the observed depth agrees with the rendering moved by T (B, 4, 4).

        Returns:
            fraction (B,) float64 in [0, 1]: pixels with |e| ≤ tolerance over the visible ones —
            candidate pixels not hidden by something nearer (e ≥ −tolerance), at least
            ``min_evidence_share`` of the candidates; and evidence (B,) float64: the share of the
            usable rendered pixels that have an observed depth at all.
        """
        config = self.config
        P, e, candidate = self._associate(T)
        tolerance = (config.agree_sigmas * config.sigma(P[..., 2])).clamp_min(config.min_agree_m)
        agree = candidate & (e.abs() <= tolerance)
        visible = candidate & (e >= -tolerance)
        count = candidate.sum(-1).to(torch.float64)
        denominator = torch.maximum(visible.sum(-1).to(torch.float64), config.min_evidence_share * count)
        fraction = agree.sum(-1).to(torch.float64) / denominator.clamp_min(1.0)
        evidence = count / self.usable.sum(-1).to(torch.float64).clamp_min(1.0)
        return fraction.clamp(0.0, 1.0), evidence


def _reference_surface(
    depth: Tensor, K: Tensor, config: DepthTermConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Evenly spaced samples of the usable reference surface of a rendered depth (B, h, w), metres.

    Usable: object pixels whose 4 neighbours are on the object (their normal, from central
    differences of the back-projected neighbours, is defined) and whose surface is seen within
    ``max_grazing_deg`` of its normal. At most ``config.max_points`` samples per instance.

    Returns:
        index (B, M) int64 sample pixels (row-major into h·w); X0 (B, M, 3) points and n0 (B, M, 3)
        unit normals facing the camera (float64, metres); valid (B, M) bool (False on padding and
        grazing samples); multiplicity (B,) float64 pixels per sample.
    """
    batch, _, width = depth.shape
    fg = depth > config.min_depth
    inner = torch.zeros_like(fg)
    inner[:, 1:-1, 1:-1] = fg[:, 1:-1, 1:-1] & fg[:, :-2, 1:-1] & fg[:, 2:, 1:-1] & fg[:, 1:-1, :-2]
    inner[:, 1:-1, 1:-1] &= fg[:, 1:-1, 2:]
    inner = inner.reshape(batch, -1)
    index, valid, multiplicity = _samples(inner, config.max_points)
    flat = depth.reshape(batch, -1)
    fx, fy = K[:, 0, 0, None], K[:, 1, 1, None]
    cx, cy = K[:, 0, 2, None], K[:, 1, 2, None]

    def lift(offset: int, du: int, dv: int) -> Tensor:
        """(B, M, 3) back-projection of the pixels ``offset`` away from the samples."""
        at = (index + offset).clamp(0, flat.shape[1] - 1)
        z = torch.gather(flat, 1, at)
        u = (index % width + du).to(depth.dtype)
        v = (index // width + dv).to(depth.dtype)
        return torch.stack((z * (u - cx) / fx, z * (v - cy) / fy, z), -1)

    X0 = lift(0, 0, 0)
    normal = torch.linalg.cross(lift(1, 1, 0) - lift(-1, -1, 0), lift(width, 0, 1) - lift(-width, 0, -1))
    normal = normal / torch.linalg.vector_norm(normal, dim=-1, keepdim=True).clamp_min(1e-12)
    ray = X0 / torch.linalg.vector_norm(X0, dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = (normal * ray).sum(-1)
    normal = torch.where(cosine[..., None] > 0, -normal, normal)  # face the camera
    valid = valid & (cosine.abs() >= math.cos(math.radians(config.max_grazing_deg)))
    return index, X0, normal, valid, multiplicity


def _samples(usable: Tensor, max_points: int) -> tuple[Tensor, Tensor, Tensor]:
    """Evenly spaced usable pixels of every instance.

    Args:
        usable: (B, N) bool.
        max_points: samples per instance at most.

    Returns:
        index (B, M) int64 into N, valid (B, M) bool (padding is False), and multiplicity (B,)
        float64: usable pixels per sample (≥ 1).
    """
    counts = usable.sum(-1)
    size = max(1, min(int(counts.max()), max_points))
    # Usable pixels first, in raster order (a stable sort of the negated mask).
    order = torch.sort((~usable).to(torch.uint8), dim=-1, stable=True).indices
    picks = []
    for count in counts.tolist():
        taken = min(count, size)
        positions = torch.linspace(0, max(count - 1, 0), taken, dtype=torch.float64).round().long()
        picks.append(torch.cat((positions, positions.new_zeros(size - taken))))
    positions = torch.stack(picks).to(usable.device)
    index = torch.gather(order, 1, positions)
    valid = torch.arange(size, device=usable.device)[None] < counts.clamp(max=size)[:, None]
    multiplicity = counts.to(torch.float64) / counts.clamp(max=size).clamp_min(1).to(torch.float64)
    return index, valid, multiplicity.clamp_min(1.0)


def _without_flying_pixels(observed: Tensor, jump_m: float) -> Tensor:
    """(B, h, w) observed depth with 0 where the valid values of the 3×3 neighbourhood span more than
    ``jump_m`` (mixed values at depth edges)."""
    valid = observed > 0
    # Depths are positive: −1 never wins the maximum, −big never the maximum of the negated values.
    big = torch.finfo(observed.dtype).max
    high = F.max_pool2d(torch.where(valid, observed, -1.0)[:, None], 3, 1, 1)[:, 0]
    low = -F.max_pool2d(torch.where(valid, -observed, -big)[:, None], 3, 1, 1)[:, 0]
    return torch.where(valid & (high - low <= jump_m), observed, torch.zeros_like(observed))


def _densest_offset(values: Tensor, mask: Tensor, width: float) -> Tensor:
    """(B,) the median of the values (B, N) over ``mask`` that lie in the ``width`` wide interval
    holding the most of them (0 where the mask is empty)."""
    count = values.shape[-1]
    ordered = torch.sort(torch.where(mask, values, torch.full_like(values, float("inf"))), dim=-1).values
    num_valid = mask.sum(-1, keepdim=True)
    start = torch.arange(count, device=values.device).expand_as(ordered)
    end = torch.minimum(torch.searchsorted(ordered, ordered + width, right=True), num_valid)
    inside = torch.where(start < num_valid, end - start, torch.full_like(end, -1))
    best = inside.argmax(-1, keepdim=True)
    middle = (best + inside.gather(-1, best) // 2).clamp(0, count - 1)
    offset = ordered.gather(-1, middle)[:, 0]
    return torch.where(num_valid[:, 0] > 0, offset, torch.zeros_like(offset))
