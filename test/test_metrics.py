"""Tests of rnnpose_ros.core.metrics on hand-derivable cases."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest

from rnnpose_ros.core.metrics import (
    PASS_TESTS,
    MetricsInputError,
    PoseErrors,
    add,
    add_name,
    add_or_add_s,
    add_passed,
    add_s,
    cm_deg_passed,
    mspd,
    mssd,
    passed,
    pose_errors,
    projection_2d_passed,
    projection_error_2d,
    rotation_error_deg,
    translation_error,
)

K = np.array([[572.4114, 0.0, 325.2611], [0.0, 573.57043, 242.04899], [0.0, 0.0, 1.0]])


def _rot_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _rot_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]])


def _pose(R=None, t=(0.0, 0.0, 0.6)) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = np.eye(3) if R is None else R
    pose[:3, 3] = t
    return pose


def _cylinder(radius=0.03, height=0.06, n_angles=36, n_rings=4) -> np.ndarray:
    """Points on a cylinder about the model z axis, every 360/n_angles degrees."""
    angles = np.arange(n_angles) * 2 * np.pi / n_angles
    zs = np.linspace(-height / 2, height / 2, n_rings)
    return np.array([[radius * np.cos(a), radius * np.sin(a), z] for z in zs for a in angles])


def _box_points() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform([-0.05, -0.03, -0.02], [0.05, 0.03, 0.02], size=(500, 3))


def _plane() -> np.ndarray:
    """7 × 5 points of a 6 cm × 4 cm plane in the model's z = 0 plane."""
    xs, ys = np.meshgrid(np.linspace(-0.03, 0.03, 7), np.linspace(-0.02, 0.02, 5))
    return np.stack((xs.ravel(), ys.ravel(), np.zeros(xs.size)), 1)


def test_identity_gives_zero_everywhere():
    points, pose = _box_points(), _pose(_rot_x(20) @ _rot_z(30))
    for value in (
        add(points, pose, pose),
        add_s(points, pose, pose),
        projection_error_2d(points, pose, pose, K),
        rotation_error_deg(pose, pose),
        translation_error(pose, pose),
        mssd(points, pose, pose),
        mspd(points, pose, pose, K),
    ):
        assert value == pytest.approx(0.0, abs=1e-6)
    assert cm_deg_passed(pose, pose)


def test_pure_translation_gives_its_norm():
    points = _box_points()
    gt = _pose(_rot_z(25))
    offset = np.array([0.003, -0.004, 0.012])  # norm 0.013
    est = gt.copy()
    est[:3, 3] += offset
    assert add(points, est, gt) == pytest.approx(0.013, rel=1e-12)
    assert mssd(points, est, gt) == pytest.approx(0.013, rel=1e-12)
    assert translation_error(est, gt) == pytest.approx(0.013, rel=1e-12)
    assert rotation_error_deg(est, gt) == pytest.approx(0.0, abs=1e-6)
    assert add_s(points, est, gt) <= 0.013 + 1e-12


def test_symmetric_object_rotated_about_its_axis():
    points = _cylinder()
    gt = _pose(_rot_x(30), (0.02, -0.01, 0.7))
    est = gt.copy()
    est[:3, :3] = gt[:3, :3] @ _rot_z(20)  # a multiple of the 10° sampling: the point set maps onto itself
    assert add_s(points, est, gt) == pytest.approx(0.0, abs=1e-9)
    expected_add = 2 * 0.03 * math.sin(math.radians(10))  # chord of 20° on the 3 cm radius
    assert add(points, est, gt) == pytest.approx(expected_add, rel=1e-9)
    assert add_or_add_s(points, est, gt, symmetric=True) == pytest.approx(0.0, abs=1e-9)
    assert add_or_add_s(points, est, gt, symmetric=False) == pytest.approx(expected_add, rel=1e-9)
    assert rotation_error_deg(est, gt) == pytest.approx(20.0, rel=1e-9)
    # MSSD / MSPD: > 0 with the identity only, 0 with the object's rotational symmetries.
    symmetries = [_pose(_rot_z(10 * k), (0, 0, 0)) for k in range(36)]
    assert mssd(points, est, gt) == pytest.approx(expected_add, rel=1e-9)
    assert mssd(points, est, gt, symmetries) == pytest.approx(0.0, abs=1e-9)
    assert mspd(points, est, gt, K) > 1.0
    assert mspd(points, est, gt, K, symmetries) == pytest.approx(0.0, abs=1e-6)


def test_projection_of_a_known_offset():
    # A plane facing the camera at Z = 0.5 m shifted 1 cm in x: every point moves by fx·0.01/0.5 px.
    points = _plane()
    gt = _pose(t=(0.0, 0.0, 0.5))
    est = _pose(t=(0.01, 0.0, 0.5))
    expected = K[0, 0] * 0.01 / 0.5
    assert projection_error_2d(points, est, gt, K) == pytest.approx(expected, rel=1e-12)
    assert mspd(points, est, gt, K) == pytest.approx(expected, rel=1e-12)
    assert not projection_2d_passed(expected) and projection_2d_passed(4.9)


