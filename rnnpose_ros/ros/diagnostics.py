"""The refiner node's bookkeeping: counters, per-stage latency, throttled warnings, ``/diagnostics``.

:class:`Diagnostics` attaches to a node: it publishes one ``diagnostic_msgs/DiagnosticArray`` every
``diagnostics_period`` seconds (status ``<node name>: refinement``, hardware id = the device) with the
counters of :class:`Statistics` since start, the input/output rates and latency of the last period,
and a summary that says what is wrong: inputs that do not synchronise, detections arriving without
images (images larger than the transport's limit are dropped by DDS without a trace), frames refined
without their depth image (``use_depth``), or another node of the same name answering every frame
too. Warnings go through it so that each reason is logged at most once per ``WARN_THROTTLE_S``
seconds.

Threading: the input callbacks (executor thread) and the worker thread record into one
:class:`Statistics` under its lock; the timer callback (executor thread) reads and resets the
period's samples under the same lock.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

from rnnpose_ros.ros import compat
from rnnpose_ros.ros.conversions import stamp_text
from rnnpose_ros.ros.inputs import DEPTH, INPUTS, Frame, FrameQueue
from rnnpose_ros.ros.parameters import Settings

WARN_THROTTLE_S = 5.0
LATENCY_STAGES = ("queue", "convert", "refine", "publish", "total")
# Seconds of inputs without a single synchronised set before the node says why nothing comes out.
SYNC_HINT_AFTER_S = 3.0


@dataclass
class Statistics:
    """Counters since start and samples of the current diagnostics period (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    received: dict[str, int] = field(default_factory=lambda: {topic.name: 0 for topic in INPUTS})
    synchronised: int = 0
    processed: int = 0
    dropped: int = 0
    detections_refined: int = 0
    detections_failed: int = 0
    detections_over_limit: int = 0
    frame_errors: int = 0
    depth: dict[str, int] = field(default_factory=dict)
    period_without_depth: int = 0
    period_synchronised: int = 0
    period_processed: int = 0
    period_dropped: int = 0
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in LATENCY_STAGES})
    incompatible_qos: dict[str, int] = field(default_factory=dict)
    last_problem: str = ""
    last_depth_problem: str = ""
    first_input: float | None = None
    received_at_last_period: dict[str, int] = field(default_factory=dict)


class Throttle:
    """Per-key rate limit for warnings: each reason is logged at most once per ``period`` seconds."""

    def __init__(self, period: float):
        self.period = period
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self.period:
                return False
            self._last[key] = now
            return True


