"""The ``output_frame`` parameter: poses, boxes and TF of the node's outputs expressed in another frame.

Empty (the default) keeps every output in the image's optical frame. Set (e.g. ``base_link``), the
transform ``output_frame ← image frame`` is looked up with tf2 at the image stamp and every output pose
is premultiplied by it: ``~/detections`` (header, poses, boxes), the object TF frames (their parent)
and the markers. The debug overlay stays in the image, where it is drawn.

tf2 lookups need ``tf2_ros`` (a ROS 2 distribution); the PyPI wheels have none, so there a non-empty
``output_frame`` is a start-up error saying so, never a silent camera-frame output. A lookup that fails
at run time (no transform yet, a stamp outside the buffer, disconnected trees) publishes that frame in
the image frame with a throttled warning keyed ``output-frame``: never a crash, never a lost frame.

Threading: the tf2 listener's subscription runs in the executor; :meth:`OutputFrame.resolve` is called
from the worker thread (tf2's buffer is thread-safe).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
from geometry_msgs.msg import Pose
from rclpy.node import Node
from rclpy.time import Time
from std_msgs.msg import Header
from vision_msgs.msg import Detection3DArray

from rnnpose_ros.ros.conversions import PoseError, matrix_to_pose, pose_to_matrix, quaternion_to_matrix
from rnnpose_ros.ros.parameters import ParameterError

WARNING_KEY = "output-frame"


def tf2_available() -> bool:
    """Whether ``tf2_ros`` (a ROS 2 distribution's TF library) is importable."""
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        return False
    return True


def transform_to_matrix(transform: Any) -> np.ndarray:
    """(4, 4) float64 of a ``geometry_msgs/Transform``."""
    q, t = transform.rotation, transform.translation
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(q.x, q.y, q.z, q.w)
    T[:3, 3] = (t.x, t.y, t.z)
    return T


class OutputFrame:
    """Where the node's outputs are expressed (module docstring).

    Args:
        node: the node (the tf2 listener subscribes through it).
        frame: the ``output_frame`` parameter; "" = the image frame.
        warn: ``warn(key, text)``, the node's throttled warning.
        buffer: a tf2 buffer (``lookup_transform(target, source, time)``) to use instead of creating a
            ``tf2_ros.Buffer`` with its listener.

    Raises:
        ParameterError: ``frame`` is set and neither ``tf2_ros`` nor ``buffer`` is available.
    """

    def __init__(self, node: Node, frame: str, warn: Callable[[str, str], None], buffer: Any = None):
        self.frame = frame
        self._warn = warn
        self._buffer = buffer
        self._listener = None
        if not frame or buffer is not None:
            return
        if not tf2_available():
            raise ParameterError(
                f"parameter 'output_frame' = {frame!r} needs tf2_ros to look up transforms, and this "
                "installation has none (the ROS 2 PyPI wheels do not ship it): install a ROS 2 "
                "distribution, or leave output_frame empty to publish in the image frame"
            )
        import tf2_ros

        self._buffer = tf2_ros.Buffer()
        self._listener = tf2_ros.TransformListener(self._buffer, node)

    def resolve(self, header: Header) -> tuple[Header, np.ndarray | None]:
        """The header of the outputs of an image with ``header`` and the (4, 4) transform from the image
        frame to it, or None when they stay in the image frame (no output frame, the same frame, an
        image without frame id, a failed lookup — the last two warned about)."""
        if not self.frame or self.frame == header.frame_id:
            return header, None
        if not header.frame_id:
            self._warn(WARNING_KEY, "image header.frame_id is empty: outputs stay without a frame")
            return header, None
        try:
            stamped = self._buffer.lookup_transform(self.frame, header.frame_id, Time.from_msg(header.stamp))
        except Exception as error:  # tf2's Lookup/Extrapolation/Connectivity errors, and any other
            self._warn(
                WARNING_KEY,
                f"no transform {header.frame_id} -> {self.frame} at the image stamp ({type(error).__name__}: "
                f"{error}): this frame's outputs are published in {header.frame_id}",
            )
            return header, None
        output = copy.deepcopy(header)
        output.frame_id = self.frame
        return output, transform_to_matrix(stamped.transform)


def express(message: Detection3DArray, header: Header, transform: np.ndarray | None) -> Detection3DArray:
    """``message`` (poses and boxes in the image frame) with ``header`` and every pose and box centre
    premultiplied by the (4, 4) ``transform``; unchanged when ``transform`` is None. A passed-through
    pose that is not a pose (NaN, zero quaternion) is left as the detector sent it."""
    if transform is None:
        return message
    message.header = header
    for detection in message.detections:
        detection.header = header
        for result in detection.results:
            result.pose.pose = _moved(result.pose.pose, transform)
        detection.bbox.center = _moved(detection.bbox.center, transform)
    return message


def _moved(pose: Pose, transform: np.ndarray) -> Pose:
    try:
        matrix, _ = pose_to_matrix(pose)
    except PoseError:
        return pose
    return matrix_to_pose(transform @ matrix)