def test_cm_deg_thresholds():
    gt = _pose()
    assert cm_deg_passed(_pose(_rot_x(4.9)), gt)
    assert not cm_deg_passed(_pose(_rot_x(5.1)), gt)
    assert cm_deg_passed(_pose(t=(0.0, 0.049, 0.6)), gt)
    assert not cm_deg_passed(_pose(t=(0.0, 0.051, 0.6)), gt)
    assert cm_deg_passed(_pose(t=(0.0, 0.051, 0.6)), gt, max_cm=10.0)


def test_rotation_error_at_180_degrees_is_finite():
    assert rotation_error_deg(_pose(_rot_z(180)), _pose()) == pytest.approx(180.0, abs=1e-4)


def test_add_threshold_and_input_errors():
    assert add_passed(0.009, diameter=0.1) and not add_passed(0.011, diameter=0.1)
    assert add_passed(0.004, diameter=0.1, fraction=0.05)
    with pytest.raises(MetricsInputError):
        add(np.zeros((4, 2)), np.eye(4), np.eye(4))
    with pytest.raises(MetricsInputError):
        add(_box_points(), np.eye(3), np.eye(4))
    with pytest.raises(MetricsInputError):
        mssd(_box_points(), np.eye(4), np.eye(4), symmetries=[np.eye(3)])
    bad = np.eye(4)
    bad[0, 3] = np.nan
    with pytest.raises(MetricsInputError):
        translation_error(bad, np.eye(4))


# -- the reporting vocabulary -----------------------------------------------------------------------


@dataclass
class Shape:
    """The part of an ObjectModel that the metrics read."""

    eval_points: np.ndarray
    diameter: float
    symmetric: bool = False


def test_pose_errors_of_a_known_offset():
    # The plane facing the camera at 0.5 m, shifted 1 cm along x: ADD = 1 cm, every point moves by
    # fx·0.01/0.5 ≈ 11.4 px, no rotation. With a 20 cm diameter ADD is 0.05 d.
    gt, est = _pose(t=(0.0, 0.0, 0.5)), _pose(t=(0.01, 0.0, 0.5))
    errors = pose_errors(Shape(_plane(), diameter=0.2), est, gt, K)
    assert errors.add_m == pytest.approx(0.01, rel=1e-12)
    assert errors.add_fraction == pytest.approx(0.05, rel=1e-12)
    assert errors.projection_px == pytest.approx(K[0, 0] * 0.01 / 0.5, rel=1e-12)
    assert errors.rotation_deg == pytest.approx(0.0, abs=1e-6)
    assert errors.translation_m == pytest.approx(0.01, rel=1e-12)
    assert errors.diameter_m == 0.2
    assert passed(errors) == {"add_s": True, "proj_5px": False, "cm5_deg5": True}


def test_pose_errors_use_add_s_for_symmetric_objects():
    points = _cylinder()
    gt = _pose(_rot_x(30), (0.02, -0.01, 0.7))
    est = gt.copy()
    est[:3, :3] = gt[:3, :3] @ _rot_z(20)  # the point set maps onto itself
    symmetric = pose_errors(Shape(points, diameter=0.1, symmetric=True), est, gt, K)
    plain = pose_errors(Shape(points, diameter=0.1, symmetric=False), est, gt, K)
    assert symmetric.add_m == pytest.approx(0.0, abs=1e-9)
    assert plain.add_m == pytest.approx(2 * 0.03 * math.sin(math.radians(10)), rel=1e-9)  # 20° chord
    assert symmetric.rotation_deg == plain.rotation_deg == pytest.approx(20.0, rel=1e-9)
    assert passed(symmetric)["add_s"] and not passed(plain)["add_s"]
    assert not passed(symmetric)["cm5_deg5"]
    assert (add_name(True), add_name(False)) == ("ADD-S", "ADD")


def test_pass_tests_thresholds_are_strict():
    inside = PoseErrors(
        add_m=0.0099, projection_px=4.99, rotation_deg=4.9, translation_m=0.049, diameter_m=0.1
    )
    assert passed(inside) == {"add_s": True, "proj_5px": True, "cm5_deg5": True}
    outside = {
        "add_s": replace(inside, add_m=0.0101),
        "proj_5px": replace(inside, projection_px=5.0),
        "cm5_deg5": replace(inside, rotation_deg=5.0),
    }
    for name, errors in outside.items():
        assert passed(errors) == {test: test != name for test in PASS_TESTS}, name
    assert not passed(replace(inside, translation_m=0.051))["cm5_deg5"]


def test_pass_tests_are_named_for_every_report():
    assert [(t.name, t.label, t.tag) for t in PASS_TESTS.values()] == [
        ("add_s", "ADD(-S) < 0.1d", "ADD(-S)@0.1d"),
        ("proj_5px", "2D proj < 5 px", "proj2D@5px"),
        ("cm5_deg5", "5 cm 5°", "5cm5deg"),
    ]


@pytest.mark.parametrize("diameter", [0.0, -0.1, math.nan, math.inf])
def test_pose_errors_need_a_positive_diameter(diameter):
    with pytest.raises(MetricsInputError, match="diameter"):
        pose_errors(Shape(_plane(), diameter=diameter), _pose(), _pose(), K)
