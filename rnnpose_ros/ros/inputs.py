"""The refiner node's inputs: subscriptions, their synchronisation, and the queue to the worker.

:class:`FrameInputs` attaches to a node: it subscribes to every topic of :data:`INPUTS` with the QoS
its parameter names, synchronises them by header stamp (identical stamps, or within ``sync_slop``),
counts every message per topic, explains publishers whose QoS cannot match, and hands each
synchronised set as one :class:`Frame` to a callback. :class:`FrameQueue` carries frames from that
callback to the worker thread.

An input is one row of :data:`INPUTS` and one field of :class:`Frame` with the topic's name; a mode
where an input is optional changes only how :class:`FrameInputs` builds frames. The optional depth
image (:data:`DEPTH`, with ``use_depth``) is such an input: it is not synchronised with the others but
paired with each synchronised frame by stamp (:mod:`~rnnpose_ros.ros.depth_input`). In ``mode: track``
the detections are not synchronised: image + camera_info make a frame (``detections`` None) and every
detections message goes to ``on_detections``.

Threading: subscription, synchroniser and QoS-event callbacks run in the executor thread and only
count and queue (never block); :class:`FrameQueue` is the one hand-over to the worker thread, for
frames and for the tasks that must run where the engine runs (service requests, registry changes).
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
from rnnpose_ros.ros.depth_input import RELEASE_PERIOD_S, DepthPairing
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
#: The optional depth image registered to the colour image (``use_depth``), paired by stamp.
DEPTH = InputTopic("depth", Image, "image_qos")


@dataclass
class Frame:
    """One synchronised input set (one message per :data:`INPUTS` row, same stamp), when it was
    synchronised (``time.monotonic()``, seconds), and its depth image (None without ``use_depth`` or
    when none arrived in time)."""

    image: Image
    camera_info: CameraInfo
    detections: Detection3DArray | None
    queued: float
    depth: Image | None = None


class WorkerTask(Protocol):
    """Work for the worker thread that is not a frame (see :meth:`FrameQueue.submit`)."""

    def __call__(self) -> None:
        """Run on the worker thread; must not raise."""

    def cancel(self, reason: str) -> None:
        """The task will never run (the node stops or cleans up): answer whoever waits for it."""


class FrameQueue:
    """Bounded FIFO between the subscription callbacks and the worker; ``put`` drops the oldest frame.

    Besides frames it carries tasks (:meth:`submit`): callables that must run on the worker thread,
    between two frames, because they use the engine (which is not thread-safe and owns an OpenGL
    context) or change what the worker reads (the object registry). Tasks are never dropped and run
    before any waiting frame, in submission order.
    """

    def __init__(self, capacity: int):
        self._frames: deque[Frame] = deque()
        self._tasks: deque[WorkerTask] = deque()
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

    def submit(self, task: WorkerTask) -> bool:
        """Queue ``task`` for the worker ahead of every frame; False (not queued) once closed."""
        with self._condition:
            if self._closed:
                return False
            self._tasks.append(task)
            self._condition.notify()
        return True

    def get(self) -> Frame | WorkerTask | None:
        """The oldest task, else the oldest frame, waiting for one; None once closed."""
        with self._condition:
            while not self._frames and not self._tasks and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            return self._tasks.popleft() if self._tasks else self._frames.popleft()

    def clear(self) -> int:
        """Drop every waiting frame (tasks stay); returns how many were dropped."""
        with self._condition:
            count = len(self._frames)
            self._frames.clear()
        return count

    def close(self) -> list[WorkerTask]:
        """Stop handing out work; returns the tasks that will never run (the caller cancels them)."""
        with self._condition:
            self._closed = True
            tasks = list(self._tasks)
            self._tasks.clear()
            self._condition.notify_all()
        return tasks

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
            exact stamps, > 0 = approximate), ``mode``, the QoS parameters of :data:`INPUTS`, and
            ``use_depth`` and ``depth_timeout`` (:data:`DEPTH` subscribed and paired with every frame).
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
        self.depth: DepthPairing | None = None
        self._depth_parts: list[Any] = []  # the depth subscriber and the pairing's release timer
        if settings.use_depth:
            self.depth = DepthPairing(
                on_frame, settings.queue_size, settings.sync_slop, settings.depth_timeout
            )
            self._on_frame = self.depth.add_frame
            depth_subscriber = self._subscribe(DEPTH, settings)
            depth_subscriber.registerCallback(self.depth.add_depth)
            self._depth_parts = [depth_subscriber, node.create_timer(RELEASE_PERIOD_S, self.depth.release)]
        self._synchronised_inputs = tuple(
            t for t in INPUTS if settings.mode != "track" or t.msg_type is not Detection3DArray
        )
        self.by_name = {topic.name: self._subscribe(topic, settings) for topic in INPUTS}
        self.subscribers = [self.by_name[topic.name] for topic in self._synchronised_inputs]
        if len(self._synchronised_inputs) < len(INPUTS) and on_detections is not None:
            self.by_name["detections"].registerCallback(on_detections)
        if settings.sync_slop > 0.0:
            self.synchronizer = compat.ApproximateTimeSynchronizer(
                self.subscribers, settings.queue_size, settings.sync_slop
            )
        else:
            self.synchronizer = compat.TimeSynchronizer(self.subscribers, settings.queue_size)
        self.synchronizer.registerCallback(self._synchronised)

    def destroy(self) -> None:
        """Unsubscribe everything (the synchroniser and the depth pairing go with it)."""
        for subscriber in [*self.by_name.values(), *self._depth_parts[:1]]:
            self._node.destroy_subscription(subscriber.sub)
        for timer in self._depth_parts[1:]:
            self._node.destroy_timer(timer)
        self._depth_parts = []

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
