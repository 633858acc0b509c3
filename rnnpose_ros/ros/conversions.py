"""Pure conversions between ROS 2 messages and the engine's NumPy arrays (no node, no spinning).

Conventions: poses are 4×4 float64 model→camera transforms in metres, camera = the OpenCV optical
frame of the image (x right, y down, z forward, REP-103 ``*_optical``). Images at the engine edge are
(H, W, 3) uint8 RGB, depth images (H, W) float32 metres (0 = unknown). Every function raises a
``ValueError`` subclass with a message naming the field and the fix, never a bare ``IndexError`` from a
malformed message — except the parsers of what arrives per frame (:func:`parse_detections`,
:func:`parse_depth`), which never raise: each result carries its error.
Stamps are compared as integer nanoseconds (:func:`stamp_nanoseconds`), never as floats.

Where the pose lives in the output ``vision_msgs/Detection3D``: ``results[0].pose.pose`` is the pose of
the **mesh origin** (the frame the mesh file is written in); ``bbox.center`` is the centre of the
mesh's axis-aligned bounding box expressed with the same orientation, ``bbox.size`` its extents.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
from geometry_msgs.msg import Pose, Quaternion, Transform, TransformStamped
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from vision_msgs.msg import BoundingBox3D, Detection3D, Detection3DArray, ObjectHypothesisWithPose
from visualization_msgs.msg import Marker, MarkerArray

from rnnpose_ros.core.pinhole import project_to_pixels

if TYPE_CHECKING:  # builtin_interfaces comes with std_msgs; only the annotations name it
    from builtin_interfaces.msg import Time

# encoding -> (channels, bytes per channel). 16UC1 is not a colour encoding: it is depth in millimetres
# (DEPTH_ENCODINGS), the node's optional depth input.
IMAGE_ENCODINGS: dict[str, tuple[int, int]] = {
    "rgb8": (3, 1),
    "bgr8": (3, 1),
    "rgba8": (4, 1),
    "bgra8": (4, 1),
    "mono8": (1, 1),
    "mono16": (1, 2),
}
# depth encoding -> (NumPy kind of one sample, metres per unit), as REP 118 defines them.
DEPTH_ENCODINGS: dict[str, tuple[str, float]] = {"16UC1": ("u2", 0.001), "32FC1": ("f4", 1.0)}
QUATERNION_MIN_NORM = 1e-6
# A quaternion whose norm differs from 1 by more than this is normalised *with* a warning; below it
# the difference is float32 round-off from an upstream detector and is normalised silently.
QUATERNION_WARN_TOLERANCE = 1e-3
MARKER_NAMESPACE_PREFIX = "rnnpose/"
INITIAL_COLOUR_RGB = (255, 255, 255)
REFINED_COLOUR_RGB = (255, 0, 0)
NANOSECONDS_PER_SECOND = 1_000_000_000


class ConversionError(ValueError):
    """A message cannot be converted (the message says which field is wrong and why)."""


class ImageConversionError(ConversionError):
    """A ``sensor_msgs/Image`` that is empty, truncated, inconsistent or in an unsupported encoding."""


class CameraInfoError(ConversionError):
    """A ``sensor_msgs/CameraInfo`` whose intrinsics are unusable (zero, NaN, negative focal length)."""


class PoseError(ConversionError):
    """A pose with a non-finite position or a NaN / zero-length quaternion."""


# ---------------------------------------------------------------- stamps


def stamp_nanoseconds(stamp: Time) -> int:
    """A ``builtin_interfaces/Time`` (``header.stamp``) as integer nanoseconds: exact, no float rounding,
    so it keys the messages of one frame and the answer to it."""
    return int(stamp.sec) * NANOSECONDS_PER_SECOND + int(stamp.nanosec)


def stamp_text(stamp: Time) -> str:
    """``<sec>.<nanosec>`` with nine decimals, for log lines."""
    return f"{stamp.sec}.{stamp.nanosec:09d}"


# ---------------------------------------------------------------- images


def image_to_rgb(msg: Image) -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` into an (H, W, 3) uint8 RGB array (a copy).

    Honours ``step`` (row padding) and ``is_bigendian`` (16-bit data). ``mono8`` is replicated to three
    channels; ``mono16`` keeps its 8 most significant bits; alpha is dropped.
    """
    encoding = msg.encoding.strip().lower()
    if encoding not in IMAGE_ENCODINGS:
        raise ImageConversionError(
            f"unsupported image encoding {msg.encoding!r}; supported: {', '.join(IMAGE_ENCODINGS)}"
        )
    channels, itemsize = IMAGE_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise ImageConversionError(f"empty image ({width}×{height})")
    row_bytes = width * channels * itemsize
    if step < row_bytes:
        raise ImageConversionError(
            f"image step {step} is smaller than width × bytes per pixel = {width} × {channels * itemsize}"
        )
    if itemsize > 1 and step % itemsize:
        raise ImageConversionError(f"image step {step} is not a multiple of {itemsize} for {encoding}")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    needed = step * (height - 1) + row_bytes
    if data.size < needed:
        raise ImageConversionError(
            f"truncated image data: {data.size} bytes for {width}×{height} {encoding} with step {step} "
            f"(needs at least {needed})"
        )
    rows = np.lib.stride_tricks.as_strided(data, shape=(height, row_bytes), strides=(step, 1))
    if itemsize == 2:
        dtype = np.dtype(">u2" if msg.is_bigendian else "<u2")
        pixels = (np.ascontiguousarray(rows).view(dtype).reshape(height, width) >> 8).astype(np.uint8)
        return np.repeat(pixels[:, :, None], 3, axis=2)
    pixels = rows.reshape(height, width, channels)
    if encoding == "rgb8":
        return pixels.copy()
    if encoding == "rgba8":
        return pixels[:, :, :3].copy()
    if encoding in ("bgr8", "bgra8"):
        return pixels[:, :, 2::-1].copy()
    return np.repeat(pixels, 3, axis=2)


