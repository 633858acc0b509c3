"""The set-up is real: ROS 2 messages cross a process boundary over DDS on loopback, pyrender
renders a textured mesh offscreen with metric depth, torch computes, and the code is lint-clean."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT

PUBLISHER = textwrap.dedent(
    """
    import sys, time
    import rclpy
    from geometry_msgs.msg import TransformStamped
    from tf2_msgs.msg import TFMessage
    from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose

    rclpy.init()
    node = rclpy.create_node("plumbing_publisher")
    det_pub = node.create_publisher(Detection3DArray, "plumbing/detections", 10)
    tf_pub = node.create_publisher(TFMessage, "plumbing/tf", 10)
    deadline = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < deadline:
        array = Detection3DArray()
        array.header.frame_id = "camera_optical"
        det = Detection3D()
        det.id = "duck_0"
        hyp = ObjectHypothesisWithPose()
        hyp.hypothesis.class_id = "duck"
        hyp.hypothesis.score = 0.75
        hyp.pose.pose.position.z = 0.5
        det.results.append(hyp)
        array.detections.append(det)
        det_pub.publish(array)
        tf = TransformStamped()
        tf.header.frame_id = "camera_optical"
        tf.child_frame_id = "duck_0"
        tf.transform.rotation.w = 1.0
        tf_pub.publish(TFMessage(transforms=[tf]))
        rclpy.spin_once(node, timeout_sec=0.05)
    rclpy.shutdown()
    """
)


def test_dds_safety_settings_are_in_force() -> None:
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    profile = Path(os.environ["FASTDDS_DEFAULT_PROFILES_FILE"])
    text = profile.read_text()
    assert "<useBuiltinTransports>false</useBuiltinTransports>" in text
    assert "<address>127.0.0.1</address>" in text


def test_vision_msgs_and_tf_cross_processes() -> None:
    rclpy = pytest.importorskip("rclpy")
    from tf2_msgs.msg import TFMessage
    from vision_msgs.msg import Detection3DArray

    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, "30"], env=os.environ.copy())
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("plumbing_subscriber", context=context)
        got: dict[str, object] = {}
        node.create_subscription(
            Detection3DArray, "plumbing/detections", lambda m: got.setdefault("det", m), 10
        )
        node.create_subscription(TFMessage, "plumbing/tf", lambda m: got.setdefault("tf", m), 10)
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + 25.0
        while len(got) < 2 and time.monotonic() < deadline and publisher.poll() is None:
            executor.spin_once(timeout_sec=0.1)
        assert "det" in got, "no Detection3DArray received from the other process"
        assert "tf" in got, "no TFMessage received from the other process"
        det = got["det"].detections[0]
        assert got["det"].header.frame_id == "camera_optical"
        assert det.id == "duck_0"
        assert det.results[0].hypothesis.class_id == "duck"
        assert det.results[0].pose.pose.position.z == pytest.approx(0.5)
        assert got["tf"].transforms[0].child_frame_id == "duck_0"
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
        publisher.terminate()
        publisher.wait(timeout=10)


def test_pyrender_textured_mesh_offscreen_metric_depth() -> None:
    pyrender = pytest.importorskip("pyrender")
    import trimesh
    from PIL import Image

    # A textured unit quad (real image texture), 0.2 m wide, facing the camera at z = 0.5 m.
    texture = Image.fromarray((np.indices((64, 64)).sum(0) % 2 * 200 + 30).astype(np.uint8)).convert("RGB")
    vertices = np.array([[-0.1, -0.1, 0], [0.1, -0.1, 0], [0.1, 0.1, 0], [-0.1, 0.1, 0]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)
    mesh = trimesh.Trimesh(
        vertices, faces, visual=trimesh.visual.TextureVisuals(uv=uv, image=texture), process=False
    )
    scene = pyrender.Scene(bg_color=[0, 0, 0, 0], ambient_light=[1.0, 1.0, 1.0])
    scene.add(pyrender.Mesh.from_trimesh(mesh))
    camera = pyrender.IntrinsicsCamera(fx=300, fy=300, cx=80, cy=60, znear=0.05, zfar=5.0)
    # OpenCV camera at the origin looking down +z; pyrender looks down -z: flip y and z.
    cam_pose = np.diag([1.0, -1.0, -1.0, 1.0])
    mesh_pose = np.eye(4)
    mesh_pose[:3, :3] = np.diag([1.0, -1.0, -1.0])  # face the OpenCV camera
    mesh_pose[2, 3] = 0.5
    scene.main_camera_node = scene.add(camera, pose=cam_pose)
    scene.set_pose(next(iter(scene.mesh_nodes)), mesh_pose)
    renderer = pyrender.OffscreenRenderer(160, 120)
    try:
        color, depth = renderer.render(scene)
    finally:
        renderer.delete()
    assert color.shape == (120, 160, 3)
    inside = depth > 0
    # The quad spans ±0.1 m at 0.5 m: ±60 px around the principal point.
    assert inside[60, 80] and not inside[2, 2]
    assert np.abs(depth[inside] - 0.5).max() < 1e-3
    assert len(np.unique(color[inside].sum(axis=1))) > 1, "texture should give more than one colour"


def test_torch_computes() -> None:
    import torch

    a = torch.randn(64, 64, dtype=torch.float64)
    spd = a @ a.T + 64 * torch.eye(64, dtype=torch.float64)
    x = torch.linalg.solve(spd, torch.ones(64, dtype=torch.float64))
    assert torch.allclose(spd @ x, torch.ones(64, dtype=torch.float64))


def test_ruff_is_clean() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed in this environment (make setup installs it)")
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([str(ruff), *args], cwd=REPO_ROOT, capture_output=True, text=True)
        assert result.returncode == 0, f"ruff {' '.join(args)}:\n{result.stdout}{result.stderr}"
