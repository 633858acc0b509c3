"""Cross-process test harness: the real ``refine_node`` executable in a child process, and a fake camera
+ detector in this one, over real DDS on loopback (the DDS-safety settings come from conftest.py).

Used by the cross-process tests (test_node_process.py, test_node_reliability.py).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose

from rnnpose_ros.ros.conversions import matrix_to_pose, rgb_to_image
from rnnpose_ros.tools.node_process import node_executable

from conftest import REPO_ROOT

SIZE = (240, 320)
K = np.array([[286.0, 0.0, 160.0], [0.0, 286.0, 120.0], [0.0, 0.0, 1.0]])
FRAME = "camera_color_optical_frame"
PARAMS_FILE = REPO_ROOT / "config" / "refine.yaml"
RESULT_TOPIC = "/rnnpose_refiner/detections"
START_TIMEOUT_S = 60.0


def free_domain_id() -> int:
    return random.randint(150, 232)


class NodeProcess:
    """``refine_node --ros-args --params-file config/refine.yaml -p device:=cpu -p <params>...`` in a child
    process; its output is collected line by line as it comes (:meth:`wait_for_line`)."""

    def __init__(self, domain_id: int, *params: str) -> None:
        env = os.environ | {"ROS_DOMAIN_ID": str(domain_id), "PYTHONUNBUFFERED": "1"}
        ros_args = ["--params-file", str(PARAMS_FILE), "-p", "device:=cpu"]
        for assignment in params:
            ros_args += ["-p", assignment]
        self.process = subprocess.Popen(
            [*node_executable(), "--ros-args", *ros_args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def poll(self) -> int | None:
        return self.process.poll()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.poll() is None, f"refine_node exited with {self.returncode}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} from refine_node:\n{self.output}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> tuple[int, float, str]:
        """Send ``sig`` (if still running) and wait: (exit code, seconds to exit, whole output). Kills
        after ``timeout``."""
        start = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        seconds = time.monotonic() - start
        self._reader.join(timeout=5.0)
        return self.process.returncode, seconds, self.output

    def stop_cleanly(self) -> None:
        """SIGINT, then assert a clean exit (code 0, no traceback); the log's end is printed for a
        failing test's report."""
        code, _, output = self.stop(signal.SIGINT)
        print(output[-3000:])
        assert code == 0 and "Traceback" not in output, output


def run_node(*ros_args: str, timeout: float = 60.0) -> tuple[int, str]:
    """Run ``refine_node --ros-args <ros_args>`` to its exit (for start-up errors): (exit code, output)."""
    env = os.environ | {"ROS_DOMAIN_ID": str(free_domain_id()), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [*node_executable(), "--ros-args", *ros_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr


def assert_stable_ids(message: Detection3DArray, class_id: str, count: int) -> None:
    """``message`` answers ``count`` detections of ``class_id`` without detector ids: ids of the form
    ``<class_id>_<k>``, distinct (k follows the physical instance across frames, not the input order)."""
    ids = [d.id for d in message.detections]
    assert len(ids) == count and len(set(ids)) == count, ids
    assert all(i.startswith(f"{class_id}_") and i.removeprefix(f"{class_id}_").isdigit() for i in ids), ids


def detection(class_id: str, T: np.ndarray, detection_id: str = "") -> Detection3D:
    hypothesis = ObjectHypothesisWithPose()
    hypothesis.hypothesis.class_id = class_id
    hypothesis.hypothesis.score = 0.6
    hypothesis.pose.pose = matrix_to_pose(T)
    return Detection3D(id=detection_id, results=[hypothesis])


class Camera:
    """Publishes frames like a camera + detector pair and collects the node's outputs."""

    def __init__(self, domain_id: int):
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("fake_camera_and_detector", context=self.context)
        self.pub_image = self.node.create_publisher(Image, "image", qos_profile_sensor_data)
        self.pub_info = self.node.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data)
        self.pub_detections = self.node.create_publisher(Detection3DArray, "detections", 5)
        self.pub_depth = self.node.create_publisher(Image, "depth", qos_profile_sensor_data)
        self.outputs: dict[tuple[int, int], tuple[Detection3DArray, float]] = {}
        self.sent: dict[tuple[int, int], float] = {}
        self.tf: list[TFMessage] = []
        self.diagnostics: list[DiagnosticArray] = []
        self.node.create_subscription(Detection3DArray, RESULT_TOPIC, self._on_output, 100)
        self.node.create_subscription(TFMessage, "/tf", self.tf.append, 100)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def _on_output(self, msg: Detection3DArray) -> None:
        self.outputs[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = (msg, time.monotonic())

    def spin_until(self, condition: Callable[[], Any], timeout: float, process: NodeProcess) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert process.poll() is None, f"refine_node exited with {process.returncode}"
            assert time.monotonic() < deadline, "timed out waiting for refine_node"
            self.executor.spin_once(timeout_sec=0.02)

    def wait_until_ready(self, process: NodeProcess, timeout: float = START_TIMEOUT_S) -> None:
        """Until the node subscribes, publishes, and its diagnostics say the warm-up is over."""
        self.spin_until(
            lambda: (
                self.pub_detections.get_subscription_count() > 0
                and self.pub_image.get_subscription_count() > 0
                and self.node.count_publishers(RESULT_TOPIC) > 0
            ),
            timeout,
            process,
        )
        self.spin_until(
            lambda: any(not d.status[0].message.startswith("warming up") for d in self.diagnostics),
            timeout,
            process,
        )

    def last_diagnostics(self) -> dict[str, str]:
        status = self.diagnostics[-1].status[0]
        return {kv.key: kv.value for kv in status.values} | {"message": status.message}

    def publish_messages(
        self, image: Image, info: CameraInfo, detections: Detection3DArray
    ) -> tuple[int, int]:
        key = (image.header.stamp.sec, image.header.stamp.nanosec)
        self.sent[key] = time.monotonic()
        self.pub_image.publish(image)
        self.pub_info.publish(info)
        self.pub_detections.publish(detections)
        return key

    def publish(
        self,
        image: np.ndarray,
        detections: Sequence[Detection3D],
        stamp_sec: int,
        K: np.ndarray = K,
        depth: Image | None = None,
    ) -> tuple[int, int]:
        """One consistent frame (image, camera_info with K, detections) stamped ``stamp_sec``, after its
        registered ``depth`` image (restamped) when given."""
        header = Header(frame_id=FRAME)
        header.stamp.sec = stamp_sec
        if depth is not None:
            depth.header = header
            self.pub_depth.publish(depth)
        info = CameraInfo(header=header, height=image.shape[0], width=image.shape[1])
        info.k = K.ravel().tolist()
        info.p = np.hstack([K, np.zeros((3, 1))]).ravel().tolist()
        array = Detection3DArray(header=header)
        for item in detections:
            item.header = header
            array.detections.append(item)
        return self.publish_messages(rgb_to_image(image, header), info, array)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
