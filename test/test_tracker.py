"""Tracking engine without ROS: stable instance ids, synthetic sequences, the tracker on an occlusion."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from rnnpose_ros.core.association import Candidate, InstanceIds, pose_distance
from rnnpose_ros.core.sequence import SequenceSpec, make_sequence
from rnnpose_ros.core.synth import SceneSpec
from rnnpose_ros.core.tracker import Seed, Tracker, TrackerConfig, TrackEvent

# Small fast frames: no supersampling; the tracker's crops do not depend on the image size.
FAST_SCENE = SceneSpec(supersample=1, distance=(0.4, 0.8))


def _geometry(registry) -> dict:
    return {m.class_id: (m.center, m.diameter) for m in registry}


def _posed(distance_m: float, x: float = 0.0) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, 3] = (x, 0.0, distance_m)
    return pose


def test_pose_distance_counts_the_line_of_sight_a_quarter():
    centre = np.zeros(3)
    a = _posed(1.0)
    assert pose_distance(centre, 0.1, a, _posed(1.0, x=0.05)) == pytest.approx(0.5)
    assert pose_distance(centre, 0.1, a, _posed(1.2)) == pytest.approx(0.5)


def test_instance_id_rules(duck_registry):
    ids = InstanceIds(_geometry(duck_registry), gate=1.0, forget_after=2)
    here, there = _posed(0.6), _posed(0.6, x=0.5)
    first = ids.assign([Candidate("duck", here), Candidate("duck", there)])
    assert first == ["duck_0", "duck_1"]
    ids.observe(first, ["duck", "duck"], [here, there])
    # Order reversed, poses kept: the ids follow the poses. A detector id wins and is kept as given.
    assert ids.assign([Candidate("duck", there), Candidate("duck", here)]) == ["duck_1", "duck_0"]
    assert ids.assign([Candidate("duck", there, "7"), Candidate("duck", here)]) == ["duck_7", "duck_0"]
    # Beyond the gate: a new instance gets the lowest free index.
    far = _posed(0.6, x=-0.5)
    assert ids.assign([Candidate("duck", far)]) == ["duck_2"]
    # Unseen ids are forgotten after forget_after frames, and their index is free again.
    ids.observe(["duck_0"], ["duck"], [here])
    assert set(ids.known) == {"duck_0", "duck_1"}
    ids.observe(["duck_0"], ["duck"], [here])
    assert set(ids.known) == {"duck_0"}
    assert ids.assign([Candidate("duck", here), Candidate("duck", far)]) == ["duck_0", "duck_1"]


def test_shuffled_detector_keeps_ids_per_physical_instance(duck_registry, renderer):
    """Three ducks, a detector reporting them in random order with the standard noise on every frame of
    a 30-frame sequence: every physical duck keeps one name."""
    duck = duck_registry["duck"]
    spec = SequenceSpec(frames=30, detect_every=1, scene=dataclasses.replace(FAST_SCENE, size=(240, 320)))
    spec = dataclasses.replace(spec, scene=dataclasses.replace(spec.scene, distance=(0.8, 1.4)))
    ids = InstanceIds(_geometry(duck_registry))
    names_of: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}
    orders = set()
    for frame in make_sequence([duck, duck, duck], 3, renderer, spec):
        order = frame.detections
        orders.add(tuple(order))
        candidates = [Candidate("duck", frame.instances[i].pose_init) for i in order]
        names = ids.assign(candidates)
        ids.observe(names, ["duck"] * len(names), [c.pose for c in candidates])
        for i, name in zip(order, names, strict=True):
            names_of[i].add(name)
    assert len(orders) > 1, "the detector should have reordered its detections"
    assert all(len(names) == 1 for names in names_of.values()), names_of
    assert len(set.union(*names_of.values())) == 3


def test_sequence_is_deterministic_with_sparse_detections_and_occlusion(duck_registry, renderer):
    duck = duck_registry["duck"]
    spec = SequenceSpec(frames=6, detect_every=2, occlusion=(3, 2), scene=FAST_SCENE)
    first = list(make_sequence([duck], 5, renderer, spec))
    again = list(make_sequence([duck], 5, renderer, spec))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again, strict=True))
    assert [bool(f.detections) for f in first] == [True, False, True, False, False, False]
    visible = [f.instances[0].visible_fraction for f in first]
    assert visible[3] == visible[4] == 0.0 and min(visible[:3] + visible[5:]) > 0.9
    # The camera moves: the object's pose changes from frame to frame, smoothly.
    steps = [
        np.linalg.norm(b.instances[0].pose_gt[:3, 3] - a.instances[0].pose_gt[:3, 3])
        for a, b in itertools.pairwise(first)
    ]
    assert all(0.0 < step < 0.02 for step in steps)
    detected = first[0].instances[0]
    assert not np.allclose(detected.pose_init, detected.pose_gt)


def test_tracker_loses_a_fully_occluded_track_and_reacquires_it(duck_registry, renderer):
    """A 30-frame full occlusion after the first detection: the track is lost within 5 frames, no
    track lives while the object is hidden, and the next detection brings it back accurately."""
    from rnnpose_ros.core import metrics
    from rnnpose_ros.core.refiner import Refiner

    duck = duck_registry["duck"]
    occlusion = (2, 30)
    spec = SequenceSpec(frames=34, detect_every=33, occlusion=occlusion, scene=FAST_SCENE)
    tracker = Tracker(Refiner(duck_registry, renderer=renderer), TrackerConfig())
    lost_at, live, errors = [], [], []
    for frame in make_sequence([duck], 11, renderer, spec):
        seeds = [Seed("duck", frame.instances[i].pose_init) for i in frame.detections]
        update = tracker.update(frame.observation, seeds)
        lost_at += [frame.index] * len(update.lost)
        live.append([t.track_id for t in update.tracks])
        truth = frame.instances[0].pose_gt
        errors.append([metrics.add(duck.eval_points, t.pose, truth) / duck.diameter for t in update.tracks])
        if frame.index == 33:
            assert [t.event for t in update.tracks] == [TrackEvent.CREATED]
    assert live[0] == live[1] == ["duck_0"] and errors[1][0] < 0.1
    assert len(lost_at) == 1 and occlusion[0] <= lost_at[0] < occlusion[0] + 5
    assert all(not ids for ids in live[lost_at[0] : 33])
    assert live[33] == ["duck_0"] and errors[33][0] < 0.1


def test_unusable_seeds_start_no_track(duck_registry, renderer):
    """An unknown class, a non-finite pose and a pose behind the camera: no track, no id, no crash."""
    from rnnpose_ros.core.observation import Observation
    from rnnpose_ros.core.refiner import Refiner

    tracker = Tracker(Refiner(duck_registry, renderer=renderer))
    behind = _posed(-0.5)
    seeds = [Seed("cat", _posed(0.6)), Seed("duck", np.full((4, 4), np.nan)), Seed("duck", behind)]
    K = np.array([[300.0, 0.0, 159.5], [0.0, 300.0, 119.5], [0.0, 0.0, 1.0]])
    update = tracker.update(Observation(np.full((240, 320, 3), 100, np.uint8), K, stamp=0.0), seeds)
    assert update.tracks == [] and update.lost == [] and update.seed_tracks == ["", "", ""]
    assert tracker.tracks == [] and tracker.ids.known == {}
