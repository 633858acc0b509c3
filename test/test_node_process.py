"""Cross-process test: the ``refine_node`` executable in its own process, real DDS on loopback.

This test process plays the camera and the detector (synthetic duck scenes with noisy initial poses)
and listens on ``/rnnpose_refiner/detections`` and ``/tf``. The node runs the classical engine with a
short iteration schedule to stay within the test budget on 2 shared CPU cores.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402
from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose  # noqa: E402

from rnnpose_ros.ros.conversions import matrix_to_pose, pose_to_matrix, rgb_to_image  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402

SIZE = (240, 320)
K = np.array([[286.0, 0.0, 160.0], [0.0, 286.0, 120.0], [0.0, 0.0, 1.0]])
FRAME = "camera_color_optical_frame"
SEEDS = (11, 12, 13, 14)
ITERATIONS = ("0", "0")  # outer, inner: 0 = the backend's own schedule
START_TIMEOUT_S = 40.0
FRAME_TIMEOUT_S = 40.0


def node_command() -> list[str]:
    """The installed console script, else the same entry point through the interpreter."""
    script = Path(sys.executable).with_name("refine_node")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rnnpose_ros.ros.node"]


@pytest.fixture(scope="module")
def domain_id() -> int:
    return random.randint(150, 199)


@pytest.fixture(scope="module")
def refine_node(domain_id: int) -> Iterator[subprocess.Popen]:
    env = os.environ | {"ROS_DOMAIN_ID": str(domain_id), "PYTHONUNBUFFERED": "1"}
    command = [
        *node_command(),
        "--ros-args",
        "--params-file",
        str(REPO_ROOT / "config" / "refine.yaml"),
        "-p",
        "device:=cpu",
        "-p",
        f"outer_iterations:={ITERATIONS[0]}",
        "-p",
        f"inner_iterations:={ITERATIONS[1]}",
        "-p",
        "restart_below_score:=0.0",
        "-p",
        "max_pending_frames:=4",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log = process.stdout.read() if process.stdout else ""
    print(log)
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def scenes() -> list[Any]:
    synth = pytest.importorskip("rnnpose_ros.core.synth")
    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.render import Renderer

    duck = ObjectRegistry.from_yaml(REPO_ROOT / "config" / "objects.yaml")["duck"]
    renderer = Renderer()
    return [
        (duck, synth.make_scene([duck], seed, renderer, synth.SceneSpec(size=SIZE, K=K))) for seed in SEEDS
    ]


class Camera:
    """Publishes frames like a camera + detector pair and collects the node's outputs."""

    def __init__(self, context: Any):
        self.node = rclpy.create_node("fake_camera_and_detector", context=context)
        self.pub_image = self.node.create_publisher(Image, "image", 5)
        self.pub_info = self.node.create_publisher(CameraInfo, "camera_info", 5)
        self.pub_detections = self.node.create_publisher(Detection3DArray, "detections", 5)
        self.outputs: dict[tuple[int, int], tuple[Detection3DArray, float]] = {}
        self.tf: list[TFMessage] = []
        self.node.create_subscription(Detection3DArray, "/rnnpose_refiner/detections", self._on_output, 10)
        self.node.create_subscription(TFMessage, "/tf", self.tf.append, 100)
        self.diagnostics: list[DiagnosticArray] = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.sent: dict[tuple[int, int], float] = {}
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)

    def _on_output(self, msg: Detection3DArray) -> None:
        key = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        self.outputs[key] = (msg, time.monotonic())

    def spin_until(self, condition: Any, timeout: float, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert process.poll() is None, "refine_node exited"
            assert time.monotonic() < deadline, "timed out waiting for refine_node"
            self.executor.spin_once(timeout_sec=0.02)

    def publish(self, image: np.ndarray, initial: list[np.ndarray], stamp_sec: int) -> Header:
        header = Header(frame_id=FRAME)
        header.stamp.sec = stamp_sec
        info = CameraInfo(header=header, height=SIZE[0], width=SIZE[1])
        info.k = K.ravel().tolist()
        info.p = np.hstack([K, np.zeros((3, 1))]).ravel().tolist()
        detections = Detection3DArray(header=header)
        for T in initial:
            hypothesis = ObjectHypothesisWithPose()
            hypothesis.hypothesis.class_id = "duck"
            hypothesis.hypothesis.score = 0.6
            hypothesis.pose.pose = matrix_to_pose(T)
            detections.detections.append(Detection3D(header=header, results=[hypothesis]))
        self.sent[(stamp_sec, 0)] = time.monotonic()
        self.pub_image.publish(rgb_to_image(image, header))
        self.pub_info.publish(info)
        self.pub_detections.publish(detections)
        return header


def add_error(model: Any, T: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance (m) between the model's evaluation points under T and under the ground truth."""
    points = model.eval_points.astype(np.float64)
    return float(
        np.linalg.norm(points @ (T[:3, :3] - truth[:3, :3]).T + (T[:3, 3] - truth[:3, 3]), axis=1).mean()
    )


@pytest.fixture(scope="module")
def run(refine_node: subprocess.Popen, scenes: list[Any], domain_id: int) -> Iterator[dict[str, Any]]:
    """Publish every scene once (after discovery) and collect the node's answers."""
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    camera = Camera(context)
    try:
        camera.spin_until(
            lambda: (
                camera.pub_detections.get_subscription_count() > 0
                and camera.pub_image.get_subscription_count() > 0
                and camera.node.count_publishers("/rnnpose_refiner/detections") > 0
            ),
            START_TIMEOUT_S,
            refine_node,
        )
        # Wait for the warm-up to end (diagnostics say so) so that latencies are those of steady state.
        camera.spin_until(
            lambda: any(not d.status[0].message.startswith("warming up") for d in camera.diagnostics),
            START_TIMEOUT_S,
            refine_node,
        )
        headers = []
        for index, (_, scene) in enumerate(scenes):
            headers.append(camera.publish(scene.image, [i.pose_init for i in scene.instances], 100 + index))
            key = (headers[-1].stamp.sec, headers[-1].stamp.nanosec)
            camera.spin_until(lambda key=key: key in camera.outputs, FRAME_TIMEOUT_S, refine_node)
        camera.spin_until(lambda: len(camera.tf) >= 1, 5.0, refine_node)
        camera.diagnostics.clear()
        camera.spin_until(lambda: camera.diagnostics, 5.0, refine_node)
        yield {"camera": camera, "headers": headers}
    finally:
        camera.executor.shutdown()
        camera.node.destroy_node()
        rclpy.shutdown(context=context)


def test_every_frame_answered_with_its_header_ids_and_tf(run: dict[str, Any], scenes: list[Any]) -> None:
    camera: Camera = run["camera"]
    latencies = []
    for header, (_, scene) in zip(run["headers"], scenes, strict=True):
        key = (header.stamp.sec, header.stamp.nanosec)
        out, received = camera.outputs[key]
        latencies.append(received - camera.sent[key])
        assert out.header == header
        assert [d.id for d in out.detections] == [f"duck_{i}" for i in range(len(scene.instances))]
        for detection in out.detections:
            score = detection.results[0].hypothesis.score
            assert detection.results[0].hypothesis.class_id == "duck" and 0.0 <= score <= 1.0
    frames = [
        (t.header.stamp.sec, t.header.frame_id, t.child_frame_id) for m in camera.tf for t in m.transforms
    ]
    assert frames, "no TF received"
    assert all(parent == FRAME and child.startswith("duck_") for _, parent, child in frames)
    assert {sec for sec, _, _ in frames} <= {h.stamp.sec for h in run["headers"]}  # image stamps, never now()
    print(f"cross-process latency per frame (s): {[round(x, 3) for x in latencies]}")
    values = {kv.key: kv.value for kv in camera.diagnostics[-1].status[0].values}
    assert values["frames_processed"] == str(len(scenes)) and values["frames_dropped"] == "0"
    print("node diagnostics:", {k: v for k, v in values.items() if k.startswith(("latency", "detections"))})


def test_refinement_improves_on_the_initial_pose(run: dict[str, Any], scenes: list[Any]) -> None:
    camera: Camera = run["camera"]
    initial_errors, refined_errors = [], []
    for header, (model, scene) in zip(run["headers"], scenes, strict=True):
        out, _ = camera.outputs[(header.stamp.sec, header.stamp.nanosec)]
        for detection, instance in zip(out.detections, scene.instances, strict=True):
            refined = pose_to_matrix(detection.results[0].pose.pose)[0]
            initial_errors.append(add_error(model, instance.pose_init, instance.pose_gt))
            refined_errors.append(add_error(model, refined, instance.pose_gt))
    initial_mm, refined_mm = (np.round(np.array(e) * 1000, 1) for e in (initial_errors, refined_errors))
    print(f"ADD (mm) initial {initial_mm}, refined {refined_mm}")
    assert np.mean(refined_errors) < np.mean(initial_errors)
