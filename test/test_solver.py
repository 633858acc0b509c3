"""Tests of rnnpose_ros.core.solver (docs/method.md §2.10): golden parity, oracle convergence, batching,
gradients, robust weights and degenerate inputs."""

from __future__ import annotations

import pytest
import torch

from rnnpose_ros.core.geometry import backproject_depth, project_points, se3_exp, se3_inverse, se3_log
from rnnpose_ros.core.solver import (
    MIN_DEPTH,
    SolverInputError,
    foreground_pixels,
    robust_weights,
    solve_clamped,
    solve_lm_step,
)
from rnnpose_ros.tools.parity_common import load_fixture
from rnnpose_ros.tools.parity_geometry import CHECKS

HEIGHT, WIDTH = 24, 32
K_CROP = torch.tensor([[120.0, 0.0, 15.6], [0.0, 118.5, 11.3], [0.0, 0.0, 1.0]])


def _box_depth(dtype=torch.float64) -> torch.Tensor:
    """(1, H, W) depth of a tilted plane at ~0.5 m with a raised box in the middle, background 0."""
    ys, xs = torch.meshgrid(
        torch.arange(HEIGHT, dtype=dtype), torch.arange(WIDTH, dtype=dtype), indexing="ij"
    )
    depth = 0.5 + 0.002 * (xs - WIDTH / 2) - 0.001 * (ys - HEIGHT / 2)
    box = (xs > 10) & (xs < 22) & (ys > 7) & (ys < 17)
    depth = torch.where(box, depth - 0.06, depth)
    depth[:2] = 0.0  # background rows: excluded by the 0.1 m validity threshold
    return depth[None]


