"""Object symmetries (BOP ``models_info.json`` style) and the choice among equivalent poses.

An object with symmetries looks the same in several poses: ``T`` and ``T·S`` for every symmetry ``S``
(a model-frame transform that maps the object, shape and texture, onto itself). Declared per object in
``objects.yaml`` with the keys of BOP's ``models_info.json``::

    symmetries_discrete:            # 4×4 model-frame transforms, 16 numbers row-major, translation in
      - [-1, 0, 0, 0,  0, -1, 0, 0,  0, 0, 1, 0,  0, 0, 0, 1]   # mesh-file units (scaled by ``scale``)
    symmetries_continuous:          # rotation by any angle about ``axis`` through ``offset``
      - {axis: [0, 0, 1], offset: [0, 0, 0]}                    # offset in mesh-file units

The identity is implied. As in BOP, the symmetry group is {D·C(θ)}: each discrete transform D (or the
identity) followed by a rotation C(θ) about each continuous axis.

Uses: :func:`closest_equivalent` returns, among the poses equivalent to a refined pose, the one
nearest in rotation to a reference (the detector's pose, or the previous frame's output), so a TF frame
never flips between equivalent poses from one frame to the next; :meth:`Symmetries.transforms` lists
the group (continuous axes sampled) for symmetry-aware errors (MSSD, MSPD, rotation error).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

#: Largest |RᵀR − I| and |det R − 1| accepted for a declared rotation (BOP files round to ~1e-6).
ORTHONORMAL_TOLERANCE = 1e-4
#: A declared symmetry must move the mesh's vertices onto the mesh: the 90th percentile of the moved
#: vertices' distance to the nearest vertex below this fraction of the diameter (coarse meshes: the
#: vertices of a 32-gon cylinder land between vertices under an arbitrary turn, ≈ 0.05·radius away;
#: a wrong symmetry moves corners and edges by a large part of the object).
SELF_MAP_TOLERANCE = 0.05
SELF_MAP_PERCENTILE = 90
#: Samples of a continuous axis for symmetry-aware errors: 360 (1° steps) moves a point on the
#: diameter's circle by at most π·d/360 ≈ 0.009·d, under BOP's 1 %.
CONTINUOUS_SAMPLES = 360
DISCRETE_KEY = "symmetries_discrete"
CONTINUOUS_KEY = "symmetries_continuous"


class SymmetryError(ValueError):
    """A symmetry declaration that cannot be used (the message names the entry and why)."""


@dataclass(frozen=True)
class ContinuousSymmetry:
    """Rotation by any angle about ``axis`` (3,) unit vector through ``offset`` (3,), metres, model frame."""

    axis: np.ndarray
    offset: np.ndarray

    def transform(self, angle: float) -> np.ndarray:
        """(4, 4) float64 model-frame rotation by ``angle`` radians about this axis."""
        R = axis_angle_matrix(self.axis, angle)
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, self.offset - R @ self.offset
        return T


@dataclass(frozen=True)
class Symmetries:
    """The symmetry group of an object (module docstring); empty = no symmetry.

    Attributes:
        discrete: (D, 4, 4) float64 model-frame transforms in metres, identity excluded.
        continuous: the continuous axes.
    """

    discrete: np.ndarray = field(default_factory=lambda: np.zeros((0, 4, 4)))
    continuous: tuple[ContinuousSymmetry, ...] = ()

    def __bool__(self) -> bool:
        return len(self.discrete) > 0 or len(self.continuous) > 0

    @functools.cached_property
    def group(self) -> np.ndarray:
        """:meth:`transforms` at the default sampling, computed once (the metrics use it per pose)."""
        return self.transforms()

    def transforms(self, samples: int = CONTINUOUS_SAMPLES) -> np.ndarray:
        """(G, 4, 4) float64 group elements, identity first: each of {I} ∪ discrete followed by each
        continuous axis sampled at ``samples`` angles (for errors minimised over the group)."""
        group = np.concatenate([np.eye(4)[None], self.discrete])
        for axis in self.continuous:
            turns = np.stack([axis.transform(2.0 * math.pi * k / samples) for k in range(samples)])
            group = (group[:, None] @ turns[None]).reshape(-1, 4, 4)
        return group

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], scale: float, where: str) -> Symmetries:
        """Parse the ``symmetries_discrete`` / ``symmetries_continuous`` keys of an ``objects.yaml`` entry
        (translations and offsets in mesh-file units, times ``scale``). Raises SymmetryError."""
        discrete = []
        raw = entry.get(DISCRETE_KEY) or []
        if not isinstance(raw, Sequence) or isinstance(raw, str):
            raise SymmetryError(f"{where}.{DISCRETE_KEY}: must be a list of 16-number transforms")
        for i, values in enumerate(raw):
            discrete.append(_discrete(values, scale, f"{where}.{DISCRETE_KEY}[{i}]"))
        continuous = []
        raw = entry.get(CONTINUOUS_KEY) or []
        if not isinstance(raw, Sequence) or isinstance(raw, str):
            raise SymmetryError(f"{where}.{CONTINUOUS_KEY}: must be a list of {{axis, offset}} mappings")
        for i, item in enumerate(raw):
            continuous.append(_continuous(item, scale, f"{where}.{CONTINUOUS_KEY}[{i}]"))
        return cls(np.stack(discrete) if discrete else np.zeros((0, 4, 4)), tuple(continuous))

    def check_maps_onto(self, vertices: np.ndarray, diameter: float) -> None:
        """Raise SymmetryError when a declared symmetry does not map the (N, 3) vertices (metres) onto
        themselves (``SELF_MAP_TOLERANCE``): a wrong axis, a missing offset, a translation in the wrong
        units."""
        points = np.asarray(vertices, dtype=np.float64)
        tree = cKDTree(points)
        checks = [(f"{DISCRETE_KEY}[{i}]", D) for i, D in enumerate(self.discrete)]
        for i, axis in enumerate(self.continuous):
            checks += [
                (f"{CONTINUOUS_KEY}[{i}] at {deg}°", axis.transform(math.radians(deg))) for deg in (37, 90)
            ]
        for name, S in checks:
            moved = points @ S[:3, :3].T + S[:3, 3]
            distance = float(np.percentile(tree.query(moved, k=1)[0], SELF_MAP_PERCENTILE))
            if distance > SELF_MAP_TOLERANCE * diameter:
                raise SymmetryError(
                    f"{name} does not map the mesh onto itself: {100 - SELF_MAP_PERCENTILE}% of the moved "
                    f"vertices lie over {distance * 1000:.1f} mm ({distance / diameter:.2f}·d) from any "
                    "vertex; "
                    "check the axis, the offset / translation (mesh-file units) and the rotation"
                )


def _numbers(values: Any, count: int, where: str) -> np.ndarray:
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != count:
        raise SymmetryError(f"{where}: expected {count} numbers, got {values!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise SymmetryError(f"{where}: expected {count} numbers, got {values!r}")
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise SymmetryError(f"{where}: numbers must be finite, got {values!r}")
    return array


def _discrete(values: Any, scale: float, where: str) -> np.ndarray:
    T = _numbers(values, 16, where).reshape(4, 4)
    if not np.allclose(T[3], (0.0, 0.0, 0.0, 1.0)):
        raise SymmetryError(f"{where}: the last row must be 0 0 0 1, got {T[3].tolist()}")
    R = T[:3, :3]
    if (
        np.abs(R.T @ R - np.eye(3)).max() > ORTHONORMAL_TOLERANCE
        or abs(np.linalg.det(R) - 1.0) > ORTHONORMAL_TOLERANCE
    ):
        raise SymmetryError(
            f"{where}: the 3×3 part must be a rotation (orthonormal, det +1), got {R.tolist()}"
        )
    if np.allclose(T, np.eye(4), atol=ORTHONORMAL_TOLERANCE):
        raise SymmetryError(f"{where}: the identity is implied; list only the other transforms")
    U, _, Vt = np.linalg.svd(R)  # re-orthonormalise the rounded file values
    S = np.eye(4)
    S[:3, :3], S[:3, 3] = U @ Vt, T[:3, 3] * scale
    return S


def _continuous(item: Any, scale: float, where: str) -> ContinuousSymmetry:
    if not isinstance(item, Mapping) or set(item) - {"axis", "offset"} or "axis" not in item:
        raise SymmetryError(f"{where}: expected {{axis: [x, y, z], offset: [x, y, z]}}, got {item!r}")
    axis = _numbers(item["axis"], 3, f"{where}.axis")
    norm = float(np.linalg.norm(axis))
    if norm < 1e-9:
        raise SymmetryError(f"{where}.axis: must be a non-zero vector")
    offset = _numbers(item.get("offset", [0.0, 0.0, 0.0]), 3, f"{where}.offset") * scale
    return ContinuousSymmetry(axis / norm, offset)


def axis_angle_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    """(3, 3) float64 rotation by ``angle`` radians about the unit ``axis`` (3,) (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    K = _skew(a)
    return np.eye(3) + math.sin(angle) * K + (1.0 - math.cos(angle)) * (K @ K)


def _skew(a: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])


