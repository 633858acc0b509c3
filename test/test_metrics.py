"""Tests of rnnpose_ros.core.metrics on hand-derivable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rnnpose_ros.core.metrics import (
    MetricsInputError,
    add,
    add_or_add_s,
    add_passed,
    add_s,
    cm_deg_passed,
    mspd,
    mssd,
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
    xs, ys = np.meshgrid(np.linspace(-0.03, 0.03, 7), np.linspace(-0.02, 0.02, 5))
    points = np.stack((xs.ravel(), ys.ravel(), np.zeros(xs.size)), 1)
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
