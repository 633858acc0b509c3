"""The recurrent correspondence stage: refine_core parity and batching."""

from __future__ import annotations

import torch

from rnnpose_ros.core.recurrent import run_render_iteration
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
    batched = type(ref)(**{k: torch.cat([v, v]) for k, v in vars(ref).items()})
    with torch.no_grad():
        pose_b, _ = run_render_iteration(net, batched, start, num_steps=2)
        singles = [run_render_iteration(net, ref, start[i : i + 1], num_steps=2)[0] for i in range(2)]
    torch.testing.assert_close(pose_b, torch.cat(singles), atol=1e-5, rtol=0)
    assert not torch.allclose(pose_b[0], pose_b[1]), "different starts must give different results"
