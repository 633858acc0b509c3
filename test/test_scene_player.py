"""The ``scene_player`` node in-process with real rclpy: one header per frame, the noisy detection and
ground truth kept, waiting for each answer, and scoring an answer."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from vision_msgs.msg import Detection3DArray  # noqa: E402

from rnnpose_ros.core.metrics import passed  # noqa: E402
from rnnpose_ros.ros.conversions import (  # noqa: E402
    image_to_rgb,
    intrinsics_from_camera_info,
    matrix_to_pose,
    parse_depth,
    pose_to_matrix,
)
from rnnpose_ros.ros.parameters import ParameterError  # noqa: E402
from rnnpose_ros.ros.scene_player import DEFAULT_FRAME_ID, ScenePlayer, score_frame  # noqa: E402

RESULT_TOPIC = "/test_refiner/detections"
OBJECTS_FILE = str(Path(__file__).resolve().parents[1] / "config" / "objects.yaml")
TIMEOUT_S = 30.0


@pytest.fixture
def context() -> Iterator[Any]:
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


class FakeRefiner:
    """Receives the player's three topics and answers on RESULT_TOPIC when told to."""

    def __init__(self, context: Any):
        self.node = rclpy.create_node("fake_refiner", context=context)
        self.images: list[Image] = []
        self.infos: list[CameraInfo] = []
        self.detections: list[Detection3DArray] = []
        self.node.create_subscription(Image, "image", self.images.append, qos_profile_sensor_data)
        self.node.create_subscription(CameraInfo, "camera_info", self.infos.append, qos_profile_sensor_data)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(Detection3DArray, "detections", self.detections.append, reliable)
        self.depths: list[Image] = []
        self.node.create_subscription(Image, "depth", self.depths.append, qos_profile_sensor_data)
        self.pub = self.node.create_publisher(Detection3DArray, RESULT_TOPIC, reliable)

    def answer(self, request: Detection3DArray, poses: list[np.ndarray]) -> None:
        out = copy.deepcopy(request)
        for detection, pose in zip(out.detections, poses, strict=True):
            detection.results[0].pose.pose = matrix_to_pose(pose)
            detection.results[0].hypothesis.score = 0.9
        self.pub.publish(out)


