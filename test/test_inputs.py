"""The refiner's inputs: :class:`FrameQueue` (no ROS) and :class:`FrameInputs` on a plain node with real
rclpy and DDS — synchronised sets become one :class:`Frame`, every message is counted per topic."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from vision_msgs.msg import Detection3DArray  # noqa: E402

from rnnpose_ros.ros import compat  # noqa: E402
from rnnpose_ros.ros.inputs import INPUTS, Frame, FrameInputs, FrameQueue  # noqa: E402
from rnnpose_ros.ros.parameters import PARAMETERS, Settings  # noqa: E402

TIMEOUT_S = 20.0


def frame(index: int) -> Frame:
    return Frame(Image(), CameraInfo(), Detection3DArray(), queued=float(index))


def test_frame_queue_drops_the_oldest_and_never_blocks_put() -> None:
    queue = FrameQueue(2)
    frames = [frame(i) for i in range(3)]
    assert queue.put(frames[0]) is None and queue.put(frames[1]) is None
    assert queue.put(frames[2]) is frames[0]
    assert len(queue) == 2
    assert queue.get() is frames[1] and queue.get() is frames[2]


def test_frame_queue_close_wakes_a_waiting_get() -> None:
    queue = FrameQueue(1)
    got: list[Frame | None] = []
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    time.sleep(0.05)
    queue.close()
    worker.join(timeout=TIMEOUT_S)
    assert got == [None] and queue.closed
    queue.put(frame(0))
    assert queue.get() is None  # closed: pending frames are abandoned


class Recorder:
    """An :class:`~rnnpose_ros.ros.inputs.InputMonitor` that keeps what it is told."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.incompatible: list[tuple[str, int, str]] = []

    def count_input(self, topic: str) -> None:
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def incompatible_qos(self, topic: str, publishers: int, text: str) -> None:
        self.incompatible.append((topic, publishers, text))


@pytest.mark.parametrize(("sync_slop", "offset_ns"), [(0.0, 0), (0.05, 20_000_000)])
def test_a_synchronised_set_becomes_one_frame(context: Any, sync_slop: float, offset_ns: int) -> None:
    settings = Settings(**({spec.name: spec.default for spec in PARAMETERS} | {"sync_slop": sync_slop}))
    node = rclpy.create_node("inputs_under_test", context=context)
    client = rclpy.create_node("inputs_client", context=context)
    frames: list[Frame] = []
    recorder = Recorder()
    inputs = FrameInputs(node, settings, frames.append, recorder)
    expected = compat.ApproximateTimeSynchronizer if sync_slop else compat.TimeSynchronizer
    assert type(inputs.synchronizer) is expected
    publishers = {topic.name: client.create_publisher(topic.msg_type, topic.name, 10) for topic in INPUTS}
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(client)

    def spin_until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            executor.spin_once(timeout_sec=0.02)

    try:
        spin_until(lambda: all(p.get_subscription_count() > 0 for p in publishers.values()))
        header = Header(frame_id="cam")
        header.stamp.sec = 7
        shifted = copy.deepcopy(header)
        shifted.stamp.nanosec += offset_ns
        image, info = Image(header=header), CameraInfo(header=header)
        detections = Detection3DArray(header=shifted)
        before = time.monotonic()
        publishers["detections"].publish(detections)
        publishers["camera_info"].publish(info)
        publishers["image"].publish(image)
        spin_until(lambda: bool(frames))
        (got,) = frames
        assert (got.image, got.camera_info, got.detections) == (image, info, detections)
        assert got.queued >= before
        assert recorder.counts == {"image": 1, "camera_info": 1, "detections": 1}
        assert recorder.incompatible == []
    finally:
        executor.shutdown()
        node.destroy_node()
        client.destroy_node()


class Task:
    """A :class:`~rnnpose_ros.ros.inputs.WorkerTask` that records whether it ran or why it was cancelled."""

    def __init__(self) -> None:
        self.ran = False
        self.cancelled: str | None = None

    def __call__(self) -> None:
        self.ran = True

    def cancel(self, reason: str) -> None:
        self.cancelled = reason


def test_frame_queue_tasks_run_before_frames_and_are_never_dropped() -> None:
    queue = FrameQueue(1)
    frames = [frame(i) for i in range(2)]
    tasks = [Task(), Task()]
    queue.put(frames[0])
    assert queue.submit(tasks[0]) and queue.submit(tasks[1])
    assert queue.put(frames[1]) is frames[0]  # frames still drop the oldest
    assert queue.get() is tasks[0] and queue.get() is tasks[1] and queue.get() is frames[1]
    queue.put(frame(2))
    assert queue.clear() == 1 and len(queue) == 0


def test_frame_queue_close_returns_the_tasks_that_never_ran() -> None:
    queue = FrameQueue(1)
    waiting = Task()
    queue.submit(waiting)
    assert queue.close() == [waiting]
    assert not queue.submit(Task())  # closed: refused, so the caller answers at once
    assert queue.get() is None
