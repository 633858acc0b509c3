"""Pose-accuracy metrics (NumPy): ADD, ADD-S, ADD(-S), 2D projection, n cm n°, MSSD, MSPD.

Definitions follow docs/method.md §5.1 (LINEMOD protocol) and the BOP challenge (MSSD, MSPD). Inputs are
model points (N, 3) in metres in the model frame and 4×4 (or 3×4) model→camera poses (OpenCV
camera frame, metres). Errors are returned as floats; thresholds are applied by the ``*_passed``
helpers so that recall curves can be computed from the raw errors.

The vocabulary every tool reports in: :func:`pose_errors` measures one pose as :class:`PoseErrors`,
and :data:`PASS_TESTS` names the three standard tests on them (ADD(-S) < 0.1·diameter, 2D projection
< 5 px, 5 cm 5°), which :func:`passed` applies.

Symmetric objects: an object that declares its symmetry group (``objects.yaml``, BOP style, see
:mod:`~rnnpose_ros.core.symmetry`) is measured against the equivalent ground truth ``P_g·S`` nearest to
the estimate (the S of least ADD): its ADD-S is that least ADD, and the projection, rotation and
translation errors are taken against the same ``P_g·S``; MSSD and MSPD minimise over the group. An
object only flagged ``symmetric`` (no group declared) keeps the nearest-point ADD-S of LINEMOD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.spatial import cKDTree

from rnnpose_ros.core.pinhole import project_to_pixels

ArrayLike = np.ndarray

#: ADD(-S) test: the error must stay below this fraction of the object's diameter.
ADD_S_FRACTION = 0.1
#: 2D projection test: the mean reprojection error must stay below this, pixels.
PROJECTION_PX = 5.0
#: n cm n° test: translation error below MAX_CM centimetres and rotation error below MAX_DEG degrees.
MAX_CM = 5.0
MAX_DEG = 5.0


class MetricsInputError(ValueError):
    """Points, poses or intrinsics given to a metric have the wrong shape or are not finite."""


def _pose(pose: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(R (3, 3), t (3,)) float64 from a 4×4 or 3×4 pose."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape not in ((4, 4), (3, 4)):
        raise MetricsInputError(f"{name} must be 4×4 or 3×4, got {pose.shape}")
    if not np.isfinite(pose).all():
        raise MetricsInputError(f"{name} is not finite")
    return pose[:3, :3], pose[:3, 3]


def _points(points: ArrayLike) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise MetricsInputError(f"points must be (N, 3) with N ≥ 1, got {points.shape}")
    return points


def transform(points: ArrayLike, pose: ArrayLike) -> np.ndarray:
    """R·x + t for model points (N, 3) → (N, 3) float64 camera-frame points, metres."""
    R, t = _pose(pose, "pose")
    return _points(points) @ R.T + t


def project(points_camera: ArrayLike, K: ArrayLike) -> np.ndarray:
    """Pinhole projection (N, 3) camera-frame points → (N, 2) pixels (no depth clamp)."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise MetricsInputError(f"K must be 3×3, got {K.shape}")
    return project_to_pixels(points_camera, K)


def add(points: ArrayLike, pose_est: ArrayLike, pose_gt: ArrayLike) -> float:
    """ADD: mean ‖(R_e x + t_e) − (R_g x + t_g)‖ over the model points, metres."""
    return float(np.linalg.norm(transform(points, pose_est) - transform(points, pose_gt), axis=1).mean())


def add_s(points: ArrayLike, pose_est: ArrayLike, pose_gt: ArrayLike) -> float:
    """ADD-S: mean over GT-posed points of the distance to the nearest estimate-posed point, metres."""
    estimated = transform(points, pose_est)
    distances, _ = cKDTree(estimated).query(transform(points, pose_gt), k=1)
    return float(np.mean(distances))


def add_or_add_s(points: ArrayLike, pose_est: ArrayLike, pose_gt: ArrayLike, symmetric: bool) -> float:
    """ADD(-S): ADD-S for symmetric objects, ADD otherwise, metres."""
    return add_s(points, pose_est, pose_gt) if symmetric else add(points, pose_est, pose_gt)


def add_passed(error: float, diameter: float, fraction: float = ADD_S_FRACTION) -> bool:
    """ADD / ADD-S test: error < fraction·diameter (0.1 d standard; 0.02 d and 0.05 d also used)."""
    return bool(error < fraction * diameter)


def projection_error_2d(points: ArrayLike, pose_est: ArrayLike, pose_gt: ArrayLike, K: ArrayLike) -> float:
    """Mean pixel distance between the model points projected with the two poses and the given K.

    (The published code hard-codes the LINEMOD K; pass it explicitly for LINEMOD.)
    """
    est = project(transform(points, pose_est), K)
    gt = project(transform(points, pose_gt), K)
    return float(np.linalg.norm(est - gt, axis=1).mean())


def projection_2d_passed(error_px: float, threshold_px: float = PROJECTION_PX) -> bool:
    """2D projection test: mean error below ``threshold_px`` (5 px standard)."""
    return bool(error_px < threshold_px)


