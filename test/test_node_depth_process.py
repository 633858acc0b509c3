"""Cross-process test of the depth input: the ``refine_node`` executable with ``use_depth:=true`` in its
own process, real DDS on loopback, a registered depth topic.

This test process plays an RGB-D camera and the detector: synthetic duck scenes with their rendered
depth (``16UC1`` and ``32FC1``), then one frame whose depth never comes. Every frame is answered with
every detection refined; ``/diagnostics`` counts the frames refined with and without depth.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from node_harness import (  # noqa: E402
    SIZE,
    Camera,
    K,
    NodeProcess,
    assert_stable_ids,
    detection,
    free_domain_id,
)

from rnnpose_ros.ros.conversions import depth_to_image  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402

# (seed, depth encoding or None = the depth image never comes)
FRAMES = ((21, "16UC1"), (22, "32FC1"), (23, None))
DEPTH_TIMEOUT_S = 0.5
FRAME_TIMEOUT_S = 40.0


@pytest.fixture(scope="module")
def domain_id() -> int:
    return free_domain_id()


@pytest.fixture(scope="module")
def refine_node(domain_id: int) -> Iterator[NodeProcess]:
    """The node with depth, restarts off and a short schedule (this checks the plumbing)."""
    process = NodeProcess(
        domain_id,
        "use_depth:=true",
        f"depth_timeout:={DEPTH_TIMEOUT_S}",
        "restart_below_score:=0.0",
        "outer_iterations:=4",
    )
    yield process
    process.stop_cleanly()


@pytest.fixture(scope="module")
def scenes() -> list[tuple[Any, np.ndarray]]:
    """Synthetic duck scenes (real mesh over real photographs) and their registered depth (metres)."""
    synth = pytest.importorskip("rnnpose_ros.core.synth")
    from rnnpose_ros.core.depth_sensor import DepthSensorModel
    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.render import Renderer

    duck = ObjectRegistry.from_yaml(REPO_ROOT / "config" / "objects.yaml")["duck"]
    renderer = Renderer()
    spec = synth.SceneSpec(size=SIZE, K=K, depth=DepthSensorModel())
    made = [synth.make_scene([duck], seed, renderer, spec) for seed, _ in FRAMES]
    return [(scene, scene.depth) for scene in made]


def test_frames_with_and_without_depth_are_all_refined(
    refine_node: NodeProcess, scenes: list[tuple[Any, np.ndarray]], domain_id: int
) -> None:
    camera = Camera(domain_id)
    try:
        camera.wait_until_ready(refine_node)
        camera.spin_until(lambda: camera.pub_depth.get_subscription_count() > 0, 10.0, refine_node)
        for index, ((scene, depth), (_, encoding)) in enumerate(zip(scenes, FRAMES, strict=True)):
            assert (depth > 0).any()
            found = [detection("duck", i.pose_init) for i in scene.instances]
            message = None if encoding is None else depth_to_image(depth, encoding=encoding)
            key = camera.publish(scene.image, found, 200 + index, depth=message)
            camera.spin_until(lambda key=key: key in camera.outputs, FRAME_TIMEOUT_S, refine_node)
            out, _ = camera.outputs[key]
            assert_stable_ids(out, "duck", len(scene.instances))
            assert all(d.results[0].hypothesis.score > 0.0 for d in out.detections)  # refined, none lost
        # the last frame is counted once published: wait for a status that includes it
        camera.spin_until(
            lambda: camera.diagnostics and camera.last_diagnostics()["frames_processed"] == str(len(FRAMES)),
            5.0,
            refine_node,
        )
        values = camera.last_diagnostics()
        with_depth = sum(encoding is not None for _, encoding in FRAMES)
        assert values["frames_processed"] == str(len(FRAMES))
        assert values["frames_with_depth"] == str(with_depth)
        assert values["frames_without_depth"] == values["frames_without_depth_missing"] == "1"
        assert values["received_depth"] == str(with_depth)
        print(
            "node diagnostics:", {k: v for k, v in values.items() if "depth" in k or k.startswith("latency")}
        )
    finally:
        camera.close()
    assert "refined RGB-only: no depth image with its stamp" in refine_node.output
