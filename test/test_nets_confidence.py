"""Descriptor confidence weight: golden parity and fixture-free properties."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rnnpose_ros.core.nets.confidence import (
    ConfidenceInputError,
    correspondence_target,
    descriptor_confidence,
)
from rnnpose_ros.tools.parity_common import load_fixture
from rnnpose_ros.tools.parity_nets2d import check_confidence


def _unit_descriptors(batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    return F.normalize(torch.randn(batch, channels, height, width), dim=1)


def test_golden_parity(golden: Path) -> None:
    # Elementwise ops and grid_sample only: no oneDNN kernel choice involved, so it runs in-process.
    comparisons = check_confidence(load_fixture(golden / "confidence.pt"))
    assert [c.name for c in comparisons] == [
        "correspondence_target",
        "warped_observed",
        "similarity",
        "weight",
    ]
    assert all(c.passed for c in comparisons), comparisons


def test_target_is_pixel_plus_flow() -> None:
    flow = torch.randn(2, 2, 3, 5)
    target = correspondence_target(flow)
    assert target.shape == (2, 3, 5, 2)
    torch.testing.assert_close(target[1, 2, 4], torch.tensor([4.0, 2.0]) + flow[1, :, 2, 4])


def test_consistent_sampling_with_integer_flow_is_an_exact_shift() -> None:
    height, width = 12, 16
    observed = _unit_descriptors(1, 8, height, width)
    flow = torch.zeros(1, 2, height, width)
    flow[:, 0], flow[:, 1] = 3.0, -2.0
    result = descriptor_confidence(observed, observed, flow, torch.ones(1, height, width), 0.75, False)
    torch.testing.assert_close(result.warped_observed[..., 2:, : width - 3], observed[..., : height - 2, 3:])
    # Targets that leave the map sample zeros.
    assert bool((result.warped_observed[..., :2, :] == 0).all())
    assert bool((result.warped_observed[..., :, width - 3 :] == 0).all())


def test_identity_correspondences_get_full_weight_on_foreground_only() -> None:
    height, width = 10, 14
    descriptors = _unit_descriptors(1, 16, height, width)
    depth = torch.zeros(1, 1, height, width)
    depth[..., 2:8, 3:11] = 0.6
    zero_flow = torch.zeros(1, 2, height, width)
    consistent = descriptor_confidence(
        descriptors, descriptors, zero_flow, depth, torch.tensor([0.75]), False
    )
    torch.testing.assert_close(consistent.similarity, torch.ones(1, height, width))
    torch.testing.assert_close(consistent.weight, (depth[:, 0] > 0).float())
    # The published sampling is off by up to half a pixel, so even the identity loses weight.
    published = descriptor_confidence(descriptors, descriptors, zero_flow, depth, torch.tensor([0.75]), True)
    assert float(published.weight.sum()) < float(consistent.weight.sum())
    assert bool((published.weight[depth[:, 0] == 0] == 0).all())


def test_weight_formula_and_sigma_forms() -> None:
    rendered, observed = _unit_descriptors(1, 4, 6, 8), _unit_descriptors(1, 4, 6, 8)
    flow, depth = torch.randn(1, 2, 6, 8), torch.ones(1, 6, 8)
    as_float = descriptor_confidence(rendered, observed, flow, depth, 0.5)
    as_tensor = descriptor_confidence(rendered, observed, flow, depth, torch.tensor([0.5]))
    torch.testing.assert_close(as_float.weight, as_tensor.weight)
    torch.testing.assert_close(as_float.weight, torch.exp(-(1 - as_float.similarity).abs() / 0.5))


def test_batch_of_two_equals_two_singles() -> None:
    rendered, observed = _unit_descriptors(2, 8, 9, 13), _unit_descriptors(2, 8, 9, 13)
    flow, depth = 2 * torch.randn(2, 2, 9, 13), torch.rand(2, 9, 13) - 0.2
    batched = descriptor_confidence(rendered, observed, flow, depth, 0.75)
    for i in range(2):
        single = descriptor_confidence(
            rendered[i : i + 1], observed[i : i + 1], flow[i : i + 1], depth[i : i + 1], 0.75
        )
        for field in range(4):
            torch.testing.assert_close(batched[field][i : i + 1], single[field])


def test_shape_errors() -> None:
    descriptors = torch.zeros(1, 4, 6, 8)
    with pytest.raises(ConfidenceInputError):
        descriptor_confidence(
            descriptors, torch.zeros(1, 4, 6, 7), torch.zeros(1, 2, 6, 8), torch.ones(1, 6, 8), 1.0
        )
    with pytest.raises(ConfidenceInputError):
        descriptor_confidence(descriptors, descriptors, torch.zeros(1, 2, 8, 6), torch.ones(1, 6, 8), 1.0)
    with pytest.raises(ConfidenceInputError):
        descriptor_confidence(descriptors, descriptors, torch.zeros(1, 2, 6, 8), torch.ones(2, 6, 8), 1.0)
