"""Cross-process test: the ``refine_node`` executable in its own process, real DDS on loopback.

This test process plays the camera and the detector (synthetic duck scenes with noisy initial poses)
and listens on ``/rnnpose_refiner/detections`` and ``/tf``. The node runs the classical engine with a
short iteration schedule to stay within the test budget on 2 shared CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from node_harness import (  # noqa: E402
    FRAME,
    SIZE,
    Camera,
    K,
    NodeProcess,
    assert_stable_ids,
    detection,
    free_domain_id,
)

from rnnpose_ros.ros.conversions import pose_to_matrix  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402

SEEDS = (11, 12, 13, 14)
FRAME_TIMEOUT_S = 40.0


@pytest.fixture(scope="module")
def domain_id() -> int:
    return free_domain_id()


@pytest.fixture(scope="module")
def refine_node(domain_id: int) -> Iterator[NodeProcess]:
    """The node with the backend's own schedule, restarts off (fast enough for 4 frames)."""
    process = NodeProcess(domain_id, "restart_below_score:=0.0", "max_pending_frames:=4")
    yield process
    process.stop_cleanly()


@pytest.fixture(scope="module")
def scenes() -> list[Any]:
    synth = pytest.importorskip("rnnpose_ros.core.synth")
    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.render import Renderer

    duck = ObjectRegistry.from_yaml(REPO_ROOT / "config" / "objects.yaml")["duck"]
    renderer = Renderer()
    spec = synth.SceneSpec(size=SIZE, K=K)
    return [(duck, synth.make_scene([duck], seed, renderer, spec)) for seed in SEEDS]


def add_error(model: Any, T: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance (m) between the model's evaluation points under T and under the ground truth."""
    points = model.eval_points.astype(np.float64)
    return float(
        np.linalg.norm(points @ (T[:3, :3] - truth[:3, :3]).T + (T[:3, 3] - truth[:3, 3]), axis=1).mean()
    )


@pytest.fixture(scope="module")
def run(refine_node: NodeProcess, scenes: list[Any], domain_id: int) -> Iterator[dict[str, Any]]:
    """Publish every scene once (after the warm-up) and collect the node's answers."""
    camera = Camera(domain_id)
    try:
        camera.wait_until_ready(refine_node)
        keys = []
        for index, (_, scene) in enumerate(scenes):
            found = [detection("duck", i.pose_init) for i in scene.instances]
            keys.append(camera.publish(scene.image, found, 100 + index))
            camera.spin_until(lambda key=keys[-1]: key in camera.outputs, FRAME_TIMEOUT_S, refine_node)
        camera.spin_until(lambda: len(camera.tf) >= 1, 5.0, refine_node)
        camera.diagnostics.clear()
        camera.spin_until(lambda: camera.diagnostics, 5.0, refine_node)
        yield {"camera": camera, "keys": keys}
    finally:
        camera.close()


def test_every_frame_answered_with_its_header_ids_and_tf(run: dict[str, Any], scenes: list[Any]) -> None:
    camera: Camera = run["camera"]
    latencies = []
    for key, (_, scene) in zip(run["keys"], scenes, strict=True):
        out, received = camera.outputs[key]
        latencies.append(received - camera.sent[key])
        assert (out.header.stamp.sec, out.header.stamp.nanosec) == key and out.header.frame_id == FRAME
        assert_stable_ids(out, "duck", len(scene.instances))
        for answer in out.detections:
            score = answer.results[0].hypothesis.score
            assert answer.results[0].hypothesis.class_id == "duck" and 0.0 <= score <= 1.0
    frames = [
        (t.header.stamp.sec, t.header.frame_id, t.child_frame_id) for m in camera.tf for t in m.transforms
    ]
    assert frames, "no TF received"
    assert all(parent == FRAME and child.startswith("duck_") for _, parent, child in frames)
    assert {sec for sec, _, _ in frames} <= {sec for sec, _ in run["keys"]}  # image stamps, never now()
    print(f"cross-process latency per frame (s): {[round(x, 3) for x in latencies]}")
    values = {kv.key: kv.value for kv in camera.diagnostics[-1].status[0].values}
    assert values["frames_processed"] == str(len(scenes)) and values["frames_dropped"] == "0"
    print("node diagnostics:", {k: v for k, v in values.items() if k.startswith(("latency", "detections"))})


def test_refinement_improves_on_the_initial_pose(run: dict[str, Any], scenes: list[Any]) -> None:
    camera: Camera = run["camera"]
    initial_errors, refined_errors = [], []
    for key, (model, scene) in zip(run["keys"], scenes, strict=True):
        out, _ = camera.outputs[key]
        for answer, instance in zip(out.detections, scene.instances, strict=True):
            refined = pose_to_matrix(answer.results[0].pose.pose)[0]
            initial_errors.append(add_error(model, instance.pose_init, instance.pose_gt))
            refined_errors.append(add_error(model, refined, instance.pose_gt))
    initial_mm, refined_mm = (np.round(np.array(e) * 1000, 1) for e in (initial_errors, refined_errors))
    print(f"ADD (mm) initial {initial_mm}, refined {refined_mm}")
    assert np.mean(refined_errors) < np.mean(initial_errors)
