"""The local time synchroniser and TF broadcaster of ``rnnpose_ros.ros.compat`` (real rclpy)."""

from __future__ import annotations

import random
import time

import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from rnnpose_ros.ros import compat  # noqa: E402
from rnnpose_ros.ros.compat import (  # noqa: E402
    LocalApproximateTimeSynchronizer,
    LocalTimeSynchronizer,
    LocalTransformBroadcaster,
)
from rnnpose_ros.ros.conversions import object_transforms, stamp_nanoseconds  # noqa: E402


class Stamped:
    """A header-carrying message stand-in for the synchroniser (any object with ``header.stamp``)."""

    def __init__(self, name: str, sec: int, nanosec: int = 0):
        self.name = name
        self.header = Header()
        self.header.stamp.sec, self.header.stamp.nanosec = sec, nanosec

    def __repr__(self) -> str:
        return f"{self.name}@{stamp_nanoseconds(self.header.stamp)}"


class Input:
    """A message_filters-style input: ``registerCallback`` + ``signal``."""

    def __init__(self) -> None:
        self.callbacks = []

    def registerCallback(self, callback) -> None:  # noqa: N802
        self.callbacks.append(callback)

    def signal(self, msg) -> None:
        for callback in self.callbacks:
            callback(msg)


def make_sync(slop: float = 0.0, queue_size: int = 10, inputs: int = 3):
    sources = [Input() for _ in range(inputs)]
    sync = (
        LocalApproximateTimeSynchronizer(sources, queue_size, slop)
        if slop
        else LocalTimeSynchronizer(sources, queue_size)
    )
    sets = []
    sync.registerCallback(lambda *msgs: sets.append([m.name for m in msgs]))
    return sources, sync, sets


def test_exact_sync_matches_identical_stamps_in_any_arrival_order() -> None:
    (image, info, dets), _, sets = make_sync()
    image.signal(Stamped("i1", 1))
    info.signal(Stamped("c1", 1))
    dets.signal(Stamped("d0", 0, 999_999_999))  # 1 ns off: never matches exactly
    assert sets == []
    dets.signal(Stamped("d1", 1))
    assert sets == [["i1", "c1", "d1"]]
    dets.signal(Stamped("d2", 2))  # detections first this time
    info.signal(Stamped("c2", 2))
    image.signal(Stamped("i2", 2))
    assert sets[-1] == ["i2", "c2", "d2"]


def test_exact_sync_forgets_older_messages_after_a_match() -> None:
    (image, info, dets), sync, sets = make_sync()
    for sec in (1, 2, 3):
        image.signal(Stamped(f"i{sec}", sec))
        info.signal(Stamped(f"c{sec}", sec))
    dets.signal(Stamped("d2", 2))
    assert sets == [["i2", "c2", "d2"]]
    dets.signal(Stamped("d1", 1))  # late detection of an image that was already passed over
    assert len(sets) == 1
    dets.signal(Stamped("d3", 3))
    assert sets[-1] == ["i3", "c3", "d3"]
    assert all(not q for q in sync._queues[:2])


def test_queue_is_bounded_and_drops_oldest() -> None:
    (image, info, dets), sync, sets = make_sync(queue_size=3)
    for sec in range(10):
        image.signal(Stamped(f"i{sec}", sec))
    assert len(sync._queues[0]) == 3 and sync.dropped == 7
    info.signal(Stamped("c0", 0))
    dets.signal(Stamped("d0", 0))
    assert sets == []  # image 0 was dropped
    info.signal(Stamped("c8", 8))
    dets.signal(Stamped("d8", 8))
    assert sets == [["i8", "c8", "d8"]]


def test_approximate_sync_respects_slop_and_prefers_closest() -> None:
    (image, info, dets), _, sets = make_sync(slop=0.05)
    image.signal(Stamped("i", 10, 0))
    info.signal(Stamped("c_far", 10, 60_000_000))  # 60 ms: outside the slop
    info.signal(Stamped("c_near", 10, 10_000_000))
    info.signal(Stamped("c_nearer", 9, 995_000_000))
    assert sets == []
    dets.signal(Stamped("d", 10, 20_000_000))
    assert sets == [["i", "c_near", "d"]]  # closest to the newly arrived message
    # the set's spread may not exceed the slop even when each pair is within it
    image.signal(Stamped("i2", 20, 0))
    info.signal(Stamped("c2", 20, 40_000_000))
    dets.signal(Stamped("d2", 19, 960_000_000))  # 40 ms before the image, 80 ms before camera_info
    assert len(sets) == 1
    dets.signal(Stamped("d3", 20, 30_000_000))
    assert sets[-1] == ["i2", "c2", "d3"]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        LocalTimeSynchronizer([Input()], 0)
    with pytest.raises(ValueError, match="slop"):
        LocalApproximateTimeSynchronizer([Input()], 1, -1.0)


def test_implementation_is_reported() -> None:
    assert set(compat.IMPLEMENTATION) == {"synchronizer", "tf_broadcaster"}
    if compat.IMPLEMENTATION["synchronizer"] == "local":
        assert compat.TimeSynchronizer is LocalTimeSynchronizer


def test_subscribers_and_broadcaster_over_dds() -> None:
    """Local Subscriber + synchroniser and the /tf broadcaster between two nodes of one process."""
    import numpy as np
    from geometry_msgs.msg import PointStamped

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=random.randint(150, 199))  # a domain of its own
    try:
        node = rclpy.create_node("compat_sync", context=context)
        peer = rclpy.create_node("compat_peer", context=context)
        a = compat.LocalSubscriber(node, PointStamped, "compat_a", qos_profile=10)
        b = compat.LocalSubscriber(node, PointStamped, "compat_b", qos_profile=10)
        sets = []
        sync = LocalTimeSynchronizer([a, b], 5)
        sync.registerCallback(lambda ma, mb: sets.append((ma.point.x, mb.point.x)))
        tf_got = []
        peer.create_subscription(TFMessage, "/tf", tf_got.append, compat.TF_QOS)
        pub_a = peer.create_publisher(PointStamped, "compat_a", 10)
        pub_b = peer.create_publisher(PointStamped, "compat_b", 10)
        broadcaster = LocalTransformBroadcaster(node)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        executor.add_node(peer)
        deadline = time.monotonic() + 10.0
        while (
            pub_a.get_subscription_count() < 1 or peer.count_publishers("/tf") < 1
        ) and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        msg = PointStamped()
        msg.header.stamp.sec = 3
        msg.point.x = 1.0
        pub_a.publish(msg)
        msg.point.x = 2.0
        pub_b.publish(msg)
        h = Header(frame_id="cam")
        h.stamp.sec = 3
        broadcaster.sendTransform(object_transforms(h, [("a", np.eye(4)), ("b", np.eye(4))]))
        while (not sets or not tf_got) and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        assert sets == [(1.0, 2.0)]
        assert [t.child_frame_id for t in tf_got[0].transforms] == ["a", "b"]
        assert tf_got[0].transforms[0].header.stamp.sec == 3
        executor.shutdown()
        node.destroy_node()
        peer.destroy_node()
    finally:
        rclpy.shutdown(context=context)
