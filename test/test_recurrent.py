"""The recurrent correspondence stage: refine_core parity and batching."""

from __future__ import annotations

import torch

from rnnpose_ros.core.loop import run_render_iteration
from rnnpose_ros.core.recurrent import predict_correspondences, solver_depth, start_render_iteration
from rnnpose_ros.core.solver import LMConfig
from rnnpose_ros.tools.parity_common import load_fixture
from rnnpose_ros.tools.parity_refine import check_refine_core, load_referenced_weights, reference_from_fixture


def test_refine_core_matches_published(golden) -> None:
    torch.set_num_threads(2)
    failed = [c for c in check_refine_core(load_fixture(golden / "refine_core.pt"), golden) if not c.passed]
    assert not failed, "\n".join(
        f"{c.name}: max abs {c.max_abs:.3g} rel {c.max_rel:.3g} {c.detail}" for c in failed
    )


def test_batch_of_two_equals_two_singles(golden) -> None:
    """Two instances in one batch (the second with a shifted start pose) give what each gives alone."""
    fixture = load_fixture(golden / "refine_core.pt")
    net = load_referenced_weights(fixture, golden)
    ref = reference_from_fixture(fixture["inputs"])
    start = torch.eye(4).repeat(2, 1, 1)
    start[1, :3, 3] = torch.tensor([0.004, -0.003, 0.01])
    batched = type(ref)(**{k: None if v is None else torch.cat([v, v]) for k, v in vars(ref).items()})

    def final_pose(reference, relative):
        state = start_render_iteration(net, reference)
        correspond = lambda Tij, _: predict_correspondences(net, state, Tij)  # noqa: E731
        depth = solver_depth(reference.depth)
        return list(run_render_iteration(correspond, depth, reference.K, relative, 2, LMConfig()))[
            -1
        ].solve.pose

    with torch.no_grad():
        pose_b = final_pose(batched, start)
        singles = [final_pose(ref, start[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(pose_b, torch.cat(singles), atol=1e-5, rtol=0)
    assert not torch.allclose(pose_b[0], pose_b[1]), "different starts must give different results"
