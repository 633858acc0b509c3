"""Message ↔ array conversions of the node, on real ROS 2 message classes (no node, no spinning)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from geometry_msgs.msg import Pose
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose
from visualization_msgs.msg import Marker

from rnnpose_ros.ros.conversions import (
    IMAGE_ENCODINGS,
    CameraInfoError,
    DetectionOutput,
    ImageConversionError,
    MeshMarker,
    OverlayObject,
    bounding_box,
    detection_array,
    has_distortion,
    image_to_rgb,
    instance_ids,
    intrinsics_from_camera_info,
    matrix_to_pose,
    matrix_to_quaternion,
    mesh_markers,
    object_transforms,
    overlay_image,
    parse_detections,
    pose_to_matrix,
    rgb_to_image,
    silhouette,
    stamp_nanoseconds,
    stamp_text,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
K = np.array([[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]])


def header(frame: str = "cam_optical", sec: int = 12, nanosec: int = 345) -> Header:
    h = Header(frame_id=frame)
    h.stamp.sec, h.stamp.nanosec = sec, nanosec
    return h


def random_pose(z: float = 0.5) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.random(random_state=int(RNG.integers(1 << 30))).as_matrix()
    T[:3, 3] = RNG.normal(size=3) * 0.05 + (0.0, 0.0, z)
    return T


def detection(class_id: str | None, pose: Pose | None = None, det_id: str = "") -> Detection3D:
    d = Detection3D(id=det_id)
    if class_id is not None:
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = class_id
        hypothesis.hypothesis.score = 0.9
        hypothesis.pose.pose = pose if pose is not None else matrix_to_pose(random_pose())
        d.results.append(hypothesis)
    return d


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_round_trip(encoding: str) -> None:
    msg = rgb_to_image(RGB, header(), encoding)
    assert msg.encoding == encoding and msg.header.frame_id == "cam_optical"
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)


@pytest.mark.parametrize("encoding", ["mono8", "mono16"])
def test_mono_is_replicated_grey(encoding: str) -> None:
    out = image_to_rgb(rgb_to_image(RGB, encoding=encoding))
    assert out.shape == RGB.shape and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    grey = RGB @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out[..., 0] - grey).max() <= 1.5


def test_row_padding_is_honoured() -> None:
    height, width = RGB.shape[:2]
    padded = np.zeros((height, width * 3 + 5), np.uint8)
    padded[:, : width * 3] = RGB.reshape(height, -1)
    msg = Image(height=height, width=width, encoding="rgb8", step=width * 3 + 5)
    msg.data = padded.tobytes()
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)


def test_mono16_endianness() -> None:
    values = np.array([[0x1234, 0xFF00]], dtype=np.uint16)
    for big, dtype in ((0, "<u2"), (1, ">u2")):
        msg = Image(height=1, width=2, encoding="mono16", step=4, is_bigendian=big)
        msg.data = values.astype(dtype).tobytes()
        np.testing.assert_array_equal(image_to_rgb(msg)[0, :, 0], [0x12, 0xFF])


def test_data_is_copied_not_aliased() -> None:
    msg = rgb_to_image(RGB)
    out = image_to_rgb(msg)
    out[:] = 0
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"encoding": "32FC1"}, "unsupported image encoding"),
        ({"encoding": "yuv422"}, "unsupported image encoding"),
        ({"width": 0}, "empty image"),
        ({"step": 10}, "step 10 is smaller"),
        ({"height": 6}, "truncated image data"),
    ],
)
def test_bad_images_raise_clear_errors(change: dict, match: str) -> None:
    msg = rgb_to_image(RGB)
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(ImageConversionError, match=match):
        image_to_rgb(msg)


def test_truncated_data_raises() -> None:
    msg = rgb_to_image(RGB)
    msg.data = bytes(msg.data)[:-1]
    with pytest.raises(ImageConversionError, match="truncated"):
        image_to_rgb(msg)


def test_supported_encodings_are_listed_in_the_error() -> None:
    with pytest.raises(ImageConversionError) as error:
        image_to_rgb(Image(height=1, width=1, encoding="bayer_rggb8", step=1, data=[0]))
    assert all(name in str(error.value) for name in IMAGE_ENCODINGS)


# ---------------------------------------------------------------- intrinsics


def camera_info(k: np.ndarray, p: np.ndarray | None = None) -> CameraInfo:
    info = CameraInfo(width=640, height=480)
    info.k = np.asarray(k, dtype=np.float64).ravel().tolist()
    if p is not None:
        info.p = np.asarray(p, dtype=np.float64).ravel().tolist()
    return info


def test_intrinsics_prefer_rectified_projection() -> None:
    np.testing.assert_array_equal(intrinsics_from_camera_info(camera_info(K)), K)
    P = np.hstack([K * [[0.9], [0.9], [1.0]], np.zeros((3, 1))])
    np.testing.assert_allclose(intrinsics_from_camera_info(camera_info(K, P)), P[:, :3])


@pytest.mark.parametrize(
    ("k", "match"),
    [
        (np.zeros((3, 3)), "fx = 0.0, fy = 0.0"),
        (K * [[1.0], [-1.0], [1.0]], "must be > 0"),
        (np.where(np.eye(3, dtype=bool), np.nan, K), "non-finite"),
        (np.vstack([K[:2], [0.0, 0.0, 2.0]]), "last row"),
    ],
)
def test_bad_intrinsics_raise(k: np.ndarray, match: str) -> None:
    with pytest.raises(CameraInfoError, match=match):
        intrinsics_from_camera_info(camera_info(k))


def test_distortion_is_reported() -> None:
    info = camera_info(K)
    assert not has_distortion(info)
    info.d = [0.1, 0.0, 0.0, 0.0, 0.0]
    assert has_distortion(info)


# ---------------------------------------------------------------- poses


def test_pose_round_trip_and_positive_w() -> None:
    for _ in range(20):
        T = random_pose()
        pose = matrix_to_pose(T)
        assert pose.orientation.w >= 0.0
        back, warning = pose_to_matrix(pose)
        assert warning is None
        np.testing.assert_allclose(back, T, atol=1e-12)
    # the 180° rotations exercise every branch of the matrix -> quaternion conversion
    for axis in np.eye(3):
        R = Rotation.from_rotvec(math.pi * axis).as_matrix()
        x, y, z, w = matrix_to_quaternion(R)
        np.testing.assert_allclose(Rotation.from_quat([x, y, z, w]).as_matrix(), R, atol=1e-12)


def test_non_unit_quaternion_is_normalised_with_warning() -> None:
    pose = Pose()
    pose.orientation.x, pose.orientation.w = 0.0, 2.0
    T, warning = pose_to_matrix(pose)
    np.testing.assert_allclose(T, np.eye(4))
    assert warning is not None and "normalised" in warning
    pose.orientation.w = 1.0 + 1e-5  # float32 round-off: silent
    assert pose_to_matrix(pose)[1] is None


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("orientation.w", 0.0, "zero-length"),
        ("orientation.x", math.nan, "non-finite quaternion"),
        ("position.z", math.inf, "non-finite position"),
    ],
)
def test_invalid_poses_are_errors_per_detection(field: str, value: float, match: str) -> None:
    pose = matrix_to_pose(random_pose())
    if field == "orientation.w":
        pose.orientation.x = pose.orientation.y = pose.orientation.z = 0.0
    part, name = field.split(".")
    setattr(getattr(pose, part), name, value)
    msg = Detection3DArray(detections=[detection("duck"), detection("duck", pose), detection("duck")])
    parsed = parse_detections(msg)
    assert [p.error is None for p in parsed] == [True, False, True]
    assert match in parsed[1].error and parsed[1].pose is None


def test_parse_detections_reads_results0_and_flags_missing_parts() -> None:
    T = random_pose()
    msg = Detection3DArray(
        detections=[
            detection("duck", matrix_to_pose(T), "7"),
            detection(None),
            detection(""),
            detection("cat"),
        ]
    )
    parsed = parse_detections(msg)
    assert [p.index for p in parsed] == [0, 1, 2, 3]
    assert [p.class_id for p in parsed] == ["duck", "", "", "cat"]
    np.testing.assert_allclose(parsed[0].pose, T, atol=1e-12)
    assert "no results" in parsed[1].error and "class_id is empty" in parsed[2].error
    assert parsed[3].error is None  # unknown classes are the registry's business


def test_instance_ids_are_stable_unique_and_frame_safe() -> None:
    assert instance_ids(["duck", "duck", "cat", "duck"], ["", "", "", ""]) == [
        "duck_0",
        "duck_1",
        "cat_0",
        "duck_2",
    ]
    assert instance_ids(["duck", "duck"], ["17", "17"]) == ["duck_17", "duck_17_1"]
    assert instance_ids(["my duck"], ["a/b"]) == ["my_duck_a_b"]
    assert instance_ids([""], [""]) == ["unknown_0"]


# ---------------------------------------------------------------- output messages


def test_detection_array_keeps_header_order_and_passes_failures_through() -> None:
    initial = [random_pose(), random_pose(), random_pose()]
    source = Detection3DArray(header=header("detector_frame", 1, 2))
    source.detections = [detection("duck", matrix_to_pose(T)) for T in initial]
    source.detections[2].results[0].pose.covariance[0] = 0.25
    inputs = parse_detections(source)
    refined = random_pose()
    center, extents = np.array([0.01, 0.02, 0.03]), np.array([0.08, 0.07, 0.05])
    outputs = [
        DetectionOutput(None, 0.0, extents, center),
        DetectionOutput(refined, 1.7, extents, center),
        DetectionOutput(None, 0.0),
    ]
    image_header = header()
    out = detection_array(image_header, source, inputs, outputs)
    assert out.header == image_header and all(d.header == image_header for d in out.detections)
    assert [d.id for d in out.detections] == ["duck_0", "duck_1", "duck_2"]
    assert all(len(d.results) == 1 and d.results[0].hypothesis.class_id == "duck" for d in out.detections)
    assert [d.results[0].hypothesis.score for d in out.detections] == [0.0, 1.0, 0.0]  # clamped to [0, 1]
    assert (
        out.detections[0].results[0].pose == source.detections[0].results[0].pose
    )  # passed through verbatim
    assert out.detections[2].results[0].pose.covariance[0] == 0.25
    np.testing.assert_allclose(pose_to_matrix(out.detections[1].results[0].pose.pose)[0], refined, atol=1e-12)
    box = out.detections[1].bbox
    np.testing.assert_allclose([box.size.x, box.size.y, box.size.z], extents)
    box_T = pose_to_matrix(box.center)[0]
    np.testing.assert_allclose(box_T[:3, 3], refined[:3, :3] @ center + refined[:3, 3], atol=1e-12)
    np.testing.assert_allclose(box_T[:3, :3], refined[:3, :3], atol=1e-12)
    # passed-through detection with a known mesh: box from the input pose
    np.testing.assert_allclose(
        pose_to_matrix(out.detections[0].bbox.center)[0][:3, 3],
        initial[0][:3, :3] @ center + initial[0][:3, 3],
    )


def test_empty_detection_array() -> None:
    out = detection_array(header(), Detection3DArray(), [], [])
    assert out.header == header() and len(out.detections) == 0


def test_bounding_box_identity() -> None:
    box = bounding_box(np.eye(4), np.array([0.0, 0.0, 0.1]), np.array([1.0, 2.0, 3.0]))
    assert (box.center.position.z, box.size.x, box.size.y, box.size.z) == (0.1, 1.0, 2.0, 3.0)


def test_object_transforms_parent_stamp_child() -> None:
    T = random_pose()
    (transform,) = object_transforms(header(), [("obj_duck_0", T)])
    assert transform.header == header() and transform.child_frame_id == "obj_duck_0"
    t, q = transform.transform.translation, transform.transform.rotation
    np.testing.assert_allclose([t.x, t.y, t.z], T[:3, 3])
    np.testing.assert_allclose(Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix(), T[:3, :3], atol=1e-12)


def test_mesh_markers_add_and_delete() -> None:
    T = random_pose()
    markers = mesh_markers(header(), [MeshMarker("duck_0", T, "file:///m/duck.obj", 0.05)], ["duck_1"])
    add, delete = markers.markers
    assert (add.type, add.action, add.ns, add.id) == (Marker.MESH_RESOURCE, Marker.ADD, "rnnpose/duck_0", 0)
    assert add.mesh_resource == "file:///m/duck.obj" and add.scale.x == add.scale.z == 0.05
    assert add.header == header() and add.color.a == 1.0
    assert (delete.action, delete.ns, delete.id) == (Marker.DELETE, "rnnpose/duck_1", 0)


# ---------------------------------------------------------------- debug overlay


def _square(z: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vertices = np.array([[-0.05, -0.05, 0], [0.05, -0.05, 0], [0.05, 0.05, 0], [-0.05, 0.05, 0]], np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]], np.int64)
    T = np.eye(4)
    T[2, 3] = z
    return vertices, faces, T


def test_silhouette_of_a_square() -> None:
    vertices, faces, T = _square()
    mask = silhouette(vertices, faces, T, K, (480, 640))
    # 0.1 m at 0.5 m with f = 500 → 100 px square centred on the principal point
    ys, xs = np.nonzero(mask)
    assert abs(xs.min() - 270) <= 1 and abs(xs.max() - 370) <= 1 and abs(ys.mean() - 240) < 1
    T[2, 3] = -0.5
    assert not silhouette(vertices, faces, T, K, (480, 640)).any()  # behind the camera: nothing drawn


def test_overlay_draws_initial_white_and_refined_red() -> None:
    vertices, faces, T = _square()
    moved = T.copy()
    moved[0, 3] = 0.15  # 150 px to the right, no overlap
    image = np.zeros((480, 640, 3), np.uint8)
    out = overlay_image(image, K, [OverlayObject(vertices, faces, T, moved)])
    assert image.max() == 0  # input untouched
    white = (out == 255).all(axis=2)
    red = (out[..., 0] > 200) & (out[..., 1] < 50) & (out[..., 2] < 50)
    assert white[:, 250:390].any() and not white[:, 400:].any()
    assert red[:, 400:540].any() and not red[:, :390].any()


def test_stamps_are_exact_integer_nanoseconds_and_padded_text() -> None:
    h = header(sec=1_700_000_000, nanosec=5)
    assert stamp_nanoseconds(h.stamp) == 1_700_000_000_000_000_005  # beyond float64 precision
    assert stamp_text(h.stamp) == "1700000000.000000005"
