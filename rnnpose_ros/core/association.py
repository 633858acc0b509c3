"""Stable instance ids: which detection of a frame is which physical object of the previous frames.

A detector without a tracker numbers the instances of a class in whatever order it finds them, so
``duck_0`` and ``duck_1`` may swap between two frames. :class:`InstanceIds` keeps, per id, the last
known pose of the instance and gives every new set of instances the ids of the remembered instances
they are closest to. The rule:

1. A detector-supplied id wins: an instance that carries one keeps it (``<class_id>_<id>``, unique
   within the frame), whatever the poses say.
2. The other instances of a class are matched to the remembered ids of that class that no instance of
   this frame claimed by (1), by minimum total :func:`pose_distance` (Hungarian assignment); a pair
   farther apart than ``gate`` diameters is not a match.
3. An instance left without a match gets the lowest free index of its class, ``<class_id>_<k>``
   (k = 0, 1, …; an index is free when no remembered or present instance holds it).
4. A remembered id that is matched by no instance for ``forget_after`` consecutive frames is
   forgotten (its index becomes free again).

The distance between two poses of one object (:func:`pose_distance`) is the distance between the
posed model centres in object diameters, with the component along the line of sight weighted by
``DEPTH_WEIGHT``: a monocular detector's depth is its least accurate coordinate (the standard
detection noise has a 5 cm depth σ against 1 cm across), while two instances side by side differ
across the line of sight.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

#: Weight of the line-of-sight component of a centre offset in :func:`pose_distance`.
DEPTH_WEIGHT = 0.25


def pose_distance(center: np.ndarray, diameter: float, pose_a: np.ndarray, pose_b: np.ndarray) -> float:
    """Distance between two (4, 4) model→camera poses (metres) of one object, in object diameters.

    Args:
        center: (3,) model-frame centre of the object, metres.
        diameter: object diameter, metres (> 0).
        pose_a, pose_b: (4, 4) float64 poses in the camera frame.

    Returns:
        ‖offset‖ / diameter where the offset of the posed centres is split into its component along
        the line of sight to ``pose_a``'s centre (weighted by :data:`DEPTH_WEIGHT`) and the rest.
    """
    a = pose_a[:3, :3] @ center + pose_a[:3, 3]
    b = pose_b[:3, :3] @ center + pose_b[:3, 3]
    offset = b - a
    sight = a / max(float(np.linalg.norm(a)), 1e-9)
    along = float(offset @ sight)
    across = offset - along * sight
    return float(np.hypot(np.linalg.norm(across), DEPTH_WEIGHT * along) / diameter)


@dataclass
class Candidate:
    """One instance to name.

    Attributes:
        class_id: registry class of the instance.
        pose: (4, 4) float64 model→camera pose, metres.
        given_id: the detector's id ("" when it gives none).
    """

    class_id: str
    pose: np.ndarray
    given_id: str = ""


@dataclass
class _Remembered:
    class_id: str
    pose: np.ndarray
    missed: int = 0


class InstanceIds:
    """Per-class instance ids that stay with the physical instance across frames (module docstring).

    Args:
        geometry: class id → (model-frame centre (3,), diameter) in metres, for :func:`pose_distance`;
            a class missing from it is matched by id only (every instance gets a new index).
        gate: largest :func:`pose_distance` (diameters) of a match.
        forget_after: frames an id may go unmatched before it is forgotten (≥ 1).
    """

    def __init__(
        self, geometry: dict[str, tuple[np.ndarray, float]], gate: float = 1.0, forget_after: int = 30
    ) -> None:
        if gate <= 0 or forget_after < 1:
            raise ValueError(f"gate must be > 0 and forget_after ≥ 1, got {gate}, {forget_after}")
        self.geometry = geometry
        self.gate = gate
        self.forget_after = forget_after
        self._known: dict[str, _Remembered] = {}

    @staticmethod
    def geometry_of(registry: Iterable[Any]) -> dict[str, tuple[np.ndarray, float]]:
        """``geometry`` of the models of ``registry`` (objects with class_id, center, diameter)."""
        return {m.class_id: (m.center, m.diameter) for m in registry}

    @property
    def known(self) -> dict[str, str]:
        """Remembered id → class id."""
        return {name: entry.class_id for name, entry in self._known.items()}

    def assign(self, candidates: Sequence[Candidate]) -> list[str]:
        """Ids for ``candidates`` (one per candidate, unique, in input order); does not change the
        memory (call :meth:`observe` with the ids and final poses)."""
        names: list[str | None] = [None] * len(candidates)
        used: set[str] = set()
        for i, candidate in enumerate(candidates):
            if candidate.given_id:
                names[i] = _unique(
                    _frame_safe(f"{candidate.class_id or 'unknown'}_{candidate.given_id}"), used
                )
        for class_id in dict.fromkeys(c.class_id for c in candidates):
            open_rows = [i for i, c in enumerate(candidates) if names[i] is None and c.class_id == class_id]
            free = [n for n, e in self._known.items() if e.class_id == class_id and n not in used]
            for row, name in self._match(class_id, [candidates[i].pose for i in open_rows], free):
                names[open_rows[row]] = name
                used.add(name)
        for i, candidate in enumerate(candidates):
            if names[i] is None:
                names[i] = self._new_name(candidate.class_id, used)
                used.add(names[i])
        return [name for name in names if name is not None]

    def observe(self, names: Sequence[str], class_ids: Sequence[str], poses: Sequence[np.ndarray]) -> None:
        """Remember the poses of this frame's instances; ids not among ``names`` age by one frame."""
        seen = set(names)
        for name in list(self._known):
            if name not in seen:
                self._known[name].missed += 1
                if self._known[name].missed >= self.forget_after:
                    del self._known[name]
        for name, class_id, pose in zip(names, class_ids, poses, strict=True):
            self._known[name] = _Remembered(class_id, np.array(pose, dtype=np.float64))

    def forget(self, name: str) -> None:
        """Drop ``name`` from the memory (its index becomes free)."""
        self._known.pop(name, None)

    def _match(self, class_id: str, poses: list[np.ndarray], names: list[str]) -> list[tuple[int, str]]:
        """(row in ``poses``, remembered name) pairs of minimum total distance within the gate."""
        if not poses or not names or class_id not in self.geometry:
            return []
        center, diameter = self.geometry[class_id]
        cost = np.array(
            [[pose_distance(center, diameter, self._known[n].pose, pose) for n in names] for pose in poses]
        )
        # Gated pairs get a cost no in-gate assignment can reach, then are dropped.
        rows, cols = linear_sum_assignment(np.where(cost <= self.gate, cost, 1e6))
        return [(int(r), names[c]) for r, c in zip(rows, cols, strict=True) if cost[r, c] <= self.gate]

    def _new_name(self, class_id: str, used: set[str]) -> str:
        base = _frame_safe(class_id or "unknown")
        k = 0
        while f"{base}_{k}" in used or f"{base}_{k}" in self._known:
            k += 1
        return f"{base}_{k}"


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``name_<n>`` for the first n that is not in ``used``; added to ``used``."""
    unique, n = name, 1
    while unique in used:
        unique = f"{name}_{n}"
        n += 1
    used.add(unique)
    return unique


def _frame_safe(name: str) -> str:
    """``name`` with every character outside ASCII letters, digits, ``_``, ``-`` and ``.`` replaced by
    ``_`` (the id is a TF frame name)."""
    return "".join(c if (c.isascii() and c.isalnum()) or c in "_-." else "_" for c in name)