def rotation_error_deg(pose_est: ArrayLike, pose_gt: ArrayLike) -> float:
    """Angle of R_e·R_gᵀ in degrees, arccos((tr − 1)/2) with the cosine clipped to [−1, 1]."""
    R_e, _ = _pose(pose_est, "pose_est")
    R_g, _ = _pose(pose_gt, "pose_gt")
    cos = np.clip((np.trace(R_e @ R_g.T) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)))


def translation_error(pose_est: ArrayLike, pose_gt: ArrayLike) -> float:
    """‖t_e − t_g‖, metres."""
    _, t_e = _pose(pose_est, "pose_est")
    _, t_g = _pose(pose_gt, "pose_gt")
    return float(np.linalg.norm(t_e - t_g))


def cm_deg_passed(
    pose_est: ArrayLike, pose_gt: ArrayLike, max_cm: float = MAX_CM, max_deg: float = MAX_DEG
) -> bool:
    """n cm n° test (5 cm 5° by default): translation error < max_cm and rotation error < max_deg."""
    return _within_cm_deg(
        translation_error(pose_est, pose_gt), rotation_error_deg(pose_est, pose_gt), max_cm, max_deg
    )


def _within_cm_deg(translation_m: float, rotation_deg: float, max_cm: float, max_deg: float) -> bool:
    return bool(translation_m < max_cm / 100.0 and rotation_deg < max_deg)


def _symmetries(symmetries: Sequence[ArrayLike] | None) -> np.ndarray:
    """(G, 4, 4) float64 model-frame symmetry transforms; the identity alone by default."""
    if symmetries is None or len(symmetries) == 0:
        return np.eye(4)[None]
    group = np.asarray(symmetries, dtype=np.float64)
    if group.ndim != 3 or group.shape[1:] != (4, 4):
        raise MetricsInputError(f"symmetry transforms must be 4×4, got {group.shape[1:]}")
    return group


def mssd(
    points: ArrayLike, pose_est: ArrayLike, pose_gt: ArrayLike, symmetries: Sequence[ArrayLike] | None = None
) -> float:
    """BOP Maximum Symmetry-aware Surface Distance, metres.

    min over symmetries S of max over points x of ‖P_e·x − P_g·S·x‖, with S a model-frame 4×4
    transform that maps the object onto itself (identity only by default).
    """
    estimated = transform(points, pose_est)
    return min(
        float(np.linalg.norm(moved - estimated, axis=2).max(axis=1).min())
        for _, moved in _posed_ground_truths(points, pose_gt, symmetries)
    )


def mspd(
    points: ArrayLike,
    pose_est: ArrayLike,
    pose_gt: ArrayLike,
    K: ArrayLike,
    symmetries: Sequence[ArrayLike] | None = None,
) -> float:
    """BOP Maximum Symmetry-aware Projection Distance, pixels.

    min over symmetries S of max over points x of ‖π(K, P_e·x) − π(K, P_g·S·x)‖.
    """
    estimated = project(transform(points, pose_est), K)
    errors = []
    for _, moved in _posed_ground_truths(points, pose_gt, symmetries):
        pixels = project(moved.reshape(-1, 3), K).reshape(*moved.shape[:2], 2)
        errors.append(float(np.linalg.norm(pixels - estimated, axis=2).max(axis=1).min()))
    return min(errors)


def nearest_equivalent_gt(
    points: ArrayLike, pose_est: ArrayLike, pose_gt: ArrayLike, symmetries: Sequence[ArrayLike]
) -> tuple[np.ndarray, float]:
    """The ground truth ``P_g·S`` (S over the (G, 4, 4) model-frame ``symmetries``) of least ADD to the
    estimate, and that ADD (metres): the symmetry-aware ADD of an object with a declared group."""
    estimated = transform(points, pose_est)
    best, best_error = _as_4x4(pose_gt), np.inf
    for poses, moved in _posed_ground_truths(points, pose_gt, symmetries):
        errors = np.linalg.norm(moved - estimated, axis=2).mean(axis=1)
        k = int(np.argmin(errors))
        if errors[k] < best_error:
            best, best_error = poses[k], float(errors[k])
    return best, best_error


# Group elements per vectorised evaluation: bounds the (g, N, 3) temporary to a few MB.
_GROUP_CHUNK = 64