def _best_turn(M: np.ndarray, axis: np.ndarray) -> float:
    """The angle θ maximising trace(M·R(axis, θ)) for a (3, 3) ``M``, radians.

    trace(M·R(θ)) = cos θ·(tr M − aᵀMa) + sin θ·tr(M·[a]×) + aᵀMa, maximal at θ = atan2(B, A).
    """
    a_m_a = float(axis @ M @ axis)
    A = float(np.trace(M)) - a_m_a
    B = float(np.trace(M @ _skew(axis)))
    return math.atan2(B, A)


def closest_equivalent(pose: np.ndarray, reference: np.ndarray, symmetries: Symmetries) -> np.ndarray:
    """Among the poses equivalent to ``pose`` under ``symmetries``, the one whose rotation is nearest to
    ``reference``'s (geodesic angle); ``pose`` itself when there is no symmetry.

    Args:
        pose: (4, 4) model → camera pose, metres.
        reference: (4, 4) pose to stay close to (the detector's, or the previous frame's output).
        symmetries: the object's group.

    Returns:
        (4, 4) float64 ``pose·S`` for the best group element ``S`` (the same object surface in the image).
    """
    pose = np.asarray(pose, dtype=np.float64)
    if not symmetries:
        return pose.copy()
    R_ref = np.asarray(reference, dtype=np.float64)[:3, :3]
    best, best_trace = pose.copy(), -math.inf
    for D in [np.eye(4), *symmetries.discrete]:
        S = D
        # Two continuous axes make any rotation about their common point a symmetry; one pass of
        # per-axis optimal turns is exact for one axis and a good choice for several.
        for axis in symmetries.continuous:
            M = R_ref.T @ pose[:3, :3] @ S[:3, :3]
            S = S @ axis.transform(_best_turn(M, axis.axis))
        candidate = pose @ S
        trace = float(np.trace(R_ref.T @ candidate[:3, :3]))
        if trace > best_trace + 1e-12:
            best, best_trace = candidate, trace
    return best
