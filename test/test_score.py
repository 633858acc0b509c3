"""The refiner's score (rnnpose_ros/core/score.py): the share of the confident evidence that the pose
explains, with a floor on how little evidence may confirm a pose, times the depth agreement with depth.
Unit cases on a synthetic disc, then the real refiner on generated scenes (occluded duck, wrong pose)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from rnnpose_ros.core import metrics
from rnnpose_ros.core.backends.base import RenderState
from rnnpose_ros.core.backends.classical import ClassicalBackend
from rnnpose_ros.core.depth_sensor import DepthSensorModel
from rnnpose_ros.core.depth_term import DepthTerm, DepthTermConfig
from rnnpose_ros.core.geometry import pixel_grid
from rnnpose_ros.core.loop import Correspondences
from rnnpose_ros.core.refiner import Instance, Refiner, RefineStatus, rotation_hypotheses
from rnnpose_ros.core.score import IMAGE_SHARE_WITH_DEPTH, MIN_EVIDENCE_SHARE, pose_score
from rnnpose_ros.core.synth import SceneSpec, make_scene

SIZE = 64
K = torch.tensor([[[200.0, 0.0, 31.5], [0.0, 200.0, 31.5], [0.0, 0.0, 1.0]]])
INLIER_PX = 3.0
IDENTITY = torch.eye(4, dtype=torch.float64)[None]


def disc_view() -> RenderState:
    """A fronto-parallel disc 0.5 m ahead filling most of the crop."""
    grid = pixel_grid(SIZE, SIZE)
    inside = ((grid - 31.5) ** 2).sum(-1) < 28.0**2
    return RenderState(K=K, depth=torch.where(inside, 0.5, 0.0)[None].float())


def correspondences(view: RenderState, shift_px: float, rows: tuple[int, int] = (0, SIZE)) -> Correspondences:
    """Targets ``shift_px`` to the right of where the identity pose projects; weight 1 on ``rows`` of the
    crop (elsewhere hidden or without texture: weight 0)."""
    target = pixel_grid(SIZE, SIZE)[None].clone()
    target[..., 0] += shift_px
    weight = torch.zeros(1, SIZE, SIZE)
    weight[:, rows[0] : rows[1]] = 1.0
    return Correspondences(target=target, weight=weight * (view.depth > 0))


def score(view: RenderState, steps: list[Correspondences], term: DepthTerm | None = None) -> float:
    return float(pose_score(view.depth, view.K, steps, IDENTITY, term, INLIER_PX, 0.0))


def test_rgb_score_counts_only_the_confident_evidence():
    view = disc_view()
    assert score(view, [correspondences(view, 0.0)]) == pytest.approx(1.0)
    # Half of the object hidden (no confident correspondence there): not evidence against the pose.
    assert score(view, [correspondences(view, 0.0, (0, SIZE // 2))]) == pytest.approx(1.0)
    assert score(view, [correspondences(view, 5.0)]) == 0.0
    # Within τ counts as agreeing.
    assert score(view, [correspondences(view, INLIER_PX - 0.5)]) == pytest.approx(1.0)


def test_rgb_score_needs_enough_evidence():
    """A sliver of confident pixels (2 rows, ≈ 4.5 % of the silhouette) does not confirm a pose: its
    agreement counts over MIN_EVIDENCE_SHARE of the silhouette."""
    view = disc_view()
    sliver = correspondences(view, 0.0, (31, 33))
    share = float(sliver.weight.sum() / (view.depth > 0).sum())
    assert score(view, [sliver]) == pytest.approx(share / MIN_EVIDENCE_SHARE)
    assert score(view, [sliver]) < 0.25


def test_rgb_score_pools_every_inner_step():
    """One step's correspondences (e.g. the silhouette flow) agree, another's (the texture flow) do not."""
    view = disc_view()
    assert score(view, [correspondences(view, 0.0), correspondences(view, 6.0)]) == pytest.approx(0.5)
    assert score(view, [correspondences(view, 0.0), correspondences(view, 0.0)]) == pytest.approx(1.0)


def exact_depth(view: RenderState, observed: torch.Tensor | None = None) -> DepthTerm:
    observed = view.depth.clone() if observed is None else observed
    return DepthTerm(view.depth, K, observed, torch.ones(1), DepthTermConfig())


def test_depth_score_is_the_depth_agreement_times_the_image_part():
    view = disc_view()
    term = exact_depth(view)
    assert score(view, [correspondences(view, 0.0)], term) == pytest.approx(1.0)
    assert score(view, [correspondences(view, 0.0, (0, SIZE // 2))], term) == pytest.approx(1.0)
    # The image evidence against the pose lowers the score by the image share.
    against = score(view, [correspondences(view, 5.0, (0, SIZE // 2))], term)
    assert against == pytest.approx(1.0 - IMAGE_SHARE_WITH_DEPTH)


def test_depth_score_follows_the_depth_agreement():
    view = disc_view()
    corr = correspondences(view, 0.0)
    # The observed surface 3 cm behind the rendering: the image agrees, the depth does not.
    assert score(view, [corr], exact_depth(view, view.depth + 0.03)) < 0.1
    # An occluder in front of half the object is not evidence against the pose.
    occluded = view.depth.clone()
    occluded[:, SIZE // 2 :] = 0.3
    assert score(view, [correspondences(view, 0.0, (0, SIZE // 2))], exact_depth(view, occluded)) > 0.95


@pytest.mark.parametrize("with_depth", [False, True], ids=["rgb", "rgbd"])
def test_score_on_generated_scenes(duck_registry, renderer, with_depth):
    """The real refiner (classical, fine stage, no restarts) on a generated scene whose duck occluder
    patches hide part of: refined from the truth it keeps a high score; refined from a pose turned 60°
    out of plane (beyond the flow's basin) it ends outside ADD(-S)@0.1d and scores low."""
    duck = duck_registry["duck"]
    spec = SceneSpec(occluders=2, depth=DepthSensorModel() if with_depth else None)
    scene = next(
        scene
        for scene in (make_scene([duck], seed, renderer, spec) for seed in range(20))
        if scene.instances[0].visible_fraction < 0.85
    )
    truth = scene.instances[0]
    wrong = rotation_hypotheses(truth.pose_gt, duck.center, 60.0, 1)[0]
    loop = replace(
        ClassicalBackend.default_loop(), restart_below_score=None, outer_iterations=3, first_iteration=5
    )
    refiner = Refiner(duck_registry, config=loop, renderer=renderer)
    right, stuck = refiner.refine(
        scene.observation, [Instance("duck", truth.pose_gt), Instance("duck", wrong)]
    )
    assert right.status is RefineStatus.OK and stuck.status is RefineStatus.OK
    assert metrics.pose_errors(duck, right.pose, truth.pose_gt, scene.K).add_fraction < 0.1
    assert metrics.pose_errors(duck, stuck.pose, truth.pose_gt, scene.K).add_fraction > 0.1
    assert right.score > 0.8
    assert stuck.score < 0.5
    assert np.isfinite([right.score, stuck.score]).all()
