"""The depth term of the LM step: residual and Jacobian, gating (occluders, holes, flying pixels,
background), agreement, and its use through the solver's ``extra_terms``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from rnnpose_ros.core.depth_term import DepthTerm, DepthTermConfig, point_to_plane
from rnnpose_ros.core.geometry import se3_exp
from rnnpose_ros.core.solver import solve_clamped, solve_lm_step

SIZE = 96
CONFIG = DepthTermConfig()


def random_pose(rng: np.random.Generator, rot: float, trans: float) -> torch.Tensor:
    xi = torch.from_numpy(np.concatenate((rng.normal(0, trans, 3), rng.normal(0, rot, 3))))
    return se3_exp(xi[None])


def test_point_to_plane_jacobian_matches_finite_differences():
    rng = np.random.default_rng(0)
    T = random_pose(rng, 0.2, 0.05)
    X0 = torch.from_numpy(rng.normal(0, 0.05, (1, 50, 3)) + np.array([0.0, 0.0, 0.6]))
    n0 = torch.nn.functional.normalize(torch.from_numpy(rng.normal(0, 1, (1, 50, 3))), dim=-1)
    P = X0 + torch.from_numpy(rng.normal(0, 0.01, (1, 50, 3)))
    r, J = point_to_plane(T, X0, n0, P)
    eps = 1e-6
    for k in range(6):
        delta = torch.zeros(1, 6, dtype=torch.float64)
        delta[0, k] = eps
        r_plus, _ = point_to_plane(se3_exp(delta) @ T, X0, n0, P)
        r_minus, _ = point_to_plane(se3_exp(-delta) @ T, X0, n0, P)
        np.testing.assert_allclose(J[..., k], (r_plus - r_minus) / (2 * eps), atol=1e-8)
    # The residual itself: the signed distance of P from the moved tangent plane.
    X1 = X0 @ T[:, :3, :3].transpose(-1, -2) + T[:, None, :3, 3]
    n1 = n0 @ T[:, :3, :3].transpose(-1, -2)
    np.testing.assert_allclose(r, ((P - X1) * n1).sum(-1), atol=1e-12)


@pytest.fixture(scope="module")
def duck_view(renderer, duck_registry):
    """(K (1, 3, 3), true depth (1, h, w), model pose): the duck rendered into a small crop, metres."""
    model = duck_registry["duck"]
    pose = np.eye(4)
    pose[:3, :3] = np.array([[0.8, -0.6, 0.0], [0.36, 0.48, -0.8], [0.48, 0.64, 0.6]])
    pose[:3, 3] = -pose[:3, :3] @ model.center + [0.0, 0.0, 0.6]
    K = np.array([[220.0, 0.0, (SIZE - 1) / 2], [0.0, 220.0, (SIZE - 1) / 2], [0.0, 0.0, 1.0]])
    out = renderer.render([model], pose, K, (SIZE, SIZE))
    return torch.from_numpy(K)[None], torch.from_numpy(out.depth.astype(np.float64)), pose


def solve_depth_only(term: DepthTerm, start: torch.Tensor, iterations: int = 15) -> torch.Tensor:
    """Gauss–Newton on the depth term alone (tiny damping), from ``start``."""
    T = start
    for _ in range(iterations):
        H, b = term.solver_terms(T)
        T = se3_exp(solve_clamped(H + 1e-3 * torch.eye(6, dtype=H.dtype), b)) @ T
    return T


def offset(rng_seed: int = 1) -> torch.Tensor:
    """A relative pose a few millimetres and degrees off (rotation about the object, 0.6 m ahead),
    the start of the refinement tests."""
    turn = random_pose(np.random.default_rng(rng_seed), 0.03, 0.006)
    centre = torch.tensor([0.0, 0.0, 0.6], dtype=torch.float64)
    turn[0, :3, 3] += centre - turn[0, :3, :3] @ centre
    return turn


def pose_error(T: torch.Tensor) -> tuple[float, float]:
    """(translation mm, rotation degrees) of a relative pose T (identity = the truth)."""
    angle = torch.arccos(((torch.diagonal(T[0, :3, :3]).sum() - 1) / 2).clamp(-1, 1))
    return float(torch.linalg.vector_norm(T[0, :3, 3]) * 1000), float(torch.rad2deg(angle))


def test_converges_to_the_observed_surface(duck_view):
    K, depth, _ = duck_view
    # The reference is rendered at the wrong pose: moving it by T must reach the observed surface,
    # i.e. the solution is the inverse of the offset the observation was rendered with.
    term = DepthTerm(depth, K, depth.clone(), torch.ones(1), CONFIG)
    start = offset()
    T = solve_depth_only(term, start)
    mm, deg = pose_error(T)
    assert mm < 0.5 and deg < 0.3
    assert int(term.normal_equations(T).num_used) > 0.5 * int((depth > 0).sum())


def test_occluder_in_front_does_not_move_the_estimate(duck_view):
    K, depth, _ = duck_view
    rows = torch.nonzero(depth[0] > 0)[:, 0]
    cut = int(torch.quantile(rows.double(), 0.6))
    observed = depth.clone()
    occluder = torch.zeros_like(depth, dtype=torch.bool)
    occluder[:, cut:, :] = True  # a bar across the lower 40 % of the object and beyond it
    observed[occluder] = float(depth[depth > 0].min()) - 0.05
    term = DepthTerm(depth, K, observed, torch.ones(1), CONFIG)
    # At the truth the occluder contributes nothing: no pull at all.
    identity = torch.eye(4, dtype=torch.float64)[None]
    equations = term.normal_equations(identity)
    assert float(equations.gradient.abs().max()) < 1e-6 * float(equations.hessian.abs().max())
    # From a perturbed start it converges to the truth as without the occluder.
    mm, deg = pose_error(solve_depth_only(term, offset()))
    assert mm < 0.5 and deg < 0.3
    # And the score's agreement does not count the hidden pixels against the pose.
    fraction, _ = term.agreement(identity)
    assert float(fraction) > 0.95


def test_background_behind_a_misplaced_silhouette_does_not_pull(duck_view):
    K, depth, _ = duck_view
    observed = torch.where(depth > 0, depth, torch.full_like(depth, 0.9))  # a wall 30 cm behind
    term = DepthTerm(depth, K, observed, torch.ones(1), CONFIG)
    mm, deg = pose_error(solve_depth_only(term, offset(2)))
    assert mm < 0.5 and deg < 0.3


def sideways(dx: float) -> torch.Tensor:
    """(1, 4, 4) relative pose moving the reference ``dx`` metres sideways (identity = the truth)."""
    T = torch.eye(4, dtype=torch.float64)[None].clone()
    T[0, 0, 3] = dx
    return T


def test_2d_targets_choose_the_object_layer_under_a_rendering_mostly_on_the_support(duck_view):
    """A rendering 6 cm sideways covers more of the surface just behind the object than of the object:
    that layer holds the most pixels, but the 2D targets (here exact: every reference pixel shows at
    its own place) point at the object, whose depth then sets the gate."""
    K, depth, _ = duck_view
    observed = torch.where(depth > 0, depth, torch.full_like(depth, float(depth.max()) + 0.03))
    start = sideways(0.06)
    plain = DepthTerm(depth, K, observed, torch.ones(1), CONFIG)
    mm, _ = pose_error(solve_depth_only(plain, start))
    assert mm > 50.0  # the premise: without the targets the support surface wins and pulls
    guided = DepthTerm(depth, K, observed, torch.ones(1), CONFIG)
    v, u = torch.meshgrid(*(torch.arange(SIZE, dtype=torch.float64),) * 2, indexing="ij")
    guided.guide(torch.stack((u, v), -1)[None], (depth > 0).to(torch.float64))
    mm, deg = pose_error(solve_depth_only(guided, start))
    assert mm < 0.5 and deg < 0.3
    # Targets with no confidence (or too few) leave the choice to the rendering's own pixels.
    unsure = DepthTerm(depth, K, observed, torch.ones(1), CONFIG)
    unsure.guide(torch.stack((u, v), -1)[None], 0.4 * (depth > 0).to(torch.float64))
    for T in (start, offset()):
        np.testing.assert_array_equal(unsure.normal_equations(T).hessian, plain.normal_equations(T).hessian)


def test_no_layer_beyond_the_largest_correction_is_sought(duck_view):
    """Without 2D targets, a wall 30 cm behind under a rendering 5 cm sideways is beyond
    ``max_layer_offset_m``: the object's own pixels set the gate and the estimate converges."""
    K, depth, _ = duck_view
    observed = torch.where(depth > 0, depth, torch.full_like(depth, float(depth.max()) + 0.3))
    mm, deg = pose_error(
        solve_depth_only(DepthTerm(depth, K, observed, torch.ones(1), CONFIG), sideways(0.05))
    )
    assert mm < 0.5 and deg < 0.3
    unbounded = replace(CONFIG, max_layer_offset_m=1.0)
    mm, _ = pose_error(
        solve_depth_only(DepthTerm(depth, K, observed, torch.ones(1), unbounded), sideways(0.05))
    )
    assert mm > 50.0