def _posed_ground_truths(
    points: ArrayLike, pose_gt: ArrayLike, symmetries: Sequence[ArrayLike] | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of (poses P_g·S (g, 4, 4), the model points posed by each (g, N, 3)) over the symmetries."""
    model = _points(points)
    pose_gt = _as_4x4(pose_gt)
    group = _symmetries(symmetries)
    for start in range(0, len(group), _GROUP_CHUNK):
        poses = pose_gt @ group[start : start + _GROUP_CHUNK]
        yield poses, model[None] @ np.swapaxes(poses[:, :3, :3], 1, 2) + poses[:, None, :3, 3]


def _as_4x4(pose: ArrayLike) -> np.ndarray:
    R, t = _pose(pose, "pose")
    full = np.eye(4)
    full[:3, :3], full[:3, 3] = R, t
    return full


# ---------------------------------------------------------------- the reporting vocabulary


@dataclass(frozen=True)
class PoseErrors:
    """Errors of one estimated pose of one object against its ground truth.

    Attributes:
        add_m: ADD(-S), metres: ADD-S for a symmetric object, ADD otherwise (:func:`add_or_add_s`).
        projection_px: mean 2D reprojection distance of the model points, pixels.
        rotation_deg: angle of R_est·R_gtᵀ, degrees in [0, 180].
        translation_m: ‖t_est − t_gt‖, metres.
        diameter_m: the object's diameter, metres (the scale of the ADD(-S) test).
        mssd_m: BOP MSSD, metres, minimised over the object's declared symmetries (the identity
            alone when none is declared); NaN where it was not computed.

    For an object with a declared symmetry group every error is taken against the equivalent ground
    truth nearest to the estimate (module docstring).
    """

    add_m: float
    projection_px: float
    rotation_deg: float
    translation_m: float
    diameter_m: float
    mssd_m: float = float("nan")

    @property
    def add_fraction(self) -> float:
        """ADD(-S) as a fraction of the object's diameter."""
        return self.add_m / self.diameter_m


class MeasuredObject(Protocol):
    """What the metrics need of an object; :class:`~rnnpose_ros.core.objects.ObjectModel` has it.

    Attributes:
        eval_points: (M, 3) model points, metres in the model frame.
        diameter: metres.
        symmetric: whether ADD-S replaces ADD.

    An object may also have ``symmetries`` (:class:`~rnnpose_ros.core.symmetry.Symmetries`), its
    declared group; the errors then use it (module docstring).
    """

    eval_points: np.ndarray
    diameter: float
    symmetric: bool


def pose_errors(obj: MeasuredObject, pose_est: ArrayLike, pose_gt: ArrayLike, K: ArrayLike) -> PoseErrors:
    """Every error of :class:`PoseErrors` for one pose of ``obj``.

    Args:
        obj: the object (its points, diameter and symmetry).
        pose_est, pose_gt: (4, 4) or (3, 4) model→camera poses, metres.
        K: (3, 3) intrinsics of the image the pose is measured in, pixels.

    Raises:
        MetricsInputError: the diameter is not a finite positive number, or the points, poses or K
            have the wrong shape or are not finite.
    """
    if not (np.isfinite(obj.diameter) and obj.diameter > 0):
        raise MetricsInputError(f"diameter must be a finite number > 0, got {obj.diameter}")
    points = obj.eval_points
    symmetries = getattr(obj, "symmetries", None)
    if symmetries:
        group = symmetries.group
        pose_gt, add_m = nearest_equivalent_gt(points, pose_est, pose_gt, group)
    else:
        group = None
        add_m = add_or_add_s(points, pose_est, pose_gt, obj.symmetric)
    return PoseErrors(
        add_m=add_m,
        projection_px=projection_error_2d(points, pose_est, pose_gt, K),
        rotation_deg=rotation_error_deg(pose_est, pose_gt),
        translation_m=translation_error(pose_est, pose_gt),
        diameter_m=float(obj.diameter),
        mssd_m=mssd(points, pose_est, pose_gt, group),
    )


def add_name(symmetric: bool) -> str:
    """What ``PoseErrors.add_m`` measures for such an object: "ADD-S" or "ADD"."""
    return "ADD-S" if symmetric else "ADD"


@dataclass(frozen=True)
class PassTest:
    """One named pass/fail test on :class:`PoseErrors`.

    Attributes:
        name: the key in result records ("add_s").
        label: the row label of recall tables ("ADD(-S) < 0.1d").
        tag: the compact label of the demo's table and summary ("ADD(-S)@0.1d").
        passes: the test itself.
    """

    name: str
    label: str
    tag: str
    passes: Callable[[PoseErrors], bool]


#: The standard tests (LINEMOD protocol), in the order tables list them.
PASS_TESTS: dict[str, PassTest] = {
    test.name: test
    for test in (
        PassTest("add_s", "ADD(-S) < 0.1d", "ADD(-S)@0.1d", lambda e: add_passed(e.add_m, e.diameter_m)),
        PassTest("proj_5px", "2D proj < 5 px", "proj2D@5px", lambda e: projection_2d_passed(e.projection_px)),
        PassTest(
            "cm5_deg5",
            "5 cm 5°",
            "5cm5deg",
            lambda e: _within_cm_deg(e.translation_m, e.rotation_deg, MAX_CM, MAX_DEG),
        ),
    )
}


def passed(errors: PoseErrors) -> dict[str, bool]:
    """Whether ``errors`` pass each test of :data:`PASS_TESTS`, by test name."""
    return {name: test.passes(errors) for name, test in PASS_TESTS.items()}