class Diagnostics:
    """Statistics, throttled warnings and the ``/diagnostics`` publisher of a refiner node (module
    docstring). Implements :class:`~rnnpose_ros.ros.inputs.InputMonitor`.

    Args:
        node: the node to publish, log and run the timer with.
        settings: reads ``diagnostics_period`` once, ``backend`` and ``device`` at every publication.
        queue: the frame queue whose length and capacity are reported.
        warmed_up: set once the warm-up is over ("warming up" is reported until then).
        active: whether the node is subscribed (a lifecycle node that is not active says so).
    """

    def __init__(
        self,
        node: Node,
        settings: Settings,
        queue: FrameQueue,
        warmed_up: threading.Event,
        active: Callable[[], bool] = lambda: True,
    ):
        self.stats = Statistics()
        if settings.use_depth:
            self.stats.received[DEPTH.name] = 0
        self._node = node
        self._settings = settings
        self._queue = queue
        self._warmed_up = warmed_up
        self._active = active
        self._throttle = Throttle(WARN_THROTTLE_S)
        self._publisher = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._period_start = time.monotonic()
        self._providers: list[Callable[[], dict[str, str]]] = []
        self._timer = node.create_timer(settings.diagnostics_period, self.publish)

    def close(self) -> None:
        """Stop publishing: destroy the timer and the publisher (lifecycle cleanup)."""
        self._node.destroy_timer(self._timer)
        self._node.destroy_publisher(self._publisher)

    def add_values(self, provider: Callable[[], dict[str, str]]) -> None:
        """Add ``provider()``'s key/values to every status (called in the timer, executor thread)."""
        self._providers.append(provider)

    def warn(self, key: str, text: str) -> None:
        """Log ``text`` as a warning unless reason ``key`` was logged in the last ``WARN_THROTTLE_S``."""
        if self._throttle.allow(key):
            self._node.get_logger().warning(text)

    # --- recording ----------------------------------------------------------------------------------

    def count_input(self, topic: str) -> None:
        with self.stats.lock:
            self.stats.received[topic] += 1
            if self.stats.first_input is None:
                self.stats.first_input = time.monotonic()

    def incompatible_qos(self, topic: str, publishers: int, text: str) -> None:
        with self.stats.lock:
            self.stats.incompatible_qos[topic] = publishers
            self.stats.last_problem = text
        self.warn(f"qos:{topic}", text)

    def frame_queued(self, dropped: Frame | None) -> None:
        """One synchronised frame was queued; ``dropped`` is the frame that made room for it, if any."""
        with self.stats.lock:
            self.stats.synchronised += 1
            self.stats.period_synchronised += 1
            if dropped is not None:
                self.stats.dropped += 1
                self.stats.period_dropped += 1
                total = self.stats.dropped
        if dropped is not None:
            self.warn(
                "dropped",
                f"refinement cannot keep up: dropped the oldest pending frame (stamp "
                f"{stamp_text(dropped.image.header.stamp)}; {total} dropped so far, max_pending_frames = "
                f"{self._queue.capacity})",
            )

    def frame_processed(
        self,
        latency_s: Mapping[str, float],
        refined: int,
        failed: int,
        problem: str | None,
        over_limit: int = 0,
        depth: str | None = None,
    ) -> None:
        """One frame published: seconds per stage of :data:`LATENCY_STAGES`, detections refined and not
        refined (of which ``over_limit`` beyond ``max_detections_per_frame``), why the whole frame
        was not refined (or None), and with ``use_depth`` whether it was refined with its depth
        (``"used"``) or why not (:attr:`~rnnpose_ros.ros.frame_processor.FrameOutcome.depth_status`)."""
        with self.stats.lock:
            self.stats.processed += 1
            self.stats.period_processed += 1
            self.stats.detections_refined += refined
            self.stats.detections_failed += failed
            self.stats.detections_over_limit += over_limit
            for stage in LATENCY_STAGES:
                self.stats.latency_ms[stage].append(latency_s[stage] * 1000.0)
            if problem is not None:
                self.stats.frame_errors += 1
                self.stats.last_problem = problem
            if depth is not None:
                self.stats.depth[depth] = self.stats.depth.get(depth, 0) + 1
                if depth != "used":
                    self.stats.period_without_depth += 1
                    self.stats.last_depth_problem = depth

    def frame_failed(self, problem: str) -> None:
        """A frame could not be processed at all (an internal error)."""
        with self.stats.lock:
            self.stats.frame_errors += 1
            self.stats.last_problem = problem

    def duplicates(self) -> int:
        """Other nodes in the domain with this node's name and namespace (the ROS graph as discovered)."""
        return duplicate_nodes(self._node)

    # --- publishing ---------------------------------------------------------------------------------

    def publish(self) -> None:
        """Publish the status of the period since the last call and start a new period."""
        now = time.monotonic()
        period = max(now - self._period_start, 1e-6)
        self._period_start = now
        s = self.stats
        with s.lock:
            values = {
                "backend": self._settings.backend,
                "device": self._settings.device,
                "synchronizer": compat.IMPLEMENTATION["synchronizer"],
                "input_rate_hz": f"{s.period_synchronised / period:.2f}",
                "output_rate_hz": f"{s.period_processed / period:.2f}",
                "queue_length": str(len(self._queue)),
                "queue_capacity": str(self._queue.capacity),
                "frames_synchronised": str(s.synchronised),
                "frames_processed": str(s.processed),
                "frames_dropped": str(s.dropped),
                "frames_not_refined": str(s.frame_errors),
                "detections_refined": str(s.detections_refined),
                "detections_failed": str(s.detections_failed),
                "detections_over_limit": str(s.detections_over_limit),
            }
            if self._settings.use_depth:
                values["frames_with_depth"] = str(s.depth.get("used", 0))
                values["frames_without_depth"] = str(sum(n for k, n in s.depth.items() if k != "used"))
                for reason, count in sorted(s.depth.items()):
                    if reason != "used":
                        values[f"frames_without_depth_{reason}"] = str(count)
            for topic, count in s.received.items():
                values[f"received_{topic}"] = str(count)
            for topic, count in s.incompatible_qos.items():
                values[f"incompatible_qos_publishers_{topic}"] = str(count)
            for stage, samples in s.latency_ms.items():
                if samples:
                    values[f"latency_{stage}_ms_mean"] = f"{float(np.mean(samples)):.1f}"
                    values[f"latency_{stage}_ms_max"] = f"{float(np.max(samples)):.1f}"
                samples.clear()
            dropped_now, synced_total = s.period_dropped, s.synchronised
            waiting = (
                s.first_input is not None and synced_total == 0 and now - s.first_input > SYNC_HINT_AFTER_S
            )
            received = dict(s.received)
            arrived = {
                topic: count - s.received_at_last_period.get(topic, 0) for topic, count in received.items()
            }
            s.received_at_last_period = received
            without_depth, depth_problem = s.period_without_depth, s.last_depth_problem
            s.period_synchronised = s.period_processed = s.period_dropped = s.period_without_depth = 0
            if s.last_problem:
                values["last_problem"] = s.last_problem
        for provider in self._providers:
            values.update(provider())
        level, summary = DiagnosticStatus.OK, "refining"
        duplicates = self.duplicates()
        if duplicates > 0:
            level = DiagnosticStatus.ERROR
            summary = (
                f"{duplicates} other node(s) named {self._node.get_fully_qualified_name()} run in this "
                "domain: every frame is answered (and every TF frame sent) more than once; "
                "stop one or rename it"
            )
            if self._throttle.allow("duplicate-node"):
                self._node.get_logger().error(summary)
        elif arrived.get("detections", 0) > 0 and arrived.get("image", 0) == 0:
            level = DiagnosticStatus.WARN
            summary = (
                f"{arrived['detections']} detections but no image arrived in the last {period:.1f} s: "
                "the camera stopped, or its images exceed the transport's limit (DDS drops them without "
                "a trace; the project's Fast DDS profile takes up to 64 MiB per message)"
            )
            self.warn("no-images", summary)
        elif dropped_now:
            level, summary = DiagnosticStatus.WARN, f"dropped {dropped_now} frames in the last {period:.1f} s"
        elif waiting:
            level = DiagnosticStatus.WARN
            summary = (
                f"inputs arrive ({received}) but no image, camera_info and detections share a stamp: "
                "check the detector keeps the image header, or set sync_slop"
            )
            self.warn("no-sync", summary)
        elif not self._active():
            summary = "inactive (lifecycle): not subscribed, nothing is refined until it is activated"
        elif without_depth:
            level = DiagnosticStatus.WARN
            summary = (
                f"{without_depth} frames refined without depth in the last {period:.1f} s (last reason: "
                f"{depth_problem}; see the log)"
            )
        elif not self._warmed_up.is_set():
            summary = "warming up (frames are queued meanwhile)"
        elif synced_total == 0:
            summary = "waiting for image, camera_info and detections"
        status = DiagnosticStatus(
            level=level,
            name=f"{self._node.get_name()}: refinement",
            message=summary,
            hardware_id=self._settings.device,
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self._node.get_clock().now().to_msg()
        self._publisher.publish(array)


def duplicate_nodes(node: Node) -> int:
    """Other nodes in the domain with ``node``'s name and namespace (the ROS graph as discovered)."""
    me = (node.get_name(), node.get_namespace())
    return sum(1 for entry in node.get_node_names_and_namespaces() if tuple(entry) == me) - 1