def test_holes_and_flying_pixels_are_not_used(duck_view):
    K, depth, _ = duck_view
    rng = np.random.default_rng(4)
    # Flying pixels: object pixels at the silhouette read a mix of object and wall depth.
    wall = torch.where(depth > 0, depth, torch.full_like(depth, 0.9))
    edge = torch.nn.functional.max_pool2d((depth == 0).double()[:, None], 3, 1, 1)[:, 0] > 0
    edge &= depth > 0
    holes = torch.from_numpy(rng.random(depth.shape) < 0.5) & ~edge & (depth > 0)
    observed = torch.where(edge, 0.5 * (wall + 0.9), torch.where(holes, torch.zeros_like(depth), wall))
    term = DepthTerm(depth, K, observed.float(), torch.ones(1), CONFIG)
    assert not bool((term.observed[edge] > 0).any())  # flying pixels read as holes
    identity = torch.eye(4, dtype=torch.float64)[None]
    used = int(term.normal_equations(identity).num_used)
    assert 0 < used <= int(((observed > 0) & (depth > 0) & ~edge).sum())
    mm, deg = pose_error(solve_depth_only(term, offset(3)))
    assert mm < 0.5 and deg < 0.3
    # No depth at all: the term is exactly zero.
    empty = DepthTerm(depth, K, torch.zeros_like(depth), torch.ones(1), CONFIG).normal_equations(identity)
    assert int(empty.num_used) == 0
    assert float(empty.hessian.abs().max()) == 0.0 and float(empty.gradient.abs().max()) == 0.0


