"""Property-based tests of the message conversions: whatever a publisher sends, the conversions either
return a well-formed value or raise their own ConversionError — never anything else — and detections
are always accounted for one to one, in order."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("vision_msgs")

from geometry_msgs.msg import Pose
from sensor_msgs.msg import CameraInfo, Image, RegionOfInterest
from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose

from rnnpose_ros.ros.conversions import (
    IMAGE_ENCODINGS,
    CameraInfoError,
    ConversionError,
    image_to_rgb,
    instance_ids,
    intrinsics_from_camera_info,
    parse_detections,
    pose_to_matrix,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Every double a publisher can put on the wire, the awkward ones made likely.
doubles = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-300, 1e160, -1e160, 1e308, math.nan, math.inf]),
)
names = st.text(max_size=12)


def _pose(values: list[float]) -> Pose:
    pose = Pose()
    p, q = pose.position, pose.orientation
    p.x, p.y, p.z, q.x, q.y, q.z, q.w = values
    return pose


@st.composite
def detection_arrays(draw) -> Detection3DArray:
    array = Detection3DArray()
    for _ in range(draw(st.integers(0, 6))):
        detection = Detection3D(id=draw(names))
        for _ in range(draw(st.integers(0, 2))):
            hypothesis = ObjectHypothesisWithPose()
            hypothesis.hypothesis.class_id = draw(names)
            hypothesis.pose.pose = _pose(draw(st.lists(doubles, min_size=7, max_size=7)))
            detection.results.append(hypothesis)
        array.detections.append(detection)
    return array


@FUZZ
@given(detection_arrays())
def test_parse_detections_accounts_for_every_detection(msg: Detection3DArray) -> None:
    parsed = parse_detections(msg)
    assert [item.index for item in parsed] == list(range(len(msg.detections)))
    assert len({item.instance_id for item in parsed}) == len(parsed)
    for item in parsed:
        assert item.instance_id.isascii()
        if item.error is None:
            assert item.pose is not None and np.isfinite(item.pose).all()
            R = item.pose[:3, :3]
            np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-9)
        else:
            assert item.pose is None and item.error


@FUZZ
@given(
    st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=4, max_size=4).filter(
        lambda q: np.linalg.norm(q) > 0.1
    ),
    st.sampled_from([1e-3, 1.0, 1e10, 1e154, 1e160, 1e300]),
)
def test_scaled_quaternion_gives_the_same_rotation(quaternion: list[float], scale: float) -> None:
    """A valid quaternion scaled by anything finite is the same rotation (no overflow to identity)."""
    unit = _pose([0.0, 0.0, 1.0, *quaternion])
    scaled = _pose([0.0, 0.0, 1.0, *(scale * np.asarray(quaternion))])
    np.testing.assert_allclose(pose_to_matrix(scaled)[0], pose_to_matrix(unit)[0], atol=1e-9)


@st.composite
def images(draw) -> Image:
    encoding = draw(st.one_of(st.sampled_from(sorted(IMAGE_ENCODINGS)), names))
    msg = Image(encoding=encoding, height=draw(st.integers(0, 6)), width=draw(st.integers(0, 6)))
    msg.step = draw(st.integers(0, 64))
    msg.is_bigendian = draw(st.integers(0, 1))
    msg.data = draw(st.binary(max_size=200))
    return msg


@FUZZ
@given(images())
def test_image_conversion_raises_only_its_own_error(msg: Image) -> None:
    try:
        rgb = image_to_rgb(msg)
    except ConversionError:
        return
    assert rgb.shape == (msg.height, msg.width, 3) and rgb.dtype == np.uint8


@st.composite
def camera_infos(draw) -> CameraInfo:
    msg = CameraInfo(width=draw(st.integers(0, 4000)), height=draw(st.integers(0, 3000)))
    msg.k = draw(st.lists(doubles, min_size=9, max_size=9))
    msg.p = draw(st.lists(doubles, min_size=12, max_size=12))
    msg.binning_x, msg.binning_y = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    msg.roi = RegionOfInterest(
        x_offset=draw(st.integers(0, 100)),
        y_offset=draw(st.integers(0, 100)),
        width=draw(st.integers(0, 4000)),
        height=draw(st.integers(0, 3000)),
    )
    return msg


@FUZZ
@given(camera_infos())
def test_camera_info_conversion_raises_only_its_own_error(msg: CameraInfo) -> None:
    try:
        K = intrinsics_from_camera_info(msg)
    except ConversionError:
        return
    assert K.shape == (3, 3) and np.isfinite(K).all() and K[0, 0] > 0 and K[1, 1] > 0


def test_full_size_roi_with_an_offset_is_rejected() -> None:
    msg = CameraInfo(width=640, height=480)
    msg.k = [500.0, 0.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0]
    msg.roi = RegionOfInterest(x_offset=0, y_offset=0, width=640, height=480)
    assert intrinsics_from_camera_info(msg)[0, 0] == 500.0  # the full image as ROI is fine
    msg.roi = RegionOfInterest(x_offset=16, y_offset=0, width=640, height=480)
    with pytest.raises(CameraInfoError, match="ROI"):
        intrinsics_from_camera_info(msg)


def test_frame_names_are_ascii() -> None:
    assert instance_ids(["ente"], ["é1"]) == ["ente__1"]
    assert instance_ids(["カップ"], [""]) == ["____0"]
    assert instance_ids(["duck", "duck"], ["", ""]) == ["duck_0", "duck_1"]
