"""The one place that fills in what a pip-only ROS 2 install lacks: time synchronisation and TF broadcast.

On a ROS 2 distribution (Humble, Jazzy, Kilted) the real ``message_filters`` and ``tf2_ros`` packages are
importable and this module re-exports them. The Kilted PyPI wheels ship neither, so this module then
provides local implementations with the same API shape (only the subset the node uses). The node
imports ``Subscriber``, ``TimeSynchronizer``, ``ApproximateTimeSynchronizer`` (in
:mod:`~rnnpose_ros.ros.inputs`) and ``TransformBroadcaster`` from here and has a single code path
either way. ``IMPLEMENTATION`` says which one is in use.

Local synchroniser semantics (as message_filters' Python synchronisers): every input keeps at most
``queue_size`` messages keyed by ``header.stamp`` (the oldest is dropped first); a set is emitted when
every input holds a message within ``slop`` seconds of the newly arrived one and the set's spread
(newest − oldest stamp) is at most ``slop`` — with ``slop = 0`` (TimeSynchronizer) that means
identical stamps. After a set is emitted, each input forgets that message and everything older.

Local broadcaster: publishes ``tf2_msgs/TFMessage`` on ``/tf`` with the QoS of tf2_ros'
``TransformBroadcaster`` (reliable, volatile, keep last 100).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from tf2_msgs.msg import TFMessage

from rnnpose_ros.ros.conversions import NANOSECONDS_PER_SECOND, stamp_nanoseconds

__all__ = [
    "IMPLEMENTATION",
    "ApproximateTimeSynchronizer",
    "Subscriber",
    "TimeSynchronizer",
    "TransformBroadcaster",
]

TF_TOPIC = "/tf"
TF_QOS = QoSProfile(
    depth=100,
    history=HistoryPolicy.KEEP_LAST,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)


class LocalSubscriber:
    """``message_filters.Subscriber`` stand-in: a subscription whose messages go to registered callbacks."""

    def __init__(
        self, node: Node, msg_type: type, topic: str, qos_profile: QoSProfile | int = 10, **kwargs: Any
    ):
        self._callbacks: list[Callable[[Any], None]] = []
        self.sub = node.create_subscription(msg_type, topic, self._signal, qos_profile, **kwargs)

    def registerCallback(self, callback: Callable[[Any], None]) -> None:  # noqa: N802 - message_filters API
        self._callbacks.append(callback)

    def _signal(self, msg: Any) -> None:
        for callback in self._callbacks:
            callback(msg)


class LocalApproximateTimeSynchronizer:
    """``message_filters.ApproximateTimeSynchronizer`` stand-in (semantics in the module docstring).

    Args:
        fs: the input filters (``Subscriber`` objects), one message type each, all with a header.
        queue_size: messages kept per input (>= 1); older ones are dropped and counted in ``dropped``.
        slop: largest stamp spread (s) of an emitted set; 0 = identical stamps.
    """

    def __init__(self, fs: Sequence[Any], queue_size: int, slop: float):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if slop < 0:
            raise ValueError(f"slop must be >= 0, got {slop}")
        self.queue_size = int(queue_size)
        self.slop_ns = round(slop * NANOSECONDS_PER_SECOND)
        self.dropped = 0
        self._queues: list[dict[int, Any]] = [{} for _ in fs]
        self._callbacks: list[Callable[..., None]] = []
        self._lock = threading.Lock()
        for index, f in enumerate(fs):
            f.registerCallback(lambda msg, index=index: self.add(msg, index))

    def registerCallback(self, callback: Callable[..., None]) -> None:  # noqa: N802 - message_filters API
        self._callbacks.append(callback)

    def add(self, msg: Any, index: int) -> None:
        """Queue ``msg`` on input ``index`` and emit the first complete set it belongs to, if any."""
        stamp = stamp_nanoseconds(msg.header.stamp)
        with self._lock:
            queue = self._queues[index]
            queue[stamp] = msg
            while len(queue) > self.queue_size:
                del queue[min(queue)]
                self.dropped += 1
            match = self._match(index, stamp)
            if match is None:
                return
            messages = [q[s] for q, s in zip(self._queues, match, strict=True)]
            for q, matched in zip(self._queues, match, strict=True):
                for s in [s for s in q if s <= matched]:
                    del q[s]
        for callback in self._callbacks:
            callback(*messages)

    def _match(self, index: int, stamp: int) -> list[int] | None:
        candidates: list[list[int]] = []
        for other, queue in enumerate(self._queues):
            if other == index:
                candidates.append([stamp])
                continue
            near = sorted((s for s in queue if abs(s - stamp) <= self.slop_ns), key=lambda s: abs(s - stamp))
            if not near:
                return None
            candidates.append(near)
        # Closest stamps first; the product is tiny (queue_size ** (inputs - 1) at most).
        for combination in itertools.product(*candidates):
            if max(combination) - min(combination) <= self.slop_ns:
                return list(combination)
        return None


class LocalTimeSynchronizer(LocalApproximateTimeSynchronizer):
    """``message_filters.TimeSynchronizer`` stand-in: sets of messages with identical stamps."""

    def __init__(self, fs: Sequence[Any], queue_size: int):
        super().__init__(fs, queue_size, slop=0.0)


class LocalTransformBroadcaster:
    """``tf2_ros.TransformBroadcaster`` stand-in: one ``TFMessage`` on ``/tf`` per ``sendTransform`` call."""

    def __init__(self, node: Node, qos: QoSProfile | int = TF_QOS):
        self.pub_tf = node.create_publisher(TFMessage, TF_TOPIC, qos)

    def sendTransform(self, transform: Any) -> None:  # noqa: N802 - tf2_ros API
        """Publish one ``TransformStamped`` or a list of them in a single message."""
        transforms = list(transform) if isinstance(transform, list | tuple) else [transform]
        self.pub_tf.publish(TFMessage(transforms=transforms))


try:
    from message_filters import ApproximateTimeSynchronizer, Subscriber, TimeSynchronizer
except ImportError:
    ApproximateTimeSynchronizer = LocalApproximateTimeSynchronizer  # type: ignore[misc,assignment]
    Subscriber = LocalSubscriber  # type: ignore[misc,assignment]
    TimeSynchronizer = LocalTimeSynchronizer  # type: ignore[misc,assignment]
    _SYNC = "local"
else:
    _SYNC = "message_filters"

try:
    from tf2_ros import TransformBroadcaster
except ImportError:
    TransformBroadcaster = LocalTransformBroadcaster  # type: ignore[misc,assignment]
    _TF = "local"
else:
    _TF = "tf2_ros"

IMPLEMENTATION = {"synchronizer": _SYNC, "tf_broadcaster": _TF}
