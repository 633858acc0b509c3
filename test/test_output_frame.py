"""``output_frame``: outputs in another frame through tf2 at the image stamp, a start-up error without
tf2_ros, and a failed lookup that passes the frame through in the image frame with a warning."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from geometry_msgs.msg import TransformStamped  # noqa: E402
from node_harness import run_node  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402
from test_node import FRAME, SHIFT_M, Harness, inputs, make_node, pose  # noqa: E402

from rnnpose_ros.ros.conversions import matrix_to_transform, pose_to_matrix  # noqa: E402
from rnnpose_ros.ros.output_frame import OutputFrame, tf2_available, transform_to_matrix  # noqa: E402
from rnnpose_ros.ros.parameters import ParameterError  # noqa: E402

BASE = "base_link"


class StaticBuffer:
    """A tf2 buffer holding one fixed transform ``BASE ← FRAME`` (what a static camera mount gives);
    any other lookup raises as tf2 does. Stands in for ``tf2_ros.Buffer``, which the wheels lack."""

    def __init__(self, T: np.ndarray | None):
        self.T = T
        self.lookups: list[tuple[str, str, Any]] = []

    def lookup_transform(self, target: str, source: str, time: Any) -> TransformStamped:
        self.lookups.append((target, source, time))
        if self.T is None or (target, source) != (BASE, FRAME):
            raise LookupError(f'"{target}" passed to lookupTransform argument target_frame does not exist')
        stamped = TransformStamped(child_frame_id=source)
        stamped.header.frame_id = target
        stamped.transform = matrix_to_transform(self.T)
        return stamped


def _camera_mount() -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("xyz", (-90.0, 0.0, -90.0), degrees=True).as_matrix()  # optical → ROS
    T[:3, 3] = (0.1, 0.02, 0.8)
    return T


def _with_buffer(harness: Harness, buffer: StaticBuffer) -> list[tuple[str, str]]:
    warnings: list[tuple[str, str]] = []
    harness.node.output_frame = OutputFrame(
        harness.node, BASE, lambda key, text: warnings.append((key, text)), buffer=buffer
    )
    return warnings


def test_transform_to_matrix_round_trip() -> None:
    T = _camera_mount()
    np.testing.assert_allclose(transform_to_matrix(matrix_to_transform(T)), T, atol=1e-12)


def test_outputs_in_the_output_frame(context: Any) -> None:
    harness = Harness(context, make_node(context, tf_prefix="obj_"))
    try:
        mount = _camera_mount()
        buffer = StaticBuffer(mount)
        warnings = _with_buffer(harness, buffer)
        initial = pose(x=0.05)
        image, info, detections = inputs([("duck", initial, ""), ("duck", None, "")])
        out = harness.send(image, info, detections)
        expected = initial.copy()
        expected[0, 3] += SHIFT_M  # the stand-in engine's refinement, in the camera frame
        assert out.header.frame_id == BASE and out.header.stamp == image.header.stamp
        assert all(d.header.frame_id == BASE for d in out.detections)
        refined = pose_to_matrix(out.detections[0].results[0].pose.pose)[0]
        np.testing.assert_allclose(refined, mount @ expected, atol=1e-9)
        model = harness.node.registry["duck"]
        box = pose_to_matrix(out.detections[0].bbox.center)[0]
        np.testing.assert_allclose(
            box[:3, 3], (mount @ expected @ np.append(model.center, 1.0))[:3], atol=1e-9
        )
        # the lookup is at the image stamp, from the image frame
        ((target, source, when),) = buffer.lookups
        assert (target, source) == (BASE, FRAME) and when.nanoseconds == (
            image.header.stamp.sec * 10**9 + image.header.stamp.nanosec
        )
        harness.spin_until(lambda: harness.tf and harness.markers)
        (transform,) = harness.tf[-1].transforms
        assert transform.header.frame_id == BASE and transform.child_frame_id == "obj_duck_0"
        np.testing.assert_allclose(transform_to_matrix(transform.transform), mount @ expected, atol=1e-9)
        assert harness.markers[-1].markers[0].header.frame_id == BASE
        assert warnings == []
    finally:
        harness.close()


def test_a_failed_lookup_publishes_in_the_image_frame_with_a_warning(context: Any) -> None:
    harness = Harness(context, make_node(context))
    try:
        warnings = _with_buffer(harness, StaticBuffer(None))
        initial = pose()
        out = harness.send(*inputs([("duck", initial, "")]))
        assert out.header.frame_id == FRAME
        np.testing.assert_allclose(
            pose_to_matrix(out.detections[0].results[0].pose.pose)[0][0, 3], initial[0, 3] + SHIFT_M
        )
        harness.send(*inputs([("duck", initial, "")]))  # the node keeps answering
        assert [key for key, _ in warnings] == ["output-frame", "output-frame"]
        assert f"no transform {FRAME} -> {BASE}" in warnings[0][1] and "LookupError" in warnings[0][1]
    finally:
        harness.close()


@pytest.mark.skipif(
    tf2_available(), reason="tf2_ros is installed: the wheel-install start-up error cannot occur"
)
def test_without_tf2_ros_a_set_output_frame_stops_the_node_at_start(context: Any) -> None:
    with pytest.raises(ParameterError, match="'output_frame' = 'base_link' needs tf2_ros"):
        make_node(context, output_frame=BASE)
    code, output = run_node("-p", f"output_frame:={BASE}")
    fatal = [line for line in output.splitlines() if "FATAL" in line]
    assert code == 2 and len(fatal) == 1 and "needs tf2_ros" in fatal[0], output
