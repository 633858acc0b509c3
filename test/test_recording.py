"""Recording what the scene player publishes and replaying it (where rosbag2 is not installed): the
directory format round trip, its errors, and a replay that the refiner node answers frame by frame."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from test_node import inputs, make_node, pose  # noqa: E402
from vision_msgs.msg import Detection3DArray  # noqa: E402

from rnnpose_ros.ros.conversions import stamp_nanoseconds  # noqa: E402
from rnnpose_ros.ros.recording import Recorder, RecordingError, Replayer, read_recording  # noqa: E402
from rnnpose_ros.ros.scene_player import ScenePlayer  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402

TIMEOUT_S = 30.0
TOPICS = {
    "image": (Image, "sensor_data"),
    "camera_info": (CameraInfo, "sensor_data"),
    "detections": (Detection3DArray, "reliable"),
}


def spin_until(executor: SingleThreadedExecutor, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        executor.spin_once(timeout_sec=0.02)


def test_round_trip_keeps_messages_times_and_order(tmp_path: Path) -> None:
    image, info, detections = inputs([("duck", pose(), "7"), ("duck", None, "")])
    recorder = Recorder(tmp_path / "rec", TOPICS)
    written = [(5_000, "detections", detections), (5_000, "camera_info", info), (5_001, "image", image)]
    for time_ns, topic, message in written:
        recorder.write(topic, message, time_ns)
    recorder.close()
    recording = read_recording(tmp_path / "rec")
    assert recording.topics == TOPICS
    assert [(m.time_ns, m.topic, m.message) for m in recording.messages] == written
    with pytest.raises(RecordingError, match="already holds a recording"):
        Recorder(tmp_path / "rec", TOPICS)
    with pytest.raises(RecordingError, match="not declared"):
        Recorder(tmp_path / "other", TOPICS).write("tf", image, 0)


def test_unreadable_recordings_are_refused_naming_the_problem(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="is not a recording"):
        read_recording(tmp_path)
    recorder = Recorder(tmp_path / "rec", TOPICS)
    recorder.write("image", inputs([])[0], 1)
    recorder.close()
    index = tmp_path / "rec" / "index.tsv"
    index.write_text(index.read_text() + "12\tnope\tmessages/9.cdr\n")
    with pytest.raises(RecordingError, match=r"index.tsv:2: expected"):
        read_recording(tmp_path / "rec")
    meta = tmp_path / "rec" / "topics.yaml"
    meta.write_text(meta.read_text().replace("sensor_msgs/msg/Image", "no_such_msgs/msg/Image"))
    with pytest.raises(RecordingError, match="'no_such_msgs/msg/Image' is not installed"):
        read_recording(tmp_path / "rec")


def test_recorded_scene_player_frames_replay_into_the_refiner(context: Any, tmp_path: Path) -> None:
    """The player records three frames (nobody listening); the replay publishes them with their
    recorded stamps and /clock to the refiner node on simulated time, which answers every frame under
    its own stamp."""
    record_dir = tmp_path / "frames"
    player = ScenePlayer(
        context=context,
        parameter_overrides=[
            Parameter("objects_file", value=str(REPO_ROOT / "config" / "objects.yaml")),
            Parameter("frames", value=3),
            Parameter("rate", value=50.0),
            Parameter("wait_for_result", value=False),
            Parameter("autostart", value=False),
            Parameter("width", value=320),
            Parameter("height", value=240),
            Parameter("record_dir", value=str(record_dir)),
        ],
    )
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(player)
    try:
        player.start()
        spin_until(executor, lambda: len(player.frames) == 3)
        played = [frame.stamp_ns for frame in player.frames]
    finally:
        executor.remove_node(player)
        player.destroy_node()
    recording = read_recording(record_dir)
    assert [m.topic for m in recording.messages] == ["detections", "camera_info", "image"] * 3
    assert [m.time_ns for m in recording.messages] == [s for s in played for _ in range(3)]
    assert all(stamp_nanoseconds(m.message.header.stamp) == m.time_ns for m in recording.messages)

    refiner = make_node(context, use_sim_time=True)  # as `launch ... use_sim_time:=true` starts it
    answers: list[Detection3DArray] = []
    clock: list[Clock] = []
    listener = rclpy.create_node("replay_listener", context=context)
    listener.create_subscription(Detection3DArray, "/rnnpose_refiner/detections", answers.append, 10)
    listener.create_subscription(Clock, "/clock", clock.append, 10)
    replayer = Replayer(recording, rate=4.0, clock=True, wait_for_subscribers=True, context=context)
    for node in (refiner, listener, replayer):
        executor.add_node(node)
    try:
        spin_until(executor, lambda: len(answers) == 3)
        assert [stamp_nanoseconds(a.header.stamp) for a in answers] == played
        assert all(
            len(a.detections) == 1 and a.detections[0].results[0].hypothesis.score > 0 for a in answers
        )
        clock_ns = [stamp_nanoseconds(c.clock) for c in clock]
        assert clock_ns and played[0] <= min(clock_ns) and np.all(np.diff(clock_ns) >= 0)
        # the node runs on the recording's time, not the wall clock
        assert played[0] <= refiner.get_clock().now().nanoseconds <= max(clock_ns)
    finally:
        executor.shutdown()
        for node in (refiner, listener, replayer):
            node.destroy_node()


def test_replay_of_a_missing_directory_exits_2(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from rnnpose_ros.ros import scene_player

    assert scene_player.main(["scene_player", "--replay", str(tmp_path / "none"), "--rate", "2"]) == 2
    assert "is not a recording" in capfd.readouterr().err