def test_inactive_instances_get_no_depth_term(duck_view):
    K, depth, _ = duck_view
    term = DepthTerm(
        depth.expand(2, -1, -1),
        K.expand(2, -1, -1),
        depth.expand(2, -1, -1),
        torch.tensor([1.0, 0.0]),
        CONFIG,
    )
    equations = term.normal_equations(offset().expand(2, -1, -1))
    assert int(equations.num_used[0]) > 0 and int(equations.num_used[1]) == 0


def test_agreement_drops_when_the_pose_is_off_in_depth(duck_view):
    K, depth, _ = duck_view
    term = DepthTerm(depth, K, depth.clone(), torch.ones(1), CONFIG)
    identity = torch.eye(4, dtype=torch.float64)[None]
    closer = identity.clone()
    closer[0, 2, 3] = -0.03  # the object 3 cm nearer than observed
    farther = identity.clone()
    farther[0, 2, 3] = 0.03  # 3 cm behind the observed surface: everything looks "occluded"
    assert float(term.agreement(identity)[0]) > 0.95
    assert float(term.agreement(closer)[0]) < 0.2
    assert float(term.agreement(farther)[0]) < 0.2


def test_noise_model_weights_near_pixels_more(duck_view):
    """The whitening: the same geometry observed 2x farther gets (σ(z)/σ(2z))² = 1/16 the weight."""
    K, depth, _ = duck_view
    identity = torch.eye(4, dtype=torch.float64)[None]
    config = replace(CONFIG, flying_jump_m=1.0)  # the doubled depth has doubled jumps
    near = DepthTerm(depth, K, depth.clone(), torch.ones(1), config).normal_equations(identity)
    far_depth = depth * 2.0
    far = DepthTerm(far_depth, K, far_depth.clone(), torch.ones(1), config).normal_equations(identity)
    assert int(near.num_used) == int(far.num_used)
    ratio = float(far.hessian[0, 0, 0] / near.hessian[0, 0, 0])
    assert ratio == pytest.approx(1 / 16, rel=1e-6)


def test_solver_adds_the_extra_terms_before_damping(duck_view):
    K, depth, _ = duck_view
    term = DepthTerm(depth, K, depth.clone(), torch.ones(1), CONFIG)
    start = offset()
    zero_weight = torch.zeros_like(depth)
    target = torch.zeros((*depth.shape, 2), dtype=torch.float64)
    step = solve_lm_step(
        start, depth, K, target, zero_weight, ep_lambda=1e-3, lm_lambda=0.0, extra_terms=term.solver_terms
    )
    H, b = term.solver_terms(start)
    np.testing.assert_allclose(step.hessian, H + 1e-3 * torch.eye(6, dtype=torch.float64), rtol=1e-12)
    np.testing.assert_allclose(step.gradient, b, rtol=1e-12)
    expected = se3_exp(solve_clamped(H + 1e-3 * torch.eye(6, dtype=torch.float64), b)) @ start
    np.testing.assert_allclose(step.pose, expected, atol=1e-12)
