"""In-process node tests of instance identity: stable ids in ``mode: detect`` (stand-in engine) and
``mode: track`` with the real classical engine on a synthetic sequence (real rclpy and DDS)."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from test_node import FRAME, SIZE, Harness, K, header, inputs, make_node, pose  # noqa: E402

from rnnpose_ros.ros.conversions import pose_to_matrix, rgb_to_image  # noqa: E402
from rnnpose_ros.ros.tracking import DetectionInbox, stamp_seconds  # noqa: E402

REAL_ENGINE_TIMEOUT_S = 180.0


def _child_frames(harness: Harness, start: int) -> set[str]:
    return {t.child_frame_id for message in harness.tf[start:] for t in message.transforms}


def test_detect_mode_names_follow_instances_when_the_detector_shuffles(context) -> None:
    """Three ducks drifting slowly, reported in a new random order on each of 30 frames without
    detector ids: every physical duck keeps its output id and TF frame name."""
    harness = Harness(context, make_node(context))
    shuffle = random.Random(4)
    names: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}
    try:
        for frame in range(30):
            order = [0, 1, 2]
            shuffle.shuffle(order)
            ducks = [
                ("duck", pose(x=0.15 * (k - 1) + 0.002 * frame, z=0.6 + 0.001 * frame), "") for k in order
            ]
            tf_before = len(harness.tf)
            out = harness.send(*inputs(ducks))
            for k, detection in zip(order, out.detections, strict=True):
                names[k].add(detection.id)
            harness.spin_until(lambda before=tf_before: len(_child_frames(harness, before)) == 3)
            assert _child_frames(harness, tf_before) == {d.id for d in out.detections}
        assert all(len(n) == 1 for n in names.values()), names
        assert set.union(*names.values()) == {"duck_0", "duck_1", "duck_2"}
    finally:
        harness.close()


def test_detection_inbox_matches_the_nearest_stamp_within_the_tolerance() -> None:
    inbox = DetectionInbox(10)
    messages = []
    for _ in range(3):
        _, _, message = inputs([("duck", pose(), "")])
        messages.append(message)
        inbox.put(message)
    stamps = [stamp_seconds(m.header.stamp) for m in messages]
    # Nearest to the second stamp: the second message; the first is too old for it (stale).
    chosen, stale = inbox.take(stamps[1] + 0.01, 0.5)
    assert chosen is messages[1] and stale == [messages[0]] and len(inbox) == 1
    # Nothing within the tolerance: the newer message waits for a later image.
    assert inbox.take(stamps[1] + 0.02, 0.1) == (None, []) and len(inbox) == 1


def test_track_mode_answers_every_image_with_track_ids(context) -> None:
    """Real classical engine, mode track: detections only on frames 0 and 4 of a 6-frame sequence;
    every image is answered with the one live track ``duck_0`` (output id and TF frame), close to the
    truth, and /diagnostics reports it."""
    from rnnpose_ros.core import metrics
    from rnnpose_ros.core.render import Renderer
    from rnnpose_ros.core.sequence import SequenceSpec, make_sequence
    from rnnpose_ros.core.synth import SceneSpec

    node = make_node(
        context,
        engine="real",
        device="cpu",
        mode="track",
        restart_below_score=0.0,
        track_iterations=1,
    )
    harness = Harness(context, node)
    duck = node.registry["duck"]
    scene = SceneSpec(size=SIZE, K=K, supersample=1, distance=(0.6, 0.8))
    spec = SequenceSpec(frames=6, detect_every=4, scene=scene)
    try:
        for frame in make_sequence([duck], 2, Renderer(), spec):
            truth = frame.instances[0]
            image, info, detections = inputs(
                [("duck", truth.pose_init, "")] if frame.detections else [], image=frame.image
            )
            h = header()
            h.stamp.sec, h.stamp.nanosec = 2000 + frame.index // 30, int((frame.index % 30) / 30 * 1e9)
            image.header, info.header, detections.header = h, copy.deepcopy(h), copy.deepcopy(h)
            if frame.detections:
                harness.pub_detections.publish(detections)
                harness.spin_until(lambda: len(node.tracking.inbox) > 0)
            before, tf_before = len(harness.outputs), len(harness.tf)
            harness.pub_image.publish(rgb_to_image(frame.image, h))
            harness.pub_info.publish(info)
            # The first image's full refinement (12 render iterations) on a loaded CPU takes a while.
            harness.spin_until(
                lambda before=before: len(harness.outputs) > before, timeout=REAL_ENGINE_TIMEOUT_S
            )
            out = harness.outputs[-1]
            assert out.header.stamp == h.stamp and out.header.frame_id == FRAME
            assert [d.id for d in out.detections] == ["duck_0"]
            estimate = pose_to_matrix(out.detections[0].results[0].pose.pose)[0]
            error = metrics.add(duck.eval_points, estimate, truth.pose_gt) / duck.diameter
            assert error < 0.1, f"frame {frame.index}: ADD {error:.3f} d"
            harness.spin_until(lambda tf_before=tf_before: "duck_0" in _child_frames(harness, tf_before))
        harness.spin_until(
            lambda: any(
                {v.key: v.value for v in d.status[0].values}.get("tracks_live") == "1"
                for d in harness.diagnostics
            )
        )
        values = {v.key: v.value for v in harness.diagnostics[-1].status[0].values}
        assert values["tracks_lost"] == "0" and float(values.get("latency_track_ms_max", "1")) > 0.0
        assert np.isfinite(estimate).all()
    finally:
        harness.close()
