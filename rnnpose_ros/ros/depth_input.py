"""The optional depth input: each synchronised frame gets the depth image of its stamp.

Depth is not a fourth input of the synchroniser: a synchroniser never emits a set that lacks one
message, so a depth stream that stalls (or never starts) would silently stop every refinement.
Instead :class:`DepthPairing` sits between the synchroniser and the frame queue: it keeps the newest
depth images by stamp and gives each synchronised :class:`~rnnpose_ros.ros.inputs.Frame` the one
whose stamp is within ``sync_slop`` of the image's (the nearest; identical stamps with ``sync_slop``
0). A frame whose depth image has not arrived yet waits for it at most ``depth_timeout`` seconds and
then goes on without depth (``Frame.depth`` None: refined RGB-only, warned about and counted by the
node). Frames leave in the order they came, so a waiting frame holds later ones back (at most
``depth_timeout``) and the worker still sees frames in stamp order.

Threading: every method runs in the executor thread (subscription, synchroniser and timer callbacks)
and never blocks; a lock makes them safe under a multi-threaded executor too. ``emit`` is called
outside the lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from rnnpose_ros.ros.conversions import NANOSECONDS_PER_SECOND, stamp_nanoseconds

if TYPE_CHECKING:
    from sensor_msgs.msg import Image

    from rnnpose_ros.ros.inputs import Frame

#: How often (s) the node's timer lets frames whose wait is over go on without depth.
RELEASE_PERIOD_S = 0.02


class DepthPairing:
    """Pairs synchronised frames with depth images by stamp (module docstring).

    Args:
        emit: called with every frame once it has its depth image or stopped waiting for it.
        capacity: depth images kept (the newest), and frames waiting at most (beyond that the oldest
            waiting frame goes on without depth).
        slop_s: largest stamp difference (s) between a frame's image and its depth image.
        timeout_s: longest wait (s) for a frame's depth image, counted from when the frame was queued
            (``Frame.queued``); 0 = use a depth image only if it is already here.
        clock: ``time.monotonic`` or a stand-in (the clock of ``Frame.queued``).
    """

    def __init__(
        self,
        emit: Callable[[Frame], None],
        capacity: int,
        slop_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._emit = emit
        self.capacity = max(int(capacity), 1)
        self._slop_ns = round(slop_s * NANOSECONDS_PER_SECOND)
        self._timeout_s = timeout_s
        self._clock = clock
        self._depth: dict[int, Image] = {}
        self._waiting: deque[Frame] = deque()
        self._lock = threading.Lock()

    def add_depth(self, msg: Image) -> None:
        """Keep a depth image (the oldest kept one is forgotten beyond ``capacity``); frames waiting for
        it go on."""
        with self._lock:
            self._depth[stamp_nanoseconds(msg.header.stamp)] = msg
            while len(self._depth) > self.capacity:
                del self._depth[min(self._depth)]
            self._waiting = deque(
                frame if frame.depth is not None else replace(frame, depth=self._match(frame))
                for frame in self._waiting
            )
            ready = self._take_ready()
        self._send(ready)

    def add_frame(self, frame: Frame) -> None:
        """A synchronised frame: with its depth image at once if it is here, else after waiting."""
        with self._lock:
            self._waiting.append(replace(frame, depth=self._match(frame)))
            ready = self._take_ready()
        self._send(ready)

    def release(self) -> None:
        """Let frames whose wait is over go on (without depth); the node's timer calls this."""
        with self._lock:
            ready = self._take_ready()
        self._send(ready)

    def _match(self, frame: Frame) -> Image | None:
        """The kept depth image nearest to the frame's image stamp within the slop, or None."""
        stamp = stamp_nanoseconds(frame.image.header.stamp)
        near = [s for s in self._depth if abs(s - stamp) <= self._slop_ns]
        return self._depth[min(near, key=lambda s: abs(s - stamp))] if near else None

    def _take_ready(self) -> list[Frame]:
        """Frames at the head of the wait that have their depth, waited long enough, or overflow."""
        now = self._clock()
        ready = []
        while self._waiting and (
            self._waiting[0].depth is not None
            or now - self._waiting[0].queued >= self._timeout_s
            or len(self._waiting) > self.capacity
        ):
            ready.append(self._waiting.popleft())
        return ready

    def _send(self, frames: list[Frame]) -> None:
        for frame in frames:
            self._emit(frame)

    def __len__(self) -> int:
        """Frames waiting for their depth image."""
        with self._lock:
            return len(self._waiting)