def spin_until(
    executor: SingleThreadedExecutor, condition: Callable[[], bool], timeout: float = TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        executor.spin_once(timeout_sec=0.02)


def test_frames_share_one_header_and_wait_for_the_answer(context: Any) -> None:
    player = ScenePlayer(
        context=context,
        parameter_overrides=[
            Parameter("objects_file", value=OBJECTS_FILE),
            Parameter("frames", value=2),
            Parameter("rate", value=50.0),
            Parameter("seed", value=3),
            Parameter("result_topic", value=RESULT_TOPIC),
            Parameter("width", value=320),
            Parameter("height", value=240),
            Parameter("min_distance", value=0.4),
            Parameter("max_distance", value=0.6),
        ],
    )
    fake = FakeRefiner(context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(player)
    executor.add_node(fake.node)
    try:
        spin_until(executor, lambda: bool(fake.images and fake.infos and fake.detections))
        assert player.started  # autostart once the fake refiner subscribed
        (frame,) = player.frames
        image, info, detections = fake.images[0], fake.infos[0], fake.detections[0]
        for header in (image.header, info.header, detections.header):
            assert header == frame.header
            assert header.frame_id == DEFAULT_FRAME_ID
        assert image.encoding == "rgb8"
        np.testing.assert_array_equal(image_to_rgb(image), frame.scene.image)
        assert (info.width, info.height) == (image.width, image.height) == (320, 240)
        np.testing.assert_allclose(intrinsics_from_camera_info(info), frame.scene.K)
        truth = frame.scene.instances[0]
        (detection,) = detections.detections
        assert detection.results[0].hypothesis.class_id == "duck"
        np.testing.assert_allclose(
            pose_to_matrix(detection.results[0].pose.pose)[0], truth.pose_init, atol=1e-9
        )
        assert not np.allclose(truth.pose_init, truth.pose_gt)

        # The second frame waits for the first answer.
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.02)
        assert len(player.frames) == 1 and not player.finished

        fake.answer(detections, [truth.pose_gt])
        spin_until(executor, lambda: frame.result is not None)
        assert frame.latency_s is not None and frame.latency_s > 0
        (score,) = score_frame(frame, player.registry)
        assert score.initial.add_m > 0.001
        assert score.refined is not None and score.refined.add_m < 1e-6 and passed(score.refined)["add_s"]
        assert score.score == pytest.approx(0.9)

        spin_until(executor, lambda: len(fake.detections) == 2)
        second = player.frames[1]
        assert second.header.stamp != frame.header.stamp
        fake.answer(fake.detections[1], [second.scene.instances[0].pose_init])
        spin_until(executor, lambda: player.finished)
        assert score_frame(second, player.registry)[0].refined.add_m > 0.001
    finally:
        executor.shutdown()
        player.destroy_node()
        fake.node.destroy_node()


def test_frames_are_reproducible_per_seed(context: Any) -> None:
    overrides = [
        Parameter("objects_file", value=OBJECTS_FILE),
        Parameter("frames", value=1),
        Parameter("seed", value=5),
        Parameter("autostart", value=False),
        Parameter("width", value=160),
        Parameter("height", value=120),
    ]
    scenes = []
    for _ in range(2):
        player = ScenePlayer(context=context, parameter_overrides=overrides)
        deadline = time.monotonic() + TIMEOUT_S
        while (generated := player.source.get()) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        scene, depth = generated
        assert depth is None  # depth_encoding none
        scenes.append(scene)
        player.destroy_node()
    np.testing.assert_array_equal(scenes[0].image, scenes[1].image)
    np.testing.assert_array_equal(scenes[0].instances[0].pose_init, scenes[1].instances[0].pose_init)


@pytest.mark.parametrize(("encoding", "resolution_m"), [("16UC1", 0.0005), ("32FC1", 1e-6)])
def test_depth_is_published_with_the_frame_header(context: Any, encoding: str, resolution_m: float) -> None:
    """The scene's sensor-model depth in the asked encoding, registered to the image: on the visible
    duck mostly known and within its diameter of its centre's depth."""
    player = ScenePlayer(
        context=context,
        parameter_overrides=[
            Parameter("objects_file", value=OBJECTS_FILE),
            Parameter("frames", value=1),
            Parameter("seed", value=4),
            Parameter("result_topic", value=RESULT_TOPIC),
            Parameter("width", value=160),
            Parameter("height", value=120),
            Parameter("depth_encoding", value=encoding),
        ],
    )
    fake = FakeRefiner(context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(player)
    executor.add_node(fake.node)
    try:
        spin_until(executor, lambda: bool(fake.images and fake.depths))
        (frame,) = player.frames
        depth_msg = fake.depths[0]
        assert depth_msg.header == frame.header and depth_msg.encoding == encoding
        parsed = parse_depth(depth_msg, (120, 160))
        assert parsed.error is None
        (truth,) = frame.scene.instances
        on_duck = (parsed.metres > 0) & truth.mask
        assert on_duck.sum() > 0.5 * truth.mask.sum()  # the sensor model leaves holes, not many
        duck = player.registry["duck"]
        near_duck = np.abs(parsed.metres[on_duck] - truth.pose_gt[2, 3]) < duck.diameter
        assert near_duck.mean() > 0.9  # the rest: flying pixels at its silhouette, as a real sensor's
        np.testing.assert_allclose(parsed.metres, frame.scene.depth, atol=resolution_m)
    finally:
        executor.shutdown()
        player.destroy_node()
        fake.node.destroy_node()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"trans_sigma": [0.01, 0.01]}, "parameter 'trans_sigma' must be 3 non-negative numbers (m)"),
        ({"min_distance": 0.9, "max_distance": 0.5}, "parameter 'min_distance' must be <= 'max_distance'"),
        ({"rate": 2}, "parameter 'rate' must be of type float (write 0.0, not 0)"),
        (
            {"objects_file": "/nonexistent/objects.yaml"},
            "parameter 'objects_file': /nonexistent/objects.yaml",
        ),
    ],
)
def test_invalid_parameters_name_the_parameter(context: Any, overrides: dict, message: str) -> None:
    """The player declares its table through the same function as the refiner node."""
    parameters = [Parameter(name, value=value) for name, value in overrides.items()]
    with pytest.raises(ParameterError) as raised:
        ScenePlayer(context=context, parameter_overrides=parameters)
    assert str(raised.value).startswith(message)
