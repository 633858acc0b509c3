"""The demo tool end to end (real ``refine_node`` child, real DDS, 2 frames) and its pure helpers."""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rnnpose_ros.core.backends import BACKENDS
from rnnpose_ros.core.metrics import PoseErrors
from rnnpose_ros.tools import demo, node_process

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 240
SUMMARY_KEYS = {
    "backend",
    "seed",
    "wait_for_result",
    "ros_domain_id",
    "node_command",
    "frames_requested",
    "frames_published",
    "frames_answered",
    "frames_unanswered",
    "instances",
    "metrics",
    "mean_add_mm",
    "latency_ms",
    "node_diagnostics",
    "frames",
    "files",
}


def test_environment_is_dds_safe_and_keeps_a_given_domain() -> None:
    env = node_process.dds_safe_environment(
        {"ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET", "ROS_DOMAIN_ID": "142"}
    )
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert Path(env["FASTDDS_DEFAULT_PROFILES_FILE"]).is_file()
    assert env["ROS_DOMAIN_ID"] == "142"
    drawn = node_process.dds_safe_environment({})
    assert 100 <= int(drawn["ROS_DOMAIN_ID"]) <= 199


def test_node_command_uses_the_params_file_and_backend() -> None:
    command = node_process.node_command(
        Path("/x/refine.yaml"), Path("/x/objects.yaml"), "classical", ["outer_iterations:=2"]
    )
    ros_args = command[command.index("--ros-args") :]
    assert ros_args == [
        "--ros-args",
        "--params-file",
        "/x/refine.yaml",
        "-p",
        "backend:=classical",
        "-p",
        "objects_file:=/x/objects.yaml",
        "-p",
        "outer_iterations:=2",
    ]
    assert Path(command[0]).name in ("refine_node", Path(sys.executable).name)


# Passes ADD(-S) (0.01 d) and 5 cm 5°, fails the 2D projection (6 px); fails everything.
GOOD = PoseErrors(add_m=0.001, projection_px=6.0, rotation_deg=1.0, translation_m=0.01, diameter_m=0.1)
BAD = PoseErrors(add_m=0.05, projection_px=30.0, rotation_deg=20.0, translation_m=0.1, diameter_m=0.1)


def test_pass_rates_count_unrefined_instances_as_failures() -> None:
    scores = [SimpleNamespace(initial=BAD, refined=GOOD), SimpleNamespace(initial=GOOD, refined=None)]
    rates = demo.pass_rates(scores)
    assert list(rates) == ["ADD(-S)@0.1d", "5cm5deg", "proj2D@5px"]
    assert rates["ADD(-S)@0.1d"] == demo.Rates(initial=0.5, refined=0.5)
    assert rates["5cm5deg"] == demo.Rates(initial=0.5, refined=0.5)
    assert rates["proj2D@5px"] == demo.Rates(initial=0.0, refined=0.0)
    assert demo.pass_rates([]) == {}
    assert demo.mean_add_mm(scores) == pytest.approx({"initial": 25.5, "refined": 1.0})


def test_instance_record_keeps_the_summary_format() -> None:
    score = SimpleNamespace(class_id="duck", instance_id="duck_0", score=0.5, initial=BAD, refined=None)
    record = demo._instance_record(score)
    assert list(record) == ["class_id", "instance_id", "score", "initial", "refined"]
    assert record["initial"] == {
        "add_m": 0.05,
        "add_fraction": pytest.approx(0.5),
        "rotation_deg": 20.0,
        "translation_m": 0.1,
        "projection_px": 30.0,
    }
    assert list(record["initial"]) == [
        "add_m",
        "add_fraction",
        "rotation_deg",
        "translation_m",
        "projection_px",
    ]
    assert record["refined"] is None


def test_backend_choices_come_from_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.parse_args(["--backend", "rnnpose"]).backend == "rnnpose"
    with pytest.raises(SystemExit):
        demo.parse_args(["--backend", "teapot"])
    error = capsys.readouterr().err
    assert all(name in error for name in BACKENDS)


