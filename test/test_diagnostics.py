"""The refiner's bookkeeping: :class:`Throttle` (no ROS) and :class:`Diagnostics` on a plain node with real
rclpy — what it records comes out in ``/diagnostics`` under the node's documented keys."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from vision_msgs.msg import Detection3DArray  # noqa: E402

from rnnpose_ros.ros.diagnostics import LATENCY_STAGES, Diagnostics, Throttle  # noqa: E402
from rnnpose_ros.ros.inputs import Frame, FrameQueue  # noqa: E402
from rnnpose_ros.ros.parameters import PARAMETERS, Settings  # noqa: E402

TIMEOUT_S = 20.0


def test_throttle_limits_each_key_separately() -> None:
    throttle = Throttle(period=60.0)
    assert throttle.allow("a") and not throttle.allow("a")
    assert throttle.allow("b")
    assert Throttle(period=0.0).allow("a")


def test_recorded_counts_latency_and_drops_are_published(context: Any) -> None:
    values = {spec.name: spec.default for spec in PARAMETERS} | {"diagnostics_period": 0.1}
    node = rclpy.create_node("diagnostics_under_test", context=context)
    queue, warmed_up = FrameQueue(1), threading.Event()
    warmed_up.set()
    diagnostics = Diagnostics(node, Settings(**values), queue, warmed_up)
    received: list[DiagnosticArray] = []
    node.create_subscription(DiagnosticArray, "/diagnostics", received.append, 10)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        diagnostics.count_input("image")
        diagnostics.frame_queued(dropped=None)
        diagnostics.frame_queued(dropped=Frame(Image(), CameraInfo(), Detection3DArray(), queued=0.0))
        diagnostics.frame_processed(dict.fromkeys(LATENCY_STAGES, 0.002), 2, 1, "a problem")
        deadline = time.monotonic() + TIMEOUT_S
        while not received:
            assert time.monotonic() < deadline, "no /diagnostics"
            executor.spin_once(timeout_sec=0.02)
        (status,) = received[0].status
        values = {kv.key: kv.value for kv in status.values}
        assert status.name == "diagnostics_under_test: refinement" and status.level == DiagnosticStatus.WARN
        assert status.message.startswith("dropped 1 frames in the last")
        assert values["received_image"] == "1" and values["received_detections"] == "0"
        assert values["frames_synchronised"] == "2" and values["frames_dropped"] == "1"
        assert values["detections_refined"] == "2" and values["detections_failed"] == "1"
        assert values["frames_not_refined"] == "1" and values["last_problem"] == "a problem"
        assert values["latency_total_ms_mean"] == "2.0" and values["queue_capacity"] == "1"
    finally:
        executor.shutdown()
        node.destroy_node()


def test_depth_counts_per_reason_and_a_warning_status(context: Any) -> None:
    values = {spec.name: spec.default for spec in PARAMETERS} | {"diagnostics_period": 0.1, "use_depth": True}
    node = rclpy.create_node("depth_diagnostics_under_test", context=context)
    warmed_up = threading.Event()
    warmed_up.set()
    diagnostics = Diagnostics(node, Settings(**values), FrameQueue(1), warmed_up)
    received: list[DiagnosticArray] = []
    node.create_subscription(DiagnosticArray, "/diagnostics", received.append, 10)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        for depth in ("used", "used", "missing", "size", "missing"):
            diagnostics.frame_processed(dict.fromkeys(LATENCY_STAGES, 0.001), 1, 0, None, depth=depth)
        deadline = time.monotonic() + TIMEOUT_S
        while not received:
            assert time.monotonic() < deadline, "no /diagnostics"
            executor.spin_once(timeout_sec=0.02)
        (status,) = received[0].status
        values = {kv.key: kv.value for kv in status.values}
        assert values["received_depth"] == "0"  # the depth input is listed from the start
        assert values["frames_with_depth"] == "2" and values["frames_without_depth"] == "3"
        assert values["frames_without_depth_missing"] == "2" and values["frames_without_depth_size"] == "1"
        assert status.level == DiagnosticStatus.WARN
        assert status.message.startswith("3 frames refined without depth in the last")
        assert "last reason: missing" in status.message
    finally:
        executor.shutdown()
        node.destroy_node()
