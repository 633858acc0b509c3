"""The refiner's score (documented in rnnpose_ros/core/refiner.py): RGB, the agreeing share of the
silhouette; with depth, the depth agreement times the image agreement over the evidence."""

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


def test_rgb_score_is_the_agreeing_share_of_the_silhouette(refiner):
    view = disc_view()
    identity = torch.eye(4, dtype=torch.float64)[None]
    assert float(refiner._score(view, correspondences(view, 0.0, 1.0), identity, None)) == pytest.approx(1.0)
    half = float(refiner._score(view, correspondences(view, 0.0, 0.5), identity, None))
    assert half == pytest.approx(float((view.depth[:, : SIZE // 2] > 0).sum() / (view.depth > 0).sum()))
    assert float(refiner._score(view, correspondences(view, 5.0, 1.0), identity, None)) == 0.0


def exact_depth(view: RenderState, observed: torch.Tensor | None = None) -> DepthTerm:
    observed = view.depth.clone() if observed is None else observed
    return DepthTerm(view.depth, K, observed, torch.ones(1), DepthTermConfig())


def test_depth_score_counts_only_the_evidence(refiner):
    view = disc_view()
    identity = torch.eye(4, dtype=torch.float64)[None]
    term = exact_depth(view)
    full = refiner._score(view, correspondences(view, 0.0, 1.0), identity, term)
    half_hidden = refiner._score(view, correspondences(view, 0.0, 0.5), identity, term)
    assert float(full) == pytest.approx(1.0) and float(half_hidden) == pytest.approx(1.0)
    # The image evidence against the pose lowers the score by its share.
    against = refiner._score(view, correspondences(view, 5.0, 0.5), identity, term)
    assert float(against) == pytest.approx(0.75)
    # A sliver of confident pixels (one row, ≈ 2 % of the silhouette) is not a confirmed pose.
    sliver = correspondences(view, 0.0, 1.0)
    sliver.weight[:, :31] = 0.0
    sliver.weight[:, 32:] = 0.0
    assert float(refiner._score(view, sliver, identity, term)) < 0.75 + 0.25 * 0.5


def test_depth_score_follows_the_depth_agreement(refiner):
    view = disc_view()
    identity = torch.eye(4, dtype=torch.float64)[None]
    corr = correspondences(view, 0.0, 1.0)
    # The observed surface 3 cm behind the rendering: the image agrees, the depth does not.
    behind = exact_depth(view, view.depth + 0.03)
    assert float(refiner._score(view, corr, identity, behind)) < 0.1
    # An occluder in front of half the object is not evidence against the pose.
    occluded = view.depth.clone()
    occluded[:, SIZE // 2 :] = 0.3
    score = refiner._score(view, correspondences(view, 0.0, 0.5), identity, exact_depth(view, occluded))
    assert float(score) > 0.95
