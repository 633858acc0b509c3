"""The refiner node's inputs: subscriptions, their synchronisation, and the queue to the worker.

:class:`FrameInputs` attaches to a node: it subscribes to every topic of :data:`INPUTS` with the QoS
its parameter names, synchronises them by header stamp (identical stamps, or within ``sync_slop``),
counts every message per topic, explains publishers whose QoS cannot match, and hands each
synchronised set as one :class:`Frame` to a callback. :class:`FrameQueue` carries frames from that
callback to the worker thread.

An input is one row of :data:`INPUTS` and one field of :class:`Frame` with the topic's name (a
registered depth image, say, would be ``InputTopic("depth", Image, "image_qos")`` and
``depth: Image | None = None``); a mode where an input is optional changes only how
:class:`FrameInputs` builds frames. In ``mode: track`` the detections are not synchronised: image +
camera_info make a frame (``detections`` None) and every detections message goes to ``on_detections``.

Threading: subscription, synchroniser and QoS-event callbacks run in the executor thread and only
count and queue (never block); :class:`FrameQueue` is the one hand-over to the worker thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rclpy.event_handler import QoSRequestedIncompatibleQoSInfo, SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.qos import qos_policy_name_from_kind
from sensor_msgs.msg import CameraInfo, Image
from vision_msgs.msg import Detection3DArray

from rnnpose_ros.ros import compat
from rnnpose_ros.ros.parameters import Settings, qos_profile


@dataclass(frozen=True)
class InputTopic:
    """One synchronised input: relative topic name (also the :class:`Frame` field and the counter key),
    message type, and the parameter that sets its QoS."""

    name: str
    msg_type: type
    qos_parameter: str


INPUTS: tuple[InputTopic, ...] = (
    InputTopic("image", Image, "image_qos"),
    InputTopic("camera_info", CameraInfo, "image_qos"),
    InputTopic("detections", Detection3DArray, "detections_qos"),
)


@dataclass
class Frame:
    """One synchronised input set (one message per :data:`INPUTS` row, same stamp) and when it was
    queued (``time.monotonic()``, seconds)."""

    image: Image
    camera_info: CameraInfo
    detections: Detection3DArray | None
    queued: float


class FrameQueue:
    """Bounded FIFO between the subscription callbacks and the worker; ``put`` drops the oldest frame."""

    def __init__(self, capacity: int):
        self._frames: deque[Frame] = deque()
        self.capacity = capacity
        self._condition = threading.Condition()
        self._closed = False

    def put(self, frame: Frame) -> Frame | None:
        """Queue ``frame``; returns the frame dropped to make room, if any. Never blocks."""
        with self._condition:
            dropped = self._frames.popleft() if len(self._frames) >= self.capacity else None
            self._frames.append(frame)
            self._condition.notify()
        return dropped

    def get(self) -> Frame | None:
        """The oldest frame, waiting for one; None once closed."""
        with self._condition:
            while not self._frames and not self._closed:
                self._condition.wait()
            return None if self._closed else self._frames.popleft()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._condition:
            return len(self._frames)


class InputMonitor(Protocol):
    """Where :class:`FrameInputs` reports what is not a frame (the node's diagnostics)."""

    def count_input(self, topic: str) -> None:
        """One message arrived on ``topic``."""

    def incompatible_qos(self, topic: str, publishers: int, text: str) -> None:
        """``publishers`` publishers on ``topic`` so far offered an incompatible QoS; ``text`` says
        which parameter to change."""


class FrameInputs:
    """The subscriptions of :data:`INPUTS` on ``node`` and their synchroniser (module docstring).

    Args:
        node: the node to subscribe with.
        settings: reads ``queue_size`` (subscription depth and synchroniser queue), ``sync_slop`` (0 =
            exact stamps, > 0 = approximate), ``mode`` and the QoS parameters of :data:`INPUTS`.
        on_frame: called with every synchronised :class:`Frame` (executor thread; must not block).
        monitor: told about every message and every incompatible-QoS event.
        on_detections: ``mode: track``: called with every detections message (executor thread; must
            not block); the detections are then not part of the synchronised set.
    """

    def __init__(
        self,
        node: Node,
        settings: Settings,
        on_frame: Callable[[Frame], None],
        monitor: InputMonitor,
        on_detections: Callable[[Detection3DArray], None] | None = None,
    ):
        self._node = node
        self._on_frame = on_frame
        self._monitor = monitor
        self._synchronised_inputs = tuple(
            t for t in INPUTS if settings.mode != "track" or t.msg_type is not Detection3DArray
        )
        subscribers = {topic.name: self._subscribe(topic, settings) for topic in INPUTS}
        self.subscribers = [subscribers[topic.name] for topic in self._synchronised_inputs]
        if len(self._synchronised_inputs) < len(INPUTS) and on_detections is not None:
            subscribers["detections"].registerCallback(on_detections)
        if settings.sync_slop > 0.0:
            self.synchronizer = compat.ApproximateTimeSynchronizer(
                self.subscribers, settings.queue_size, settings.sync_slop
            )
        else:
            self.synchronizer = compat.TimeSynchronizer(self.subscribers, settings.queue_size)
        self.synchronizer.registerCallback(self._synchronised)

    def _subscribe(self, topic: InputTopic, settings: Settings) -> Any:
        qos = qos_profile(getattr(settings, topic.qos_parameter), settings.queue_size)
        subscriber = compat.Subscriber(
            self._node, topic.msg_type, topic.name, qos_profile=qos, event_callbacks=self._qos_events(topic)
        )
        subscriber.registerCallback(lambda _msg: self._monitor.count_input(topic.name))
        return subscriber

    def _qos_events(self, topic: InputTopic) -> SubscriptionEventCallbacks:
        """Say which parameter to change when a publisher's QoS cannot match the subscription (otherwise
        the callback silently never fires)."""

        def incompatible(info: QoSRequestedIncompatibleQoSInfo) -> None:
            policy = qos_policy_name_from_kind(info.last_policy_kind)
            text = (
                f"a publisher on '{self._node.resolve_topic_name(topic.name)}' offers QoS incompatible "
                f"with this subscription ({policy}): set {topic.qos_parameter} to match it (sensor_data "
                "accepts any publisher)"
            )
            self._monitor.incompatible_qos(topic.name, info.total_count, text)

        return SubscriptionEventCallbacks(incompatible_qos=incompatible)

    def _synchronised(self, *messages: Any) -> None:
        fields = {topic.name: msg for topic, msg in zip(self._synchronised_inputs, messages, strict=True)}
        self._on_frame(Frame(**({"detections": None} | fields), queued=time.monotonic()))