def _run_demo(*args: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """``python -m rnnpose_ros.tools.demo *args`` with a short schedule and no restarts (these tests
    check the plumbing, not accuracy), in a DDS domain of its own away from the in-process tests'
    nodes: (the finished run, its environment)."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(
        random.choice([d for d in range(100, 200) if str(d) != env.get("ROS_DOMAIN_ID")])
    )
    short = ["outer_iterations:=2", "inner_iterations:=1", "restart_below_score:=0.0"]
    command = [sys.executable, "-m", "rnnpose_ros.tools.demo", *args]
    command += [item for param in short for item in ("--node-param", param)]
    run = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S
    )
    return run, env


def test_demo_end_to_end_rgb_and_rgbd(tmp_path: Path) -> None:
    """Two frames through the real node, RGB-only then with depth (``--depth 32FC1``: the same frames,
    the node with ``use_depth``); few iterations: this checks the plumbing, not accuracy."""
    pytest.importorskip("rclpy")
    pytest.importorskip("vision_msgs")
    output = tmp_path / "demo_output"
    run, env = _run_demo("--frames", "2", "--rate", "20", "--output", str(output), "--depth", "32FC1")
    assert run.returncode == 0, f"demo failed:\n{run.stdout}\n{run.stderr}"
    assert "ADD(-S)@0.1d" in run.stdout and "latency" in run.stdout
    assert "RGB vs RGB-D, the same 2 instances" in run.stdout and "ADD(-S)@0.02d" in run.stdout

    summaries = {}
    for folder, encoding in (("rgb", None), ("rgbd", "32FC1")):
        summary = summaries[folder] = json.loads((output / folder / "summary.json").read_text())
        assert summary.keys() >= SUMMARY_KEYS and summary["depth_encoding"] == encoding
        assert summary["frames_published"] == summary["frames_answered"] == 2
        assert summary["ros_domain_id"] == int(env["ROS_DOMAIN_ID"])
        assert set(summary["metrics"]) == {"ADD(-S)@0.1d", "5cm5deg", "proj2D@5px"}
        assert set(summary["metrics_strict_add"]) == {"ADD(-S)@0.02d", "ADD(-S)@0.05d"}
        refined = [i["refined"] for f in summary["frames"] for i in f["instances"]]
        assert len(refined) == 2
        assert all(r is not None and math.isfinite(r["add_m"]) for r in refined)
        assert math.isfinite(summary["latency_ms"]["mean"])
        pngs = sorted((output / folder).glob("frame_*.png"))
        assert [p.name for p in pngs] == summary["files"]["png"] == ["frame_000.png", "frame_001.png"]
        assert (output / folder / "demo.gif").stat().st_size > 0
    # the same scenes and detector noise in both runs; the node used the depth of every RGB-D frame
    initial = {folder: [f["instances"][0]["initial"] for f in s["frames"]] for folder, s in summaries.items()}
    assert initial["rgb"] == initial["rgbd"]
    assert "use_depth:=true" in summaries["rgbd"]["node_command"]
    assert summaries["rgbd"]["node_diagnostics"]["frames_with_depth"] == "2"
    assert "frames_with_depth" not in summaries["rgb"]["node_diagnostics"]
    comparison = json.loads((output / "comparison.json").read_text())
    assert comparison["depth_encoding"] == "32FC1" and set(comparison["runs"]) == {"RGB", "RGB-D"}


def test_strict_add_rates() -> None:
    near = PoseErrors(add_m=0.003, projection_px=1.0, rotation_deg=1.0, translation_m=0.003, diameter_m=0.1)
    scores = [
        SimpleNamespace(initial=BAD, refined=near),  # 0.03 d: passes 0.05 d, fails 0.02 d
        SimpleNamespace(initial=near, refined=GOOD),  # 0.01 d
        SimpleNamespace(initial=GOOD, refined=None),
    ]
    rates = demo.strict_add_rates(scores)
    assert list(rates) == ["ADD(-S)@0.02d", "ADD(-S)@0.05d"]
    assert rates["ADD(-S)@0.02d"] == demo.Rates(initial=pytest.approx(1 / 3), refined=pytest.approx(1 / 3))
    assert rates["ADD(-S)@0.05d"] == demo.Rates(initial=pytest.approx(2 / 3), refined=pytest.approx(2 / 3))
    assert demo.strict_add_rates([]) == {}
    assert demo.parse_args(["--depth"]).depth == "16UC1" and demo.parse_args([]).depth is None


def test_stale_shm_files_are_removed_only_when_new_dead_and_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_process, "SHM_DIR", tmp_path)
    (tmp_path / "fastdds_port47150").touch()  # there before the run
    before = node_process.fastdds_shm_files()
    dead = ["fastdds_ab12", "fastdds_ab12_el", "fastdds_port47161", "sem.fastdds_port47161_mutex"]
    alive = ["fastdds_cd34", "fastdds_cd34_el", "fastdds_port47163", "fastdds_port7001", "other_file"]
    for name in dead + alive:
        (tmp_path / name).touch()
    with (tmp_path / "fastdds_cd34_el").open("rb") as owner, (tmp_path / "fastdds_port47163").open("rb"):
        fcntl.flock(owner, fcntl.LOCK_EX)  # a live segment's owner; the port file is held open
        removed = node_process.remove_stale_shm(before, domain_id=159)  # ports 47150-47399
    assert removed == sorted(dead)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fastdds_port47150", *alive])


def test_overlay_is_drawn_here_when_the_node_sent_none() -> None:
    pytest.importorskip("vision_msgs")
    import numpy as np
    from std_msgs.msg import Header
    from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose

    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.synth import Scene, SceneInstance
    from rnnpose_ros.ros.conversions import matrix_to_pose
    from rnnpose_ros.ros.scene_player import PlayedFrame

    registry = ObjectRegistry.from_yaml(REPO_ROOT / "config" / "objects.yaml")
    pose = np.eye(4)
    pose[2, 3] = 0.4
    K = np.array([[300.0, 0.0, 80.0], [0.0, 300.0, 60.0], [0.0, 0.0, 1.0]])
    scene = Scene(np.zeros((120, 160, 3), np.uint8), K, [SceneInstance("duck", pose, pose, "duck_0")])
    hypothesis = ObjectHypothesisWithPose()
    hypothesis.pose.pose = matrix_to_pose(pose)
    frame = PlayedFrame(0, scene, header=Header(frame_id="camera_color_optical_frame"), published_at=0.0)
    outputs = demo.Outputs(debug_images={}, diagnostics={})
    assert demo._overlay(frame, outputs, registry) is None  # unanswered: nothing to draw
    frame.result = Detection3DArray(detections=[Detection3D(results=[hypothesis])])
    image, source = demo._overlay(frame, outputs, registry)
    assert source == "demo" and image.shape == (120, 160, 3)
    assert ((image[..., 0] > 200) & (image[..., 1] < 50)).any()  # the refined outline in red


def test_objects_without_weights(tmp_path: Path) -> None:
    objects = tmp_path / "objects.yaml"
    objects.write_text("objects:\n  duck: {mesh: a.obj}\n  can: {mesh: b.obj, weights: can.pth}\n")
    assert demo.objects_without_weights(objects, ["duck", "can", "cat"]) == ["duck", "cat"]


def test_track_demo_end_to_end(tmp_path: Path) -> None:
    """``--track``: three frames of a sequence through the real node in mode track (few iterations:
    this checks the plumbing, not accuracy); every image is answered with the one track."""
    pytest.importorskip("rclpy")
    pytest.importorskip("vision_msgs")
    output = tmp_path / "demo_output"
    run, _ = _run_demo("--track", "--frames", "3", "--detect-every", "2", "--output", str(output))
    assert run.returncode == 0, f"demo failed:\n{run.stdout}\n{run.stderr}"
    assert "tracked ADD(-S)@0.1d" in run.stdout and "latency" in run.stdout
    summary = json.loads((output / "summary.json").read_text())
    assert summary["mode"] == "track" and summary["frames"] == 3
    assert [f["detected"] for f in summary["per_frame"]] == [True, False, True]
    # Detections may reach the node after their image (another topic, as from a real detector): they
    # then seed the next image within detection_tolerance, so the track starts at frame 0 or 1.
    first, *rest = summary["per_frame"]
    assert first["tracks"] in ([], ["duck_0"]) and all(f["tracks"] == ["duck_0"] for f in rest)
    tracked = [f for f in summary["per_frame"] if f["tracks"]]
    assert all(math.isfinite(f["relative_add_s"][0]) for f in tracked)
    assert (output / "track.gif").stat().st_size > 0
