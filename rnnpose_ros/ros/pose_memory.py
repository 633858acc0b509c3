"""The last published pose of each instance, the reference that keeps a symmetric object's TF steady.

A symmetric object looks the same in several poses, and a detector may return any of them from one
frame to the next. The engine returns, among the equivalent refined poses, the one nearest to a
reference (:attr:`~rnnpose_ros.core.refiner.Instance.reference`); this memory gives it the pose the node
published for the same instance id in the previous frame, so the TF frame of the instance stays
continuous instead of jumping by a symmetry transform. A memory older than ``max_age_s`` (of image
time) or from a later stamp (a bag replayed from the start) is forgotten: the detector's pose is the
reference again.

Threading: used by the node's worker thread only.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

#: Image-time gap after which a remembered pose no longer says where the object is, seconds.
DEFAULT_MAX_AGE_S = 2.0


class PoseMemory:
    """instance id -> (stamp, (4, 4) pose) of the last published refined pose.

    Args:
        max_age_s: a pose older than this (image stamps, seconds) is not used as a reference.
    """

    def __init__(self, max_age_s: float = DEFAULT_MAX_AGE_S):
        self.max_age_ns = round(max_age_s * 1e9)
        self._poses: dict[str, tuple[int, np.ndarray]] = {}

    def references(self, stamp_ns: int) -> dict[str, np.ndarray]:
        """The remembered poses usable as references for a frame stamped ``stamp_ns`` (nanoseconds)."""
        return {
            instance_id: pose
            for instance_id, (stamp, pose) in self._poses.items()
            if 0 < stamp_ns - stamp <= self.max_age_ns
        }

    def update(self, stamp_ns: int, published: Iterable[tuple[str, np.ndarray]]) -> None:
        """Remember the refined (4, 4) poses published for a frame stamped ``stamp_ns``; forget the
        instances too old to be references (and all of them when time went backwards)."""
        if any(stamp > stamp_ns for stamp, _ in self._poses.values()):
            self._poses.clear()
        for instance_id, pose in published:
            self._poses[instance_id] = (stamp_ns, np.array(pose, dtype=np.float64))
        self._poses = {k: v for k, v in self._poses.items() if stamp_ns - v[0] <= self.max_age_ns}
