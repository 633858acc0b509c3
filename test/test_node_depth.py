"""In-process tests of the node's depth input (``use_depth``) with real rclpy and DDS and an injected
stand-in engine that records what it is given: the registered depth of the rendered duck reaches the
engine's :class:`~rnnpose_ros.core.observation.Observation` in metres for both encodings, and every
missing or unusable depth image refines the frame RGB-only, with a warning keyed by its reason and a
count in ``/diagnostics``."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from sensor_msgs.msg import Image  # noqa: E402
from test_node import SHIFT_M, SIZE, Harness, K, ShiftRefiner, inputs, pose  # noqa: E402

from rnnpose_ros.core.observation import Observation  # noqa: E402
from rnnpose_ros.ros.conversions import depth_to_image, pose_to_matrix  # noqa: E402
from rnnpose_ros.ros.node import RefinerNode  # noqa: E402

DEPTH_TIMEOUT_S = 0.3


class RecordingRefiner(ShiftRefiner):
    """The stand-in engine, keeping every observation it was given."""

    def __init__(self, registry: Any):
        super().__init__(registry)
        self.observations: list[Observation] = []

    def refine(self, observation: Observation, instances: list, stop: Any = None) -> list:
        self.observations.append(observation)
        return super().refine(observation, instances, stop)


class DepthHarness(Harness):
    """The in-process harness plus a depth publisher and a record of the node's warnings by reason."""

    def __init__(self, context: Any, node: RefinerNode):
        super().__init__(context, node)
        self.pub_depth = self.client.create_publisher(Image, "depth", 10)
        self.spin_until(lambda: self.pub_depth.get_subscription_count() > 0)
        self.warnings: list[tuple[str, str]] = []
        log = node.diagnostics.warn
        node.diagnostics.warn = lambda key, text: (self.warnings.append((key, text)), log(key, text))

    def send_with_depth(self, depth: Image | None, poses: list[np.ndarray]) -> tuple[list[np.ndarray], Any]:
        """Publish depth (unless None) then image, camera_info and detections of one stamp; returns the
        output poses and the observation the engine saw."""
        image, info, detections = inputs([("duck", T, "") for T in poses])
        if depth is not None:
            depth.header = copy.deepcopy(image.header)
            self.pub_depth.publish(depth)
        processed = self.node.diagnostics.stats.processed
        out = self.send(image, info, detections)
        assert out.header == image.header
        self.spin_until(lambda: self.node.diagnostics.stats.processed == processed + 1)  # after publishing
        return [
            pose_to_matrix(d.results[0].pose.pose)[0] for d in out.detections
        ], self.node.refiner.observations[-1]

    def diagnostics_values(self) -> dict[str, str]:
        """The values of the first ``/diagnostics`` status that counts every frame processed so far (one
        published just before the last frame was recorded may still be on its way)."""
        processed = str(self.node.diagnostics.stats.processed)

        def values() -> dict[str, str]:
            return (
                {kv.key: kv.value for kv in self.diagnostics[-1].status[0].values} if self.diagnostics else {}
            )

        self.diagnostics.clear()
        self.spin_until(lambda: values().get("frames_processed") == processed)
        return values()


@pytest.fixture(scope="module")
def depth_m(renderer: Any, duck_registry: Any) -> np.ndarray:
    """(240, 320) float32 metres: the duck rendered at ``pose()``, 0 around it."""
    depth = renderer.render([duck_registry["duck"]], pose(), K, SIZE).depth[0]
    assert (depth > 0).any()
    return depth


@pytest.fixture(scope="module")
def harness(context: Any) -> Iterator[DepthHarness]:
    from rclpy.parameter import Parameter

    parameters = [
        Parameter("diagnostics_period", value=0.2),
        Parameter("warmup", value=False),
        Parameter("use_depth", value=True),
        Parameter("depth_timeout", value=DEPTH_TIMEOUT_S),
    ]
    node = RefinerNode(
        refiner_factory=lambda settings, registry: RecordingRefiner(registry),
        context=context,
        parameter_overrides=parameters,
    )
    h = DepthHarness(context, node)
    yield h
    h.close()


def assert_refined(outputs: list[np.ndarray], poses: list[np.ndarray]) -> None:
    """Every detection came back refined (the stand-in engine's 1 cm shift), none lost."""
    assert len(outputs) == len(poses)
    for T, T0 in zip(outputs, poses, strict=True):
        np.testing.assert_allclose(T[:3, 3], T0[:3, 3] + (SHIFT_M, 0.0, 0.0), atol=1e-9)


@pytest.mark.parametrize(("encoding", "tolerance_m"), [("16UC1", 0.0005), ("32FC1", 0.0)])
def test_depth_reaches_the_engine_in_metres(
    harness: DepthHarness, depth_m: np.ndarray, encoding: str, tolerance_m: float
) -> None:
    used = harness.node.diagnostics.stats.depth.get("used", 0)
    poses = [pose(-0.05), pose(0.05)]
    outputs, observation = harness.send_with_depth(depth_to_image(depth_m, encoding=encoding), poses)
    assert_refined(outputs, poses)
    assert observation.depth is not None and observation.depth.dtype == np.float32
    np.testing.assert_allclose(observation.depth, depth_m, atol=tolerance_m, rtol=1e-6)
    values = harness.diagnostics_values()
    assert values["frames_with_depth"] == str(used + 1) and int(values["received_depth"]) >= used + 1


def _bad_depth(depth_m: np.ndarray, case: str) -> Image | None:
    if case == "missing":
        return None
    if case == "size":
        return depth_to_image(depth_m[::2, ::2])
    msg = depth_to_image(depth_m)
    if case == "encoding":
        msg.encoding = "32FC3"
    elif case == "no-valid-depth":
        msg = depth_to_image(np.zeros_like(depth_m))
    elif case == "layout":
        msg.step = 2 * SIZE[1] - 2
    return msg


@pytest.mark.parametrize("reason", ["missing", "size", "encoding", "no-valid-depth", "layout"])
def test_unusable_depth_refines_rgb_only_with_a_warning_and_a_count(
    harness: DepthHarness, depth_m: np.ndarray, reason: str
) -> None:
    before = harness.node.diagnostics.stats.depth.get(reason, 0)
    poses = [pose(-0.05), pose(0.05)]
    outputs, observation = harness.send_with_depth(_bad_depth(depth_m, reason), poses)
    assert_refined(outputs, poses)
    assert observation.depth is None
    assert any(key == f"depth:{reason}" for key, _ in harness.warnings)
    values = harness.diagnostics_values()
    assert values[f"frames_without_depth_{reason}"] == str(before + 1)
    # the node still refines the next frame with its depth
    outputs, observation = harness.send_with_depth(depth_to_image(depth_m), poses)
    assert_refined(outputs, poses)
    assert observation.depth is not None
