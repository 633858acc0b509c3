"""The refiner's score: agreement of the evidence with the pose, normalised by the evidence, and the
depth agreement when there is depth (documented in rnnpose_ros/core/refiner.py)."""

from __future__ import annotations

import pytest
import torch

from rnnpose_ros.core.backends.base import RenderState
from rnnpose_ros.core.depth_term import DepthTerm, DepthTermConfig
from rnnpose_ros.core.geometry import pixel_grid
from rnnpose_ros.core.loop import Correspondences
from rnnpose_ros.core.objects import ObjectRegistry
from rnnpose_ros.core.refiner import Refiner

SIZE = 64
K = torch.tensor([[[200.0, 0.0, 31.5], [0.0, 200.0, 31.5], [0.0, 0.0, 1.0]]])


@pytest.fixture(scope="module")
def refiner() -> Refiner:
    return Refiner(ObjectRegistry(models={}))


def disc_view() -> RenderState:
    """A fronto-parallel disc 0.5 m ahead filling most of the crop."""
    grid = pixel_grid(SIZE, SIZE)
    inside = ((grid - 31.5) ** 2).sum(-1) < 28.0**2
    return RenderState(K=K, depth=torch.where(inside, 0.5, 0.0)[None].float())


def correspondences(view: RenderState, shift_px: float, weight_share: float) -> Correspondences:
    """Targets ``shift_px`` to the right of where the identity pose projects; weight 1 on the top
    ``weight_share`` of the rows (the rest hidden or without texture: weight 0)."""
    target = pixel_grid(SIZE, SIZE)[None].clone()
    target[..., 0] += shift_px
    weight = torch.zeros(1, SIZE, SIZE)
    weight[:, : int(SIZE * weight_share)] = 1.0
    return Correspondences(target=target, weight=weight * (view.depth > 0))


def test_score_counts_only_the_evidence(refiner):
    view = disc_view()
    identity = torch.eye(4, dtype=torch.float64)[None]
    full = refiner._score(view, correspondences(view, 0.0, 1.0), identity, None)
    half_hidden = refiner._score(view, correspondences(view, 0.0, 0.5), identity, None)
    assert float(full) == pytest.approx(1.0) and float(half_hidden) == pytest.approx(1.0)
    # Consistent evidence against the pose: 0, however much of it there is.
    assert float(refiner._score(view, correspondences(view, 5.0, 0.5), identity, None)) == 0.0
    # A sliver of confident pixels (one row, ≈ 2 % of the silhouette) is not a confirmed pose.
    sliver = correspondences(view, 0.0, 1.0)
    sliver.weight[:, :31] = 0.0
    sliver.weight[:, 32:] = 0.0
    assert float(refiner._score(view, sliver, identity, None)) < 0.5


def test_score_with_depth_is_the_depth_agreement_times_the_image_agreement(refiner):
    view = disc_view()
    identity = torch.eye(4, dtype=torch.float64)[None]
    corr = correspondences(view, 0.0, 1.0)
    observed = view.depth.clone()
    term = DepthTerm(view.depth, K, observed, torch.ones(1), DepthTermConfig())
    assert float(refiner._score(view, corr, identity, term)) == pytest.approx(1.0)
    # The observed surface 3 cm behind the rendering: the image agrees, the depth does not.
    behind = DepthTerm(view.depth, K, observed + 0.03, torch.ones(1), DepthTermConfig())
    assert float(refiner._score(view, corr, identity, behind)) < 0.1
    # An occluder in front of half the object is not evidence against the pose.
    occluded = observed.clone()
    occluded[:, SIZE // 2 :] = 0.3
    term = DepthTerm(view.depth, K, occluded, torch.ones(1), DepthTermConfig())
    assert float(refiner._score(view, correspondences(view, 0.0, 0.5), identity, term)) > 0.95
