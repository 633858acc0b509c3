"""Parity checks of the SE(3) helpers and the LM solver against the golden ``lm_step`` fixture.

The fixture keeps the published singleton frame axis (B, 1, …); it is dropped before calling the
batched API and restored for the comparison. Tolerances are those of the golden README.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rnnpose_ros.core.geometry import se3_exp, se3_inverse, se3_log
from rnnpose_ros.core.solver import solve_clamped, solve_lm_step
from rnnpose_ros.tools.parity_common import Comparison, FixtureCheck, compare

H_TOL = {"atol": 0.0, "rtol": 1e-6}
POSE_TOL = {"atol": 1e-6, "rtol": 1e-6}
# Our own log has no published counterpart; the golden README recommends this round-trip tolerance
# in float32.
LOG_ROUND_TRIP_ATOL = 1e-5


def _solve(fixture: dict, num_iters: int, ep_lambda: float, lm_lambda: float):
    """Run our solver on the fixture inputs with the frame axis (B, 1, …) dropped."""
    return solve_lm_step(
        fixture["Tij_in"][:, 0],
        fixture["depth"][:, 0],
        fixture["K"],
        fixture["target"][:, 0],
        fixture["weight"][:, 0, ..., 0],
        num_iters=num_iters,
        ep_lambda=ep_lambda,
        lm_lambda=lm_lambda,
    )


def check_lm_step(fixture: dict, fixture_dir: Path | None = None) -> list[Comparison]:
    """Compare H_damped, b, δ, T_out (1 and 2 iterations), the clamped solve and the SE(3) helpers.

    Args:
        fixture: the loaded ``lm_step*.pt`` dict (any image size and batch).
        fixture_dir: folder of the fixture (unused: the file is self-contained).
    """
    del fixture_dir
    ep_lambda = float(fixture.get("ep_lambda", 100.0))
    lm_lambda = float(fixture.get("lm_lambda", 1e-4))
    with torch.no_grad():
        one = _solve(fixture, 1, ep_lambda, lm_lambda)
        two = _solve(fixture, 2, ep_lambda, lm_lambda)
        results = [
            compare("H_damped", one.hessian[:, None], fixture["H_damped"], **H_TOL),
            compare("b", one.gradient[:, None], fixture["b"], **H_TOL),
            compare("delta", one.delta[:, None], fixture["delta"], **POSE_TOL),
            compare("Tij_out", one.pose[:, None], fixture["Tij_out"], **POSE_TOL),
            compare("delta_2iters", two.deltas[:, :, None], fixture["delta_2iters"], **POSE_TOL),
            compare("Tij_out_2iters", two.pose[:, None], fixture["Tij_out_2iters"], **POSE_TOL),
        ]
        results.append(_check_clamped_solve(fixture["delta_clamp_solve"]))

        xi = fixture["se3_xi"]
        exp = se3_exp(xi)
        results.append(compare("se3_exp", exp, fixture["se3_exp"], **POSE_TOL))
        results.append(
            compare(
                "se3_inverse_of_exp",
                se3_inverse(fixture["se3_exp"]),
                fixture["se3_inverse_of_exp"],
                **POSE_TOL,
            )
        )
        # On the group: a principal log returns another twist than ξ when its angle exceeds π.
        results.append(
            compare("se3_log_round_trip", se3_exp(se3_log(exp)), exp, atol=LOG_ROUND_TRIP_ATOL, rtol=0.0)
        )
    return results


def _check_clamped_solve(case: dict) -> Comparison:
    """x = clamp(H⁻¹b) of a hand-made (already damped) system whose solution leaves [−1, 1]."""
    x = solve_clamped(case["H"][:, 0].to(torch.float64), case["b"][:, 0].to(torch.float64))
    return compare("delta_clamp_solve", x.to(case["x"].dtype)[:, None], case["x"], **POSE_TOL)


CHECKS: dict[str, FixtureCheck] = {"lm_step": check_lm_step}
