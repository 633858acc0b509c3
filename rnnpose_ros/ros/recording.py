"""Recording published messages to a directory and replaying them, where rosbag2 is not installed.

On a ROS 2 distribution ``ros2 bag record`` / ``ros2 bag play --clock`` do this (README, "Replaying
recorded data"); the PyPI wheels have no rosbag2, so the scene player can write what it publishes
here (``record_dir`` parameter) and ``scene_player --replay <dir>`` plays it back, with the recorded
header stamps, at the recorded pace (times ``--rate``), optionally publishing ``/clock`` for nodes
started with ``use_sim_time:=true``.

Layout of a recording directory (CDR is the DDS wire format, so any ROS 2 tool can decode a file)::

    topics.yaml        format version; per topic: message type ("sensor_msgs/msg/Image") and QoS
    index.tsv          one line per message, in publish order: <time ns>\t<topic>\t<file>
    messages/<n>.cdr   the message serialised with rclpy.serialization (CDR), n = 0, 1, ...

``time`` is the message's publish time on the recorder's clock (the scene player stamps each header
with it). Lines are appended and flushed message by message, so a recording cut short (the process
killed) still replays up to its last complete message.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rclpy
import rclpy.executors
import yaml
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import deserialize_message, serialize_message
from rosgraph_msgs.msg import Clock

FORMAT = "rnnpose_ros-recording-1"
QOS = {
    "sensor_data": qos_profile_sensor_data,
    "reliable": QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE),
}
# How often the replay looks for due messages and publishes /clock (s).
REPLAY_PERIOD_S = 0.005


class RecordingError(ValueError):
    """A recording directory that cannot be written or read (the message names the file and why)."""


def type_name(msg_type: type) -> str:
    """``<package>/msg/<Name>`` of a generated message class (the name rosbag2 and ``ros2 topic`` use)."""
    package = msg_type.__module__.split(".")[0]
    return f"{package}/msg/{msg_type.__name__}"


def message_type(name: str) -> type:
    """The message class of ``<package>/msg/<Name>``. Raises RecordingError when it is not installed."""
    parts = name.split("/")
    if len(parts) != 3 or parts[1] != "msg" or not parts[0] or not parts[2]:
        raise RecordingError(f"message type {name!r} is not <package>/msg/<Name>")
    package, _, cls = parts
    try:
        return getattr(importlib.import_module(f"{package}.msg"), cls)
    except (ImportError, AttributeError) as error:
        raise RecordingError(f"message type {name!r} is not installed: {error}") from None


class Recorder:
    """Writes messages to a new recording directory (module docstring).

    Args:
        directory: created if missing; must not hold a recording already.
        topics: topic -> (message class, QoS name of :data:`QOS`) of everything that will be written.
    """

    def __init__(self, directory: Path, topics: dict[str, tuple[type, str]]):
        self.directory = Path(directory)
        if (self.directory / "index.tsv").exists():
            raise RecordingError(
                f"{self.directory} already holds a recording (index.tsv): choose a new directory"
            )
        unknown = {topic: qos for topic, (_, qos) in topics.items() if qos not in QOS}
        if unknown:
            raise RecordingError(f"unknown QoS names {unknown}; known: {sorted(QOS)}")
        try:
            (self.directory / "messages").mkdir(parents=True, exist_ok=True)
            meta = {
                "format": FORMAT,
                "topics": {t: {"type": type_name(m), "qos": q} for t, (m, q) in topics.items()},
            }
            (self.directory / "topics.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
            self._index = (self.directory / "index.tsv").open("a", encoding="utf-8")
        except OSError as error:
            raise RecordingError(f"cannot write a recording in {self.directory}: {error}") from None
        self.topics = dict(topics)
        self.count = 0

    def write(self, topic: str, msg: Any, time_ns: int) -> None:
        """Append ``msg`` published on ``topic`` at ``time_ns`` (nanoseconds)."""
        if topic not in self.topics:
            raise RecordingError(f"topic {topic!r} was not declared to the recorder ({sorted(self.topics)})")
        name = f"messages/{self.count}.cdr"
        (self.directory / name).write_bytes(serialize_message(msg))
        self._index.write(f"{int(time_ns)}\t{topic}\t{name}\n")
        self._index.flush()
        self.count += 1

    def close(self) -> None:
        self._index.close()


@dataclass
class RecordedMessage:
    """One message of a recording: publish time (ns), topic, and the decoded message."""

    time_ns: int
    topic: str
    message: Any


@dataclass
class Recording:
    """A recording read back: topic -> (message class, QoS name), and the messages in publish order."""

    topics: dict[str, tuple[type, str]]
    messages: list[RecordedMessage]


def read_recording(directory: Path) -> Recording:
    """Read a recording directory. Raises RecordingError naming the file and the problem."""
    directory = Path(directory)
    meta_path, index_path = directory / "topics.yaml", directory / "index.tsv"
    if not meta_path.is_file() or not index_path.is_file():
        raise RecordingError(f"{directory} is not a recording (topics.yaml and index.tsv expected)")
    meta = yaml.safe_load(meta_path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("topics"), dict):
        raise RecordingError(f"{meta_path}: not a {FORMAT} recording")
    topics = {}
    for topic, entry in meta["topics"].items():
        if entry.get("qos") not in QOS:
            raise RecordingError(f"{meta_path}: topic {topic}: unknown QoS {entry.get('qos')!r}")
        topics[topic] = (message_type(str(entry.get("type"))), entry["qos"])
    messages = []
    for number, line in enumerate(index_path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) != 3 or fields[1] not in topics or not fields[0].isdigit():
            raise RecordingError(f"{index_path}:{number}: expected <time ns>\\t<declared topic>\\t<file>")
        path = directory / fields[2]
        try:
            data = path.read_bytes()
        except OSError as error:
            raise RecordingError(f"{index_path}:{number}: {error}") from None
        messages.append(
            RecordedMessage(int(fields[0]), fields[1], deserialize_message(data, topics[fields[1]][0]))
        )
    return Recording(topics, messages)


class Replayer(Node):
    """Publishes a :class:`Recording` at its recorded pace (the ``ros2 bag play`` of a recording dir).

    Args:
        recording: what to publish.
        rate: playback speed factor (2 = twice as fast).
        clock: also publish ``/clock`` at the recorded time (for ``use_sim_time`` nodes).
        wait_for_subscribers: start only once every topic has a subscriber (nothing is lost to
            discovery); otherwise start at once.
        **kwargs: passed to :class:`rclpy.node.Node`.
    """

    def __init__(
        self,
        recording: Recording,
        rate: float = 1.0,
        clock: bool = False,
        wait_for_subscribers: bool = False,
        **kwargs: Any,
    ):
        super().__init__("recording_replay", **kwargs)
        if not rate > 0:
            raise RecordingError(f"rate must be > 0, got {rate}")
        self.recording, self.rate, self.wait_for_subscribers = recording, rate, wait_for_subscribers
        self.publishers_by_topic = {
            topic: self.create_publisher(msg_type, topic, QOS[qos])
            for topic, (msg_type, qos) in recording.topics.items()
        }
        self.pub_clock = self.create_publisher(Clock, "/clock", 10) if clock else None
        self.published = 0
        self._start: float | None = None
        self._timer = self.create_timer(REPLAY_PERIOD_S, self._tick)

    @property
    def finished(self) -> bool:
        return self.published >= len(self.recording.messages)

    def _subscribed(self) -> bool:
        return all(p.get_subscription_count() > 0 for p in self.publishers_by_topic.values())

    def _tick(self) -> None:
        messages = self.recording.messages
        if self.finished:
            return
        if self._start is None:
            if self.wait_for_subscribers and not self._subscribed():
                return
            self._start = time.monotonic()
        origin = messages[0].time_ns
        now_ns = origin + int((time.monotonic() - self._start) * self.rate * 1e9)
        if self.pub_clock is not None:
            self.pub_clock.publish(Clock(clock=rclpy.time.Time(nanoseconds=now_ns).to_msg()))
        while self.published < len(messages) and messages[self.published].time_ns <= now_ns:
            item = messages[self.published]
            self.publishers_by_topic[item.topic].publish(item.message)
            self.published += 1


def replay_main(argv: Sequence[str]) -> int:
    """``scene_player --replay <dir> [--rate R] [--clock] [--wait-for-subscribers]``: publish a recording
    and exit 0 when done (2, with the reason, for an unusable directory or option)."""
    ros_args = list(argv)
    parser = argparse.ArgumentParser(prog="scene_player --replay", description=__doc__.split("\n")[0])
    parser.add_argument("--replay", type=Path, required=True, help="recording directory (record_dir)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    parser.add_argument("--clock", action="store_true", help="publish /clock (use_sim_time nodes)")
    parser.add_argument(
        "--wait-for-subscribers", action="store_true", help="start once every topic is matched"
    )
    options = parser.parse_args(rclpy.utilities.remove_ros_args(ros_args)[1:])
    logger = rclpy.logging.get_logger("recording_replay")
    try:
        recording = read_recording(options.replay)
    except RecordingError as error:
        logger.fatal(str(error))
        return 2
    rclpy.init(args=ros_args)
    node = None
    try:
        node = Replayer(recording, options.rate, options.clock, options.wait_for_subscribers)
        node.get_logger().info(f"replaying {len(recording.messages)} messages of {options.replay}")
        while rclpy.ok() and not node.finished:
            rclpy.spin_once(node, timeout_sec=0.1)
        return 0
    except RecordingError as error:
        logger.fatal(str(error))
        return 2
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        return 0
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(replay_main(sys.argv))
