"""Training losses: parity with the published loss code (golden ``training`` fixtures) and
fixture-free properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rnnpose_ros.core.geometry import make_pose, se3_exp
from rnnpose_ros.core.losses import (
    CircleConfig,
    DescriptorCorrespondences,
    LossInputError,
    circle_loss,
    descriptor_loss,
    flow_loss,
    flow_targets,
    pair_distance,
    point_alignment_loss,
    sample_descriptor_pairs,
)
from rnnpose_ros.tools.parity_common import load_fixture
from rnnpose_ros.tools.parity_losses import CHECKS

from conftest import run_check_parity


@pytest.fixture
def training_golden(golden: Path) -> Path:
    path = golden / "training"
    if not path.is_dir():
        pytest.skip(f"training fixtures not found at {path}")
    return path


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_golden_parity(training_golden: Path, kind: str) -> None:
    comparisons = CHECKS[kind](load_fixture(training_golden / f"{kind}.pt"))
    failed = [c for c in comparisons if not c.passed]
    assert len(comparisons) >= 8
    assert not failed, failed


def test_check_parity_cli_runs_the_loss_checks(training_golden: Path) -> None:
    result = run_check_parity(training_golden, *sorted(CHECKS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout


def test_background_pairs_are_positives_whatever_the_accumulation() -> None:
    far = torch.full((3, 3), 1e7)
    near = torch.rand(2, 3)
    points = torch.cat([near, far])
    distances = pair_distance(points, points)
    assert (distances[2:, 2:] < CircleConfig().pos_radius).all()
    assert (distances[:2, 2:] > CircleConfig().safe_radius).all()


def test_circle_loss_prefers_matching_descriptors() -> None:
    generator = torch.Generator().manual_seed(0)
    coords = torch.rand(32, 3, generator=generator)
    coords_dist = pair_distance(coords, coords)
    descriptors = torch.nn.functional.normalize(torch.randn(32, 8, generator=generator), dim=1)
    matched = circle_loss(coords_dist, (2 - 2 * descriptors @ descriptors.T).clamp_min(1e-12).sqrt())
    shuffled = descriptors[torch.randperm(32, generator=generator)]
    unmatched = circle_loss(coords_dist, (2 - 2 * descriptors @ shuffled.T).clamp_min(1e-12).sqrt())
    assert matched < unmatched


def test_flow_loss_vanishes_at_the_target_and_counts_all_elements() -> None:
    depth = torch.zeros(1, 16, 20)
    depth[:, 4:12, 5:15] = 0.5
    K = torch.tensor([[[100.0, 0, 10], [0, 100.0, 8], [0, 0, 1]]])
    Ti = make_pose(torch.eye(3)[None], torch.tensor([[0.0, 0.0, 0.5]]))
    T_gt = se3_exp(torch.tensor([[0.01, -0.005, 0.02, 0.02, 0.01, -0.03]])) @ Ti
    targets = flow_targets(depth, K, Ti, T_gt, torch.eye(4)[None])
    loss, valid = flow_loss(targets.flow.clone(), targets)
    assert loss == 0 and valid.sum() == 80
    shifted, _ = flow_loss(targets.flow + 1.0, targets)
    assert shifted.item() == pytest.approx(80 * 2 / (2 * 16 * 20))


def test_point_alignment_loss_is_the_mean_l1_displacement() -> None:
    points = torch.rand(50, 3)
    pose = make_pose(torch.eye(3)[None], torch.tensor([[0.01, -0.02, 0.03]]))
    loss = point_alignment_loss(points, pose, torch.eye(4)[None])
    assert loss.item() == pytest.approx(0.06, rel=1e-5)


def test_sampling_with_a_seeded_random_state_repeats_the_global_draws() -> None:
    matches = np.stack([np.arange(400), np.arange(400) % 50], 1)
    np.random.seed(5)
    expected_draw = np.random.randint(0, 300, size=40)
    expected_perm = np.random.permutation(440)
    sampled = sample_descriptor_pairs(matches, 400, 50, 300, np.random.RandomState(5))
    assert np.array_equal(sampled.background_draw, expected_draw)
    assert np.array_equal(sampled.permutation, expected_perm)
    assert len(sampled.pairs) == CircleConfig().max_pairs


def test_descriptor_loss_without_correspondences_is_an_error() -> None:
    empty = DescriptorCorrespondences(
        np.zeros((4, 3), np.float32),
        np.zeros((0, 3), np.float32),
        np.zeros((0, 2), np.int64),
        np.zeros((0, 2), np.int64),
    )
    with pytest.raises(LossInputError, match="no 2D–3D correspondence"):
        descriptor_loss(
            torch.zeros(8, 4, 4),
            torch.zeros(4, 8),
            torch.zeros(4, 4, dtype=torch.bool),
            empty,
            np.random.RandomState(0),
        )
