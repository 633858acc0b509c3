"""Instance identity in the node: stable ids in ``detect`` mode, the tracker in ``track`` mode.

:class:`NodeTracking` attaches to the refiner node (like ``tf2_ros``' helpers: construct it with the
node's pieces, call it from the node's worker):

- ``mode: detect`` — :meth:`NodeTracking.name_detections` renames the detections of a processed frame
  that carry no detector id, so that ``<class_id>_<k>`` stays with the physical instance across frames
  (:class:`~rnnpose_ros.core.association.InstanceIds`, rule in its module docstring; the pose used is
  the refined one, or the input one for a detection that was not refined).
- ``mode: track`` — image + camera_info sets drive the output; detections messages arrive on their
  own (:meth:`NodeTracking.on_detections`, executor thread) and wait in a :class:`DetectionInbox`.
  For every image, :meth:`NodeTracking.track` takes the waiting detections message whose stamp is
  nearest to the image's, within ``detection_tolerance`` (older ones are dropped with a warning: their
  image has passed), and advances the :class:`~rnnpose_ros.core.tracker.Tracker` with it. The output
  is one detection per live track (``id`` = track id, also the TF frame name), in the same
  :class:`~rnnpose_ros.ros.frame_processor.FrameOutcome` form as ``detect`` mode, so TF, markers and
  the debug image are published by the same code. Lost tracks are logged and counted.

Threading: :meth:`NodeTracking.on_detections` runs in the executor thread and only queues; everything
else runs in the worker thread; :meth:`NodeTracking.values` (``/diagnostics`` timer, executor thread)
reads counters under a lock.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from rclpy.node import Node
from vision_msgs.msg import Detection3D, Detection3DArray

from rnnpose_ros.core.association import Candidate, InstanceIds
from rnnpose_ros.core.observation import InputError, Observation
from rnnpose_ros.ros.conversions import (
    ConversionError,
    DetectionInput,
    DetectionOutput,
    detection_array,
    image_to_rgb,
    intrinsics_from_camera_info,
    parse_detections,
    stamp_text,
)
from rnnpose_ros.ros.frame_processor import FrameOutcome, check_frame
from rnnpose_ros.ros.inputs import Frame
from rnnpose_ros.ros.parameters import Settings


def stamp_seconds(stamp: Any) -> float:
    """A ``builtin_interfaces/Time`` as float seconds."""
    return float(stamp.sec) + 1e-9 * float(stamp.nanosec)


class DetectionInbox:
    """Detections messages waiting for the image they seed (bounded; the oldest is dropped when full).

    Args:
        capacity: messages kept at most.
    """

    def __init__(self, capacity: int) -> None:
        self._messages: deque[Detection3DArray] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def put(self, message: Detection3DArray) -> None:
        """Executor thread: keep ``message`` (never blocks)."""
        with self._lock:
            self._messages.append(message)

    def take(self, stamp: float, tolerance: float) -> tuple[Detection3DArray | None, list[Detection3DArray]]:
        """For an image stamped ``stamp`` (seconds): the waiting message nearest to it within
        ``tolerance`` seconds (removed), and the messages too old for it (removed: no later image is
        nearer to them). Messages newer than ``stamp + tolerance`` wait for a later image."""
        with self._lock:
            stale = [m for m in self._messages if stamp_seconds(m.header.stamp) < stamp - tolerance]
            near = [m for m in self._messages if abs(stamp_seconds(m.header.stamp) - stamp) <= tolerance]
            chosen = min(near, key=lambda m: abs(stamp_seconds(m.header.stamp) - stamp), default=None)
            # Messages at or before the chosen one are consumed with it.
            keep = [
                m
                for m in self._messages
                if m not in stale
                and m is not chosen
                and (chosen is None or stamp_seconds(m.header.stamp) > stamp_seconds(chosen.header.stamp))
            ]
            self._messages.clear()
            self._messages.extend(keep)
        return chosen, stale

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)


class NodeTracking:
    """Stable ids (detect mode) and the tracker (track mode) of a refiner node (module docstring).

    Args:
        node: the node (its logger).
        settings: reads ``mode``, ``track_iterations``, ``track_lost_below_score``,
            ``track_lost_after_frames``, ``detection_tolerance``, ``queue_size`` (inbox capacity).
        refiner: the engine (:class:`~rnnpose_ros.core.refiner.Refiner`; in track mode its
            ``with_config`` and ``config`` build the tracking refiner).
        registry: the object registry.
        warn: ``warn(key, text)``, the node's throttled warning.
    """

    def __init__(
        self,
        node: Node,
        settings: Settings,
        refiner: Any,
        registry: Any,
        warn: Callable[[str, str], None],
    ) -> None:
        self._node = node
        self._settings = settings
        self._registry = registry
        self._warn = warn
        self._lock = threading.Lock()
        self.lost_total = 0
        self._live = 0
        self._latency_ms: list[float] = []
        self.ids = InstanceIds(InstanceIds.geometry_of(registry))
        self.tracker: Any = None
        self.inbox = DetectionInbox(settings.queue_size)
        if settings.mode == "track":
            from rnnpose_ros.core.tracker import Tracker, TrackerConfig  # heavy (torch): after start-up

            self.tracker = Tracker(
                refiner,
                TrackerConfig(
                    outer_iterations=settings.track_iterations,
                    lost_below_score=settings.track_lost_below_score,
                    lost_after_frames=settings.track_lost_after_frames,
                ),
            )

    def use_registry(self, registry: Any) -> None:
        """Worker thread: name and track with ``registry`` from now on (objects changed at run time)."""
        self._registry = registry
        self.ids.geometry = InstanceIds.geometry_of(registry)
        if self.tracker is not None:
            self.tracker.use_registry(registry)

    @property
    def tracking(self) -> bool:
        """True in track mode."""
        return self.tracker is not None

    # --- detect mode -----------------------------------------------------------------------------------

    def name_detections(self, frame: Frame, outcome: FrameOutcome) -> None:
        """Give the detections of ``outcome`` without a detector id their stable ``<class_id>_<k>`` id
        (in place) and remember their poses for the next frame."""
        items = [
            (item, output)
            for item, output in zip(outcome.detections, outcome.outputs, strict=True)
            if item.class_id and (output.pose is not None or item.pose is not None)
        ]
        candidates = [
            Candidate(
                item.class_id,
                output.pose if output.pose is not None else item.pose,
                frame.detections.detections[item.index].id,
            )
            for item, output in items
        ]
        names = self.ids.assign(candidates)
        for (item, _), name in zip(items, names, strict=True):
            item.instance_id = name
        # A detection without class or pose (passed through, no TF frame) keeps its per-frame id,
        # suffixed with its input index where that id is now a stable one's.
        named = {id(item) for item, _ in items}
        for item in outcome.detections:
            if id(item) not in named and item.instance_id in names:
                item.instance_id = f"{item.instance_id}_{item.index}"
        self.ids.observe(names, [c.class_id for c in candidates], [c.pose for c in candidates])

    # --- track mode ------------------------------------------------------------------------------------

    def on_detections(self, message: Detection3DArray) -> None:
        """Executor thread: a detections message for a later :meth:`track` call."""
        self.inbox.put(message)

    def track(self, frame: Frame, stop: Callable[[], bool] | None) -> tuple[FrameOutcome, Detection3DArray]:
        """Advance the tracker to ``frame``'s image with the detections that match it; returns the
        outcome (one item per live track) and the ``~/detections`` message. Never raises for bad
        input; :class:`~rnnpose_ros.core.refiner.RefinementCancelledError` passes through."""
        from rnnpose_ros.core.refiner import RefinementCancelledError  # heavy (torch): not at start-up
        from rnnpose_ros.core.tracker import Seed

        start = time.monotonic()
        header = frame.image.header
        stamp = stamp_seconds(header.stamp)
        message, stale = self.inbox.take(stamp, self._settings.detection_tolerance)
        if stale:
            self._warn(
                "stale-detections",
                f"{len(stale)} detections message(s) stamped before the image {stamp_text(header.stamp)} by "
                f"more than detection_tolerance = {self._settings.detection_tolerance} s were dropped "
                "(their image was already processed; raise detection_tolerance for a slow detector)",
            )
        seeds: list[Seed] = []
        if message is not None:
            for item in parse_detections(message):
                if item.error is not None:
                    self._warn(
                        f"detection:{item.reason}", f"detection {item.instance_id} not used: {item.error}"
                    )
                elif item.class_id not in self._registry:
                    self._warn(
                        "unknown-class", f"detection {item.instance_id}: unknown class {item.class_id!r}"
                    )
                else:
                    seeds.append(Seed(item.class_id, item.pose, message.detections[item.index].id))
        outcome = FrameOutcome(detections=[])
        check_frame(frame, self._settings, outcome)
        if outcome.problem is not None:
            # The tracks are kept for the next usable image; this one is answered with no detection.
            outcome.warn(
                f"frame:{outcome.problem_key}",
                f"image {stamp_text(header.stamp)} not tracked: {outcome.problem}",
            )
            return self._finish(outcome, header, start)
        try:
            observation = Observation(
                image_to_rgb(frame.image),
                intrinsics_from_camera_info(frame.camera_info),
                stamp=stamp,
            )
        except ConversionError as error:
            outcome.fail(type(error).__name__, str(error))
            outcome.warn(
                f"frame:{outcome.problem_key}", f"image {stamp_text(header.stamp)} not tracked: {error}"
            )
            return self._finish(outcome, header, start)
        converted = time.monotonic()
        try:
            update = self.tracker.update(observation, seeds, stop=stop)
        except InputError as error:
            outcome.fail("engine-input", f"engine rejected the input: {error}")
            outcome.warn("frame:engine-input", f"image {stamp_text(header.stamp)} not tracked: {error}")
            return self._finish(outcome, header, start)
        except RefinementCancelledError:
            raise
        except Exception as error:  # the tracks are unchanged (the tracker updates after the engine)
            outcome.engine_failure = f"engine failed: {error}\n{traceback.format_exc()}"
            outcome.fail("engine-failure", f"engine failed: {type(error).__name__}: {error}")
            return self._finish(outcome, header, start)
        outcome.observation = observation
        for track in update.lost:
            self._node.get_logger().info(
                f"track {track.track_id} lost (score {track.score:.2f} for {track.weak_frames} images)"
            )
        for index, track in enumerate(update.tracks):
            model = self._registry[track.class_id]
            outcome.detections.append(DetectionInput(index, track.class_id, track.track_id, track.pose))
            outcome.outputs.append(DetectionOutput(track.pose, track.score, model.extents, model.center))
        outcome.convert_s, outcome.refine_s = converted - start, time.monotonic() - converted
        with self._lock:
            self._live = len(update.tracks)
            self.lost_total += len(update.lost)
            self._latency_ms.append(update.seconds * 1000.0)
        return self._finish(outcome, header, start)

    def _finish(
        self, outcome: FrameOutcome, header: Any, start: float
    ) -> tuple[FrameOutcome, Detection3DArray]:
        if not outcome.convert_s:
            outcome.convert_s = time.monotonic() - start
        # One output per live track; detection_array takes the input message a detection came from,
        # which a track does not have: an empty Detection3D stands in for it.
        source = Detection3DArray(header=header, detections=[Detection3D() for _ in outcome.detections])
        return outcome, detection_array(header, source, outcome.detections, outcome.outputs)

    def values(self) -> dict[str, str]:
        """``/diagnostics`` entries of track mode (empty in detect mode): live and lost tracks, tracking
        latency of the period (ms, mean and max; the samples are cleared)."""
        if not self.tracking:
            return {}
        with self._lock:
            values = {"tracks_live": str(self._live), "tracks_lost": str(self.lost_total)}
            if self._latency_ms:
                values["latency_track_ms_mean"] = f"{float(np.mean(self._latency_ms)):.1f}"
                values["latency_track_ms_max"] = f"{float(np.max(self._latency_ms)):.1f}"
            self._latency_ms.clear()
        return values