def _oracle_target(depth: torch.Tensor, K: torch.Tensor, T_true: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 2) exact projections π(K, T_true·X0) of the back-projected reference pixels."""
    X0 = backproject_depth(depth, K).reshape(depth.shape[0], -1, 3)
    X1 = X0 @ T_true[:, :3, :3].transpose(-1, -2) + T_true[:, None, :3, 3]
    return project_points(X1, K).reshape(*depth.shape, 2)


def _pose_error(T: torch.Tensor, T_true: torch.Tensor) -> tuple[float, float]:
    xi = se3_log(T.double() @ se3_inverse(T_true.double()))
    return float(xi[..., :3].norm(dim=-1).max()), float(xi[..., 3:].norm(dim=-1).max())


def test_golden_lm_step_parity(golden):
    comparisons = CHECKS["lm_step"](load_fixture(golden / "lm_step.pt"), golden)
    failed = [c for c in comparisons if not c.passed]
    assert not failed, failed
    names = {c.name for c in comparisons}
    assert {"H_damped", "b", "delta", "Tij_out", "Tij_out_2iters", "se3_exp", "se3_log_round_trip"} <= names


def test_log_round_trip_is_checked_on_the_group(golden):
    """A twist turning by more than π has another principal log; the check must still pass."""
    fixture = dict(load_fixture(golden / "lm_step.pt"))
    xi = fixture["se3_xi"].clone()
    xi[..., 3:] = torch.nn.functional.normalize(xi[..., 3:] + 0.1, dim=-1) * 4.0  # 4 rad > π
    fixture["se3_xi"] = xi
    fixture["se3_exp"] = se3_exp(xi)
    fixture["se3_inverse_of_exp"] = se3_inverse(fixture["se3_exp"])
    round_trip = next(c for c in CHECKS["lm_step"](fixture, golden) if c.name == "se3_log_round_trip")
    assert round_trip.passed, round_trip


def test_golden_frame_axis_shapes(golden):
    fixture = load_fixture(golden / "lm_step.pt")
    step = solve_lm_step(
        fixture["Tij_in"][:, 0],
        fixture["depth"][:, 0],
        fixture["K"],
        fixture["target"][:, 0],
        fixture["weight"][:, 0, ..., 0],
    )
    assert step.pose.dtype == torch.float32 and step.delta.dtype == torch.float32
    assert step.hessian.dtype == torch.float64 and step.hessian.shape == (1, 6, 6)
    assert int(step.num_valid[0]) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_oracle_recovers_pose(dtype):
    depth = _box_depth(dtype)
    K = K_CROP[None].to(dtype)
    T_true = se3_exp(torch.tensor([[0.01, -0.015, 0.03, 0.04, -0.03, 0.05]], dtype=torch.float64))
    target = _oracle_target(depth.double(), K.double(), T_true).to(dtype)
    weight = torch.ones_like(depth)
    T = torch.eye(4, dtype=dtype)[None]
    for _ in range(6):
        T = solve_lm_step(T, depth, K, target, weight).pose
    trans_err, rot_err = _pose_error(T, T_true)
    assert trans_err < 1e-6 and rot_err < 1e-6, (trans_err, rot_err)


def test_num_iters_equals_repeated_single_steps():
    depth = _box_depth()
    K = K_CROP[None].double()
    T_true = se3_exp(torch.tensor([[0.02, 0.0, -0.02, 0.0, 0.05, 0.0]], dtype=torch.float64))
    target = _oracle_target(depth, K, T_true)
    weight = torch.rand_like(depth, generator=torch.Generator().manual_seed(0))
    T0 = torch.eye(4, dtype=torch.float64)[None]
    three = solve_lm_step(T0, depth, K, target, weight, num_iters=3)
    T = T0
    for _ in range(3):
        single = solve_lm_step(T, depth, K, target, weight)
        T = single.pose
    torch.testing.assert_close(three.pose, T)
    torch.testing.assert_close(three.deltas[-1], single.delta)
    assert three.deltas.shape == (3, 1, 6)


def test_batch_of_three_equals_singles():
    gen = torch.Generator().manual_seed(1)
    depth = _box_depth().expand(3, -1, -1) + 0.01 * torch.rand(
        3, HEIGHT, WIDTH, generator=gen, dtype=torch.float64
    )
    K = K_CROP[None].double().repeat(3, 1, 1)
    K[1, 0, 0] = 200.0
    K[2, 1, 2] = 22.0
    T_true = se3_exp(0.03 * torch.randn(3, 6, generator=gen, dtype=torch.float64))
    target = _oracle_target(depth, K, T_true) + 0.5 * torch.randn(
        3, HEIGHT, WIDTH, 2, generator=gen, dtype=torch.float64
    )
    weight = torch.rand(3, HEIGHT, WIDTH, generator=gen, dtype=torch.float64)
    T0 = se3_exp(0.01 * torch.randn(3, 6, generator=gen, dtype=torch.float64))
    batch = solve_lm_step(T0, depth, K, target, weight, num_iters=2)
    for i in range(3):
        s = slice(i, i + 1)
        single = solve_lm_step(T0[s], depth[s], K[s], target[s], weight[s], num_iters=2)
        torch.testing.assert_close(batch.pose[s], single.pose, atol=1e-12, rtol=0)
        torch.testing.assert_close(batch.hessian[s], single.hessian)
        torch.testing.assert_close(batch.gradient[s], single.gradient)


def test_foreground_pixels_solve_equals_dense():
    """Leaving out the pixels without reference depth changes no sum but their order."""
    gen = torch.Generator().manual_seed(4)
    depth = _box_depth().expand(2, -1, -1).clone()
    depth[0, :, : WIDTH // 2] = 0.0  # the instances' foregrounds differ
    depth[1, -5:] = 0.0
    K = K_CROP[None].double().repeat(2, 1, 1)
    T_true = se3_exp(0.03 * torch.randn(2, 6, generator=gen, dtype=torch.float64))
    target = _oracle_target(depth, K, T_true) + 0.5 * torch.randn(
        2, HEIGHT, WIDTH, 2, generator=gen, dtype=torch.float64
    )
    weight = torch.rand(2, HEIGHT, WIDTH, generator=gen, dtype=torch.float64)
    pixels = foreground_pixels(depth, MIN_DEPTH)
    assert 0 < len(pixels) < HEIGHT * WIDTH
    options = {"num_iters": 2, "robust": "huber", "robust_scale": 1.0}
    T0 = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    dense = solve_lm_step(T0, depth, K, target, weight, **options)
    sparse = solve_lm_step(T0, depth, K, target, weight, pixels=pixels, **options)
    for name in ("pose", "hessian", "gradient", "residual_rms"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), atol=1e-12, rtol=1e-12)
    assert torch.equal(sparse.num_valid, dense.num_valid)


def test_pixel_stride_solves_on_every_other_row_and_column():
    """LMConfig.pixel_stride 2: the solve equals the dense one whose weights are zero off the grid of
    even rows and columns; stride 1 without ``sparse`` keeps the dense solve; stride 0 is refused."""
    from rnnpose_ros.core.solver import LMConfig, SolverInputError

    gen = torch.Generator().manual_seed(6)
    depth = _box_depth()
    K = K_CROP[None].double()
    T_true = se3_exp(torch.tensor([[0.01, -0.01, 0.02, 0.03, 0.02, -0.02]], dtype=torch.float64))
    target = _oracle_target(depth, K, T_true) + 0.3 * torch.randn(1, HEIGHT, WIDTH, 2, generator=gen).double()
    weight = torch.rand(1, HEIGHT, WIDTH, generator=gen, dtype=torch.float64)
    lm = LMConfig(robust="huber", robust_scale=1.0, pixel_stride=2)
    pixels = lm.solve_pixels(depth)
    rows, cols = pixels // WIDTH, pixels % WIDTH
    assert bool(((rows % 2 == 0) & (cols % 2 == 0)).all())
    assert len(pixels) == int((depth[0, ::2, ::2] > lm.min_depth).sum())
    on_grid = torch.zeros_like(weight)
    on_grid[:, ::2, ::2] = 1.0
    T0 = torch.eye(4, dtype=torch.float64)[None]
    strided = solve_lm_step(T0, depth, K, target, weight, pixels=pixels, **lm.solver_options())
    dense = solve_lm_step(T0, depth, K, target, weight * on_grid, **lm.solver_options())
    torch.testing.assert_close(strided.pose, dense.pose, atol=1e-12, rtol=1e-12)
    assert LMConfig().solve_pixels(depth) is None
    with pytest.raises(SolverInputError, match="pixel_stride"):
        LMConfig(pixel_stride=0).solve_pixels(depth)


def test_render_iteration_with_sparse_solve_equals_dense():
    """LMConfig.sparse: the render iteration picks the foreground once; every inner step is unchanged."""
    from rnnpose_ros.core.loop import Correspondences, run_render_iteration
    from rnnpose_ros.core.solver import LMConfig

    gen = torch.Generator().manual_seed(5)
    depth = _box_depth()
    K = K_CROP[None].double()
    T_true = se3_exp(torch.tensor([[0.01, -0.01, 0.02, 0.03, 0.02, -0.02]], dtype=torch.float64))
    target = _oracle_target(depth, K, T_true) + 0.3 * torch.randn(1, HEIGHT, WIDTH, 2, generator=gen).double()
    weights = [torch.rand(1, HEIGHT, WIDTH, generator=gen).double() for _ in range(3)]

    def run(sparse: bool) -> list:
        lm = LMConfig(robust="huber", robust_scale=1.0, pose_dtype=torch.float64, sparse=sparse)
        correspond = lambda relative, k: Correspondences(target, weights[k])  # noqa: E731
        relative = torch.eye(4, dtype=torch.float64)[None]
        return [step.solve for step in run_render_iteration(correspond, depth, K, relative, 3, lm)]

    for dense, sparse in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(sparse.pose, dense.pose, atol=1e-12, rtol=0)
        assert torch.equal(sparse.num_valid, dense.num_valid)


def test_gradcheck_small_float64_case():
    gen = torch.Generator().manual_seed(2)
    depth = 0.4 + 0.05 * torch.rand(1, 4, 5, generator=gen, dtype=torch.float64)
    K = torch.tensor([[[20.0, 0.0, 2.1], [0.0, 21.0, 1.4], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    T_true = se3_exp(torch.tensor([[0.01, -0.01, 0.02, 0.02, 0.01, -0.03]], dtype=torch.float64))
    target = _oracle_target(depth, K, T_true) + 0.1 * torch.randn(
        1, 4, 5, 2, generator=gen, dtype=torch.float64
    )
    weight = torch.rand(1, 4, 5, generator=gen, dtype=torch.float64) + 0.1
    T0 = se3_exp(torch.tensor([[0.002, 0.0, 0.001, 0.0, 0.004, 0.0]], dtype=torch.float64))

    def pose_of(target_, weight_, depth_, T_):
        return solve_lm_step(T_, depth_, K, target_, weight_, ep_lambda=1e-3).pose

    inputs = (target.requires_grad_(), weight.requires_grad_(), depth.requires_grad_(), T0.requires_grad_())
    assert torch.autograd.gradcheck(pose_of, inputs, fast_mode=True)


def test_robust_weights_values():
    residual = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    torch.testing.assert_close(robust_weights(residual, "huber", 2.0), torch.tensor([1.0, 0.4, 1.0]))
    torch.testing.assert_close(robust_weights(residual, "cauchy", 5.0), torch.tensor([1.0, 0.5, 1 / 1.04]))
    with pytest.raises(SolverInputError):
        robust_weights(residual, "tukey", 1.0)
    with pytest.raises(SolverInputError):
        robust_weights(residual, "huber", 0.0)


@pytest.mark.parametrize("kind", ["huber", "cauchy"])
def test_robust_variant_rejects_outliers(kind):
    depth = _box_depth()
    K = K_CROP[None].double()
    T_true = se3_exp(torch.tensor([[0.01, 0.01, -0.02, 0.02, 0.0, -0.03]], dtype=torch.float64))
    target = _oracle_target(depth, K, T_true)
    gen = torch.Generator().manual_seed(3)
    outliers = torch.rand(depth.shape, generator=gen, dtype=torch.float64) < 0.15
    target = torch.where(outliers[..., None], target + 15.0 + 10 * torch.rand_like(target), target)
    weight = torch.ones_like(depth)
    T_plain = T_robust = torch.eye(4, dtype=torch.float64)[None]
    for _ in range(6):
        T_plain = solve_lm_step(T_plain, depth, K, target, weight).pose
        T_robust = solve_lm_step(T_robust, depth, K, target, weight, robust=kind, robust_scale=1.0).pose
    plain_t, _ = _pose_error(T_plain, T_true)
    robust_t, robust_r = _pose_error(T_robust, T_true)
    assert robust_t < 0.1 * plain_t
    assert robust_t < 5e-3 and robust_r < 2e-2  # Huber keeps a bounded bias from one-sided outliers


def test_degenerate_inputs_give_zero_steps():
    depth = _box_depth()
    K = K_CROP[None].double()
    T0 = se3_exp(torch.tensor([[0.01, 0.0, 0.0, 0.0, 0.0, 0.02]], dtype=torch.float64))
    target = _oracle_target(depth, K, torch.eye(4, dtype=torch.float64)[None])
    # No weight at all.
    step = solve_lm_step(T0, depth, K, target, torch.zeros_like(depth))
    torch.testing.assert_close(step.pose, T0)
    assert int(step.num_valid[0]) == 0 and float(step.residual_rms[0]) == 0.0
    # Everything closer than the 0.1 m validity threshold (an object at 5 cm).
    close = torch.full_like(depth, 0.05)
    step = solve_lm_step(T0, close, K, target, torch.ones_like(depth))
    torch.testing.assert_close(step.pose, T0)
    # ...unless the threshold is lowered explicitly.
    step = solve_lm_step(T0, close, K, target, torch.ones_like(depth), min_depth=0.01)
    assert int(step.num_valid[0]) > 0
    # Non-finite correspondences give a zero step, not NaN.
    bad = target.clone()
    bad[0, 10, 10] = float("nan")
    step = solve_lm_step(T0, depth, K, bad, torch.ones_like(depth))
    assert torch.isfinite(step.pose).all()
    torch.testing.assert_close(step.pose, T0)
    # Increments are clamped to ±1 (m / rad).
    H = 1e-3 * torch.eye(6, dtype=torch.float64)[None]
    x = solve_clamped(H, torch.tensor([[5.0, -0.2, 0.1, 1e-4, -3.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(x, torch.tensor([[1.0, -1.0, 1.0, 0.1, -1.0, 0.0]], dtype=torch.float64))


def test_input_validation():
    depth = _box_depth()
    K = K_CROP[None].double()
    target = torch.zeros(*depth.shape, 2, dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64)[None]
    with pytest.raises(SolverInputError):
        solve_lm_step(T, depth, K, target[..., :1], torch.ones_like(depth))
    with pytest.raises(SolverInputError):
        solve_lm_step(T, depth, K, target, torch.ones_like(depth)[..., None])
    with pytest.raises(SolverInputError):
        solve_lm_step(T, depth, K, target, torch.ones_like(depth), num_iters=0)
    with pytest.raises(SolverInputError):
        solve_lm_step(T, depth, K, target, torch.ones_like(depth), robust="tukey")