def rgb_to_image(rgb: np.ndarray, header: Header | None = None, encoding: str = "rgb8") -> Image:
    """Encode an (H, W, 3) uint8 RGB array as a tightly packed ``sensor_msgs/Image``.

    ``encoding`` is one of ``rgb8``, ``bgr8``, ``rgba8``, ``bgra8``, ``mono8`` (luma) or ``mono16``
    (luma × 257, little-endian).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageConversionError(f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[:, :, ::-1]
    elif encoding in ("rgba8", "bgra8"):
        colour = rgb if encoding == "rgba8" else rgb[:, :, ::-1]
        pixels = np.concatenate([colour, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
    elif encoding == "mono8":
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif encoding == "mono16":
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype("<u2") * np.uint16(257)
    else:
        raise ImageConversionError(f"cannot encode {encoding!r}; supported: {', '.join(IMAGE_ENCODINGS)}")
    pixels = np.ascontiguousarray(pixels)
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(pixels.strides[0])
    msg.data = pixels.tobytes()
    return msg


# ---------------------------------------------------------------- depth images


@dataclass
class DepthInput:
    """A depth image converted for the engine, or why it cannot be used.

    Attributes:
        metres: (H, W) float32 depth in metres, 0 where unknown; None when the image is unusable.
        reason: a short fixed code of the problem (``encoding``, ``size``, ``layout``, ``no-valid-depth``),
            None when usable; keys throttled warnings and the diagnostics counter.
        error: what is wrong and how to fix it, None when usable.
    """

    metres: np.ndarray | None
    reason: str | None = None
    error: str | None = None


def parse_depth(msg: Image, size: tuple[int, int]) -> DepthInput:
    """Decode a depth image registered to an (H, W) = ``size`` colour image; never raises.

    ``16UC1`` is millimetres (0 = unknown), ``32FC1`` metres (0, NaN and ±inf = unknown), as REP 118
    defines them; ``step`` (row padding) and ``is_bigendian`` are honoured. An image of another size,
    an unknown encoding, a short ``step`` or truncated ``data``, or one without a single valid pixel
    gives ``metres=None`` with the reason.
    """
    encoding = msg.encoding.strip()
    if encoding.upper() not in DEPTH_ENCODINGS:
        return DepthInput(
            None,
            "encoding",
            f"unsupported depth encoding {msg.encoding!r}; supported: {', '.join(DEPTH_ENCODINGS)} "
            "(millimetres / metres)",
        )
    kind, metres_per_unit = DEPTH_ENCODINGS[encoding.upper()]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if (height, width) != tuple(size):
        return DepthInput(
            None,
            "size",
            f"depth image is {width}×{height} but the colour image is {size[1]}×{size[0]}: use a depth "
            "image registered to the colour image (e.g. aligned_depth_to_color/image_raw)",
        )
    itemsize = np.dtype(kind).itemsize
    row_bytes = width * itemsize
    data = np.frombuffer(msg.data, dtype=np.uint8)
    needed = step * (height - 1) + row_bytes
    if step < row_bytes or step % itemsize or data.size < needed:
        return DepthInput(
            None,
            "layout",
            f"depth data inconsistent with its header: {data.size} bytes, step {step}, for {width}×{height} "
            f"{encoding} (step must be a multiple of {itemsize} and at least {row_bytes}; data at least "
            f"step × (height − 1) + {row_bytes} bytes)",
        )
    rows = np.lib.stride_tricks.as_strided(data, shape=(height, row_bytes), strides=(step, 1))
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    metres = np.ascontiguousarray(rows).view(dtype).reshape(height, width).astype(np.float32)
    if metres_per_unit != 1.0:
        metres *= np.float32(metres_per_unit)
    # NaN fails ``> 0``; +inf is the only other non-finite value left.
    metres[~(metres > 0.0) | (metres == np.inf)] = 0.0
    if not metres.any():
        return DepthInput(
            None, "no-valid-depth", f"no valid pixel in the {width}×{height} {encoding} depth image"
        )
    return DepthInput(metres)


def depth_to_image(metres: np.ndarray, header: Header | None = None, encoding: str = "16UC1") -> Image:
    """Encode (H, W) depth in metres (0 or NaN = unknown) as a tightly packed little-endian depth image:
    ``16UC1`` rounds to whole millimetres (0 = unknown, clipped at 65.535 m), ``32FC1`` keeps metres
    (NaN = unknown)."""
    if metres.ndim != 2:
        raise ImageConversionError(f"expected (H, W) depth in metres, got shape {metres.shape}")
    depth = np.asarray(metres, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0.0)
    if encoding == "16UC1":
        pixels = np.where(valid, np.clip(np.round(depth * 1000.0), 0, 65535), 0).astype("<u2")
    elif encoding == "32FC1":
        pixels = np.where(valid, depth, np.nan).astype("<f4")
    else:
        raise ImageConversionError(
            f"cannot encode depth as {encoding!r}; supported: {', '.join(DEPTH_ENCODINGS)}"
        )
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(pixels.shape[0]), int(pixels.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(pixels.strides[0])
    msg.data = pixels.tobytes()
    return msg


# ---------------------------------------------------------------- intrinsics


def intrinsics_from_camera_info(msg: CameraInfo) -> np.ndarray:
    """The (3, 3) float64 pinhole matrix of a *rectified* image described by ``msg``.

    Uses the projection matrix ``P`` (the intrinsics of the rectified image, as image_proc defines them)
    when it is set, else ``K``. Distortion coefficients are ignored: the node expects rectified images
    (``image_rect``) — see :func:`has_distortion` to warn about raw ones. Raises CameraInfoError unless
    fx, fy > 0 and every entry is finite.
    """
    P = np.asarray(msg.p, dtype=np.float64)
    if P.size == 12 and P[0] != 0.0:
        K = P.reshape(3, 4)[:, :3].copy()
        source = "P"
    else:
        K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3).copy()
        source = "K"
    if not np.all(np.isfinite(K)):
        raise CameraInfoError(f"camera_info {source} has non-finite entries: {K.ravel().tolist()}")
    if K[0, 0] <= 0.0 or K[1, 1] <= 0.0:
        raise CameraInfoError(
            f"camera_info {source} has fx = {K[0, 0]}, fy = {K[1, 1]}; both must be > 0 "
            "(uncalibrated camera?)"
        )
    if not np.allclose(K[2], (0.0, 0.0, 1.0)):
        raise CameraInfoError(f"camera_info {source} last row must be (0, 0, 1), got {K[2].tolist()}")
    if msg.binning_x > 1 or msg.binning_y > 1:
        raise CameraInfoError(f"camera_info binning {msg.binning_x}×{msg.binning_y} is not supported")
    roi = msg.roi
    if (roi.width or roi.height or roi.x_offset or roi.y_offset) and (
        (roi.width, roi.height) != (msg.width, msg.height) or roi.x_offset or roi.y_offset
    ):
        raise CameraInfoError(
            f"camera_info ROI {roi.width}×{roi.height}+{roi.x_offset}+{roi.y_offset} is not supported"
        )
    return K


def has_distortion(msg: CameraInfo) -> bool:
    """Whether ``msg`` carries non-zero distortion (a hint that the image may not be rectified)."""
    return bool(np.any(np.abs(np.asarray(msg.d, dtype=np.float64)) > 0.0))


# ---------------------------------------------------------------- poses


def quaternion_to_matrix(x: float, y: float, z: float, w: float) -> np.ndarray:
    """(3, 3) float64 rotation of a unit quaternion (Hamilton convention, ROS order x, y, z, w)."""
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quaternion(R: np.ndarray) -> tuple[float, float, float, float]:
    """Unit quaternion (x, y, z, w), w >= 0, of a (3, 3) rotation matrix (Shepperd's method)."""
    m = np.asarray(R, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0.0:
        s = 2.0 * math.sqrt(trace + 1.0)
        q = ((m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s)
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = (0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s)
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = ((m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s)
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = ((m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s)
    quat = np.array(q) / np.linalg.norm(q)
    if quat[3] < 0.0:
        quat = -quat
    return float(quat[0]), float(quat[1]), float(quat[2]), float(quat[3])


def pose_to_matrix(pose: Pose) -> tuple[np.ndarray, str | None]:
    """(4, 4) float64 transform of a ``geometry_msgs/Pose`` and a warning (or None).

    A quaternion whose norm is off by more than ``QUATERNION_WARN_TOLERANCE`` is normalised and the
    warning says so. Raises PoseError for a non-finite position or a NaN / zero-length quaternion.
    """
    p, q = pose.position, pose.orientation
    position = np.array([p.x, p.y, p.z], dtype=np.float64)
    quat = np.array([q.x, q.y, q.z, q.w], dtype=np.float64)
    if not np.all(np.isfinite(position)):
        raise PoseError(f"non-finite position {position.tolist()}")
    if not np.all(np.isfinite(quat)):
        raise PoseError(f"non-finite quaternion {quat.tolist()}")
    # Scale by the largest component first: the norm of a quaternion with components beyond ~1e154
    # overflows to inf, and quat / inf would be a zero quaternion, i.e. the identity rotation.
    largest = float(np.abs(quat).max())
    unit = quat / largest if largest > 0.0 else quat
    norm = largest * float(np.linalg.norm(unit))
    if norm < QUATERNION_MIN_NORM:
        raise PoseError(f"zero-length quaternion {quat.tolist()} (unset orientation?)")
    warning = None
    if abs(norm - 1.0) > QUATERNION_WARN_TOLERANCE:
        warning = f"quaternion norm {norm:.4g} != 1, normalised"
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(*(unit / np.linalg.norm(unit)))
    T[:3, 3] = position
    return T, warning


def matrix_to_pose(T: np.ndarray) -> Pose:
    """``geometry_msgs/Pose`` of a (4, 4) rigid transform (metres)."""
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in T[:3, 3])
    pose.orientation = _quaternion_msg(T)
    return pose


def matrix_to_transform(T: np.ndarray) -> Transform:
    """``geometry_msgs/Transform`` of a (4, 4) rigid transform (metres)."""
    transform = Transform()
    transform.translation.x, transform.translation.y, transform.translation.z = (float(v) for v in T[:3, 3])
    transform.rotation = _quaternion_msg(T)
    return transform


def _quaternion_msg(T: np.ndarray) -> Quaternion:
    x, y, z, w = matrix_to_quaternion(T[:3, :3])
    return Quaternion(x=x, y=y, z=z, w=w)


# ---------------------------------------------------------------- detections in


@dataclass
class DetectionInput:
    """One input ``Detection3D`` as the node sees it.

    Attributes:
        index: position in the input array (output keeps the order).
        class_id: ``results[0].hypothesis.class_id`` ("" when the detection has no result).
        instance_id: stable output id, see :func:`instance_ids`.
        pose: (4, 4) float64 initial model→camera pose, or None when it cannot be used.
        error: why the detection cannot be refined (None when it can).
        reason: a short fixed code of ``error`` ("no-results", "empty-class-id", "invalid-pose"), the key
            that throttles its warning (the text carries values and would make every message new).
        warning: something fixed on the way (e.g. a normalised quaternion), or None.
    """

    index: int
    class_id: str
    instance_id: str
    pose: np.ndarray | None
    error: str | None = None
    reason: str | None = None
    warning: str | None = None


def parse_detections(msg: Detection3DArray) -> list[DetectionInput]:
    """Read every detection's class id and initial pose from ``results[0]``; never raises.

    A detection without results or with an unusable pose gets ``pose=None`` and an ``error``.
    """
    class_ids = [d.results[0].hypothesis.class_id if d.results else "" for d in msg.detections]
    ids = instance_ids(class_ids, [d.id for d in msg.detections])
    parsed = []
    for index, (detection, class_id, instance_id) in enumerate(
        zip(msg.detections, class_ids, ids, strict=True)
    ):
        item = DetectionInput(index=index, class_id=class_id, instance_id=instance_id, pose=None)
        if not detection.results:
            item.reason = "no-results"
            item.error = "detection has no results (class id and initial pose expected in results[0])"
        elif not class_id:
            item.reason = "empty-class-id"
            item.error = "results[0].hypothesis.class_id is empty"
        else:
            try:
                item.pose, item.warning = pose_to_matrix(detection.results[0].pose.pose)
            except PoseError as error:
                item.reason = "invalid-pose"
                item.error = f"invalid initial pose: {error}"
        parsed.append(item)
    return parsed


def instance_ids(class_ids: Sequence[str], input_ids: Sequence[str]) -> list[str]:
    """Stable output ids ``<class_id>_<index>``, unique within the frame.

    ``index`` is the input ``Detection3D.id`` when the detector sets one (a tracker id stays stable
    across frames), else the running count of that class in the frame (0, 1, ...). A repeated id gets
    ``_<n>`` appended so that no two TF frames of one image collide. Characters that are not allowed in
    a TF frame id (anything but ASCII letters, digits, ``_``, ``-``, ``.``) become ``_``; the id is
    both the output ``Detection3D.id`` and the TF frame name.
    """
    counts: dict[str, int] = {}
    used: set[str] = set()
    result = []
    for class_id, input_id in zip(class_ids, input_ids, strict=True):
        name = class_id or "unknown"
        if input_id:
            candidate = f"{name}_{input_id}"
        else:
            candidate = f"{name}_{counts.get(name, 0)}"
            counts[name] = counts.get(name, 0) + 1
        candidate = _frame_safe(candidate)
        unique, n = candidate, 1
        while unique in used:
            unique = f"{candidate}_{n}"
            n += 1
        used.add(unique)
        result.append(unique)
    return result


def _frame_safe(name: str) -> str:
    """``name`` with every character outside ASCII letters, digits, ``_``, ``-`` and ``.`` replaced by
    ``_`` (TF frame ids are ASCII names; a non-ASCII letter would not survive every TF consumer)."""
    return "".join(c if (c.isascii() and c.isalnum()) or c in "_-." else "_" for c in name)


# ---------------------------------------------------------------- detections out


@dataclass
class DetectionOutput:
    """What the node decided for one input detection.

    Attributes:
        pose: (4, 4) float64 refined model→camera pose, or None to pass the input pose through unchanged.
        score: in [0, 1] (0 for a detection that was not refined).
        extents: (3,) metres mesh bounding-box sides, or None when the class is unknown.
        center: (3,) metres mesh bounding-box centre in the model frame, or None.
    """

    pose: np.ndarray | None
    score: float
    extents: np.ndarray | None = None
    center: np.ndarray | None = None


def detection_array(
    header: Header,
    source: Detection3DArray,
    inputs: Sequence[DetectionInput],
    outputs: Sequence[DetectionOutput],
) -> Detection3DArray:
    """The output ``Detection3DArray``: header = image header, one detection per input, same order.

    ``results`` always holds exactly one hypothesis (class id kept, refined or passed-through pose,
    score); covariance is left zero (unknown) for refined poses and copied for passed-through ones.
    ``bbox`` is the mesh bounding box at the output pose when the pose and mesh are known, else the
    input ``bbox``.
    """
    out = Detection3DArray(header=header)
    for item, result, detection in zip(inputs, outputs, source.detections, strict=True):
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = item.class_id
        hypothesis.hypothesis.score = float(min(max(result.score, 0.0), 1.0))
        if result.pose is not None:
            hypothesis.pose.pose = matrix_to_pose(result.pose)
            box_pose = result.pose
        else:
            if detection.results:
                hypothesis.pose = detection.results[0].pose
            box_pose = item.pose
        output = Detection3D(header=header, id=item.instance_id, results=[hypothesis])
        if box_pose is not None and result.extents is not None and result.center is not None:
            output.bbox = bounding_box(box_pose, result.center, result.extents)
        else:
            output.bbox = detection.bbox
        out.detections.append(output)
    return out


def bounding_box(T: np.ndarray, center: np.ndarray, extents: np.ndarray) -> BoundingBox3D:
    """Mesh AABB (model-frame ``center`` (3,) and ``extents`` (3,), metres) posed by T (4, 4)."""
    box_pose = T.copy()
    box_pose[:3, 3] = T[:3, :3] @ np.asarray(center, dtype=np.float64) + T[:3, 3]
    box = BoundingBox3D(center=matrix_to_pose(box_pose))
    box.size.x, box.size.y, box.size.z = (float(v) for v in extents)
    return box


# ---------------------------------------------------------------- TF and markers


def object_transforms(header: Header, frames: Sequence[tuple[str, np.ndarray]]) -> list[TransformStamped]:
    """One ``TransformStamped`` per (child frame id, (4, 4) pose), parent = ``header.frame_id``,
    stamped with ``header.stamp`` (the image time, never re-stamped)."""
    transforms = []
    for child, T in frames:
        transform = TransformStamped(header=header, child_frame_id=child)
        transform.transform = matrix_to_transform(T)
        transforms.append(transform)
    return transforms


@dataclass
class MeshMarker:
    """A mesh to show in rviz: marker namespace suffix (the instance id), pose (4, 4), mesh, scale."""

    instance_id: str
    pose: np.ndarray
    mesh_uri: str
    scale: float


def mesh_markers(header: Header, meshes: Sequence[MeshMarker], vanished: Iterable[str]) -> MarkerArray:
    """``MESH_RESOURCE`` markers (namespace ``rnnpose/<instance_id>``, id 0) plus a ``DELETE`` for
    every instance id in ``vanished`` (shown in the previous message, absent now)."""
    markers = MarkerArray()
    for mesh in meshes:
        marker = Marker(header=header, ns=MARKER_NAMESPACE_PREFIX + mesh.instance_id, id=0)
        marker.type = Marker.MESH_RESOURCE
        marker.action = Marker.ADD
        marker.pose = matrix_to_pose(mesh.pose)
        marker.scale.x = marker.scale.y = marker.scale.z = float(mesh.scale)
        marker.color.r, marker.color.g, marker.color.b, marker.color.a = 1.0, 1.0, 1.0, 1.0
        marker.mesh_resource = mesh.mesh_uri
        marker.mesh_use_embedded_materials = True
        markers.markers.append(marker)
    for instance_id in vanished:
        marker = Marker(header=header, ns=MARKER_NAMESPACE_PREFIX + instance_id, id=0)
        marker.action = Marker.DELETE
        markers.markers.append(marker)
    return markers


# ---------------------------------------------------------------- debug overlay


@dataclass
class OverlayObject:
    """One object to draw: mesh ``vertices`` (N, 3) float32 m, ``faces`` (F, 3) int64, poses (4, 4)."""

    vertices: np.ndarray
    faces: np.ndarray
    initial_pose: np.ndarray | None
    refined_pose: np.ndarray | None


def overlay_image(
    rgb: np.ndarray, K: np.ndarray, objects: Sequence[OverlayObject], min_depth: float = 0.01
) -> np.ndarray:
    """(H, W, 3) uint8 RGB copy of ``rgb`` with each mesh's projected outline: initial pose in white,
    refined pose in red (drawn last, on top). Faces closer than ``min_depth`` (m) are skipped."""
    canvas = np.ascontiguousarray(rgb).copy()
    thickness = max(1, round(max(rgb.shape[:2]) / 400))
    for obj in objects:
        for pose, colour in ((obj.initial_pose, INITIAL_COLOUR_RGB), (obj.refined_pose, REFINED_COLOUR_RGB)):
            if pose is None:
                continue
            mask = silhouette(obj.vertices, obj.faces, pose, K, rgb.shape[:2], min_depth)
            contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(canvas, contours, -1, colour, thickness, lineType=cv2.LINE_AA)
    return canvas


def silhouette(
    vertices: np.ndarray,
    faces: np.ndarray,
    T: np.ndarray,
    K: np.ndarray,
    size: tuple[int, int],
    min_depth: float = 0.01,
) -> np.ndarray:
    """(H, W) uint8 mask (255 inside) of the mesh projected with pose T (4, 4) and intrinsics K (3, 3)."""
    height, width = size
    mask = np.zeros((height, width), np.uint8)
    camera = vertices.astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    in_front = camera[:, 2] > min_depth
    keep = in_front[faces].all(axis=1)
    if not keep.any():
        return mask
    pixels = project_to_pixels(np.where(in_front[:, None], camera, (0.0, 0.0, 1.0)), K)
    # Clamp far-off vertices so the fixed-point rasteriser cannot overflow.
    limit = 4.0 * max(height, width)
    pixels = np.clip(pixels, -limit, limit)
    triangles = np.round(pixels[faces[keep]] * 16.0).astype(np.int32)
    # One call per triangle: a single fillPoly over all triangles uses the even-odd rule and would leave
    # holes where triangles overlap.
    for triangle in triangles:
        cv2.fillConvexPoly(mask, triangle, 255, lineType=cv2.LINE_8, shift=4)
    return mask
