"""launch_testing test of ``launch/refine.launch.py``: the launched node answers a frame on ``~/detections``;
``depth:=<topic>`` remaps the depth input and turns ``use_depth`` on.

Runs on a ROS 2 distribution where ``launch``, ``launch_ros`` and ``launch_testing`` are installed and
the package is built (``colcon build``; ``colcon test`` or ``pytest`` with the install sourced). The
PyPI wheels used by the project's own set-up have none of these (see ENVIRONMENT.md), so there the
test skips; ``test_node_process.py`` covers the same executable started without launch. Where the
launch_testing pytest plugin does not fit the installed pytest, ``launch_test test/test_launch.py``
runs the same test.
"""

from __future__ import annotations

import time
import unittest
from pathlib import Path

import pytest

SKIP_REASON = (
    "{} is not installed: launch tests need a ROS 2 distribution (it is not on PyPI); "
    "test_node_process.py covers refine_node without launch"
)
pytest.importorskip("launch_testing", reason=SKIP_REASON.format("launch_testing"))
pytest.importorskip("launch_ros", reason=SKIP_REASON.format("launch_ros"))

import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import launch_testing.markers  # noqa: E402
import rclpy  # noqa: E402
from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from vision_msgs.msg import Detection3DArray  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60.0


@pytest.mark.launch_test
@launch_testing.markers.keep_alive
def generate_test_description() -> LaunchDescription:
    include = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(REPO_ROOT / "launch" / "refine.launch.py")),
        launch_arguments={
            "params_file": str(REPO_ROOT / "config" / "refine.yaml"),
            "image": "camera/image_rect",
            "camera_info": "camera/camera_info",
            "detections": "detector/detections",
            "depth": "camera/aligned_depth",
            "use_rviz": "false",
        }.items(),
    )
    return LaunchDescription([include, launch_testing.actions.ReadyToTest()])


class TestRefineLaunch(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        rclpy.init()
        cls.node = rclpy.create_node("refine_launch_test")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.node.destroy_node()
        rclpy.shutdown()

    def test_remapped_inputs_give_an_answer_with_the_image_header(self) -> None:
        outputs: list[Detection3DArray] = []
        self.node.create_subscription(Detection3DArray, "/rnnpose_refiner/detections", outputs.append, 10)
        pub_image = self.node.create_publisher(Image, "camera/image_rect", 5)
        pub_info = self.node.create_publisher(CameraInfo, "camera/camera_info", 5)
        pub_detections = self.node.create_publisher(Detection3DArray, "detector/detections", 5)
        pub_depth = self.node.create_publisher(Image, "camera/aligned_depth", 5)
        header = Header(frame_id="camera_color_optical_frame")
        header.stamp.sec = 42
        image = Image(header=header, height=2, width=2, encoding="rgb8", step=6, data=bytes(12))
        info = CameraInfo(header=header, height=2, width=2)
        info.k = [100.0, 0.0, 1.0, 0.0, 100.0, 1.0, 0.0, 0.0, 1.0]
        depth = Image(header=header, height=2, width=2, encoding="16UC1", step=4, data=bytes([232, 3] * 4))
        deadline = time.monotonic() + TIMEOUT_S
        while not outputs and time.monotonic() < deadline:
            # Re-send until the node (started by launch, warming up) has matched our publishers.
            pub_depth.publish(depth)
            pub_image.publish(image)
            pub_info.publish(info)
            pub_detections.publish(Detection3DArray(header=header))
            rclpy.spin_once(self.node, timeout_sec=0.5)
        self.assertTrue(outputs, "no message on /rnnpose_refiner/detections")
        # depth:= turned use_depth on: the node subscribes to the remapped depth topic
        self.assertGreaterEqual(self.node.count_subscribers("camera/aligned_depth"), 1)
        self.assertEqual(outputs[0].header, header)
        self.assertEqual(len(outputs[0].detections), 0)


@launch_testing.post_shutdown_test()
class TestRefineLaunchShutdown(unittest.TestCase):
    def test_exit_code(self, proc_info) -> None:
        # 0 after a clean shutdown; -2 / -15 when launch stops the node with SIGINT / SIGTERM.
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0, -2, -15])
