"""Host-side (NumPy) pinhole projection, for checks on vertex sets outside the batched torch path.

The batched, device-side twin is :func:`rnnpose_ros.core.geometry.project_points`. This module
imports NumPy only, so that the ROS adapter can draw overlays without loading torch.
"""

from __future__ import annotations

import numpy as np


def project_to_pixels(points_camera: np.ndarray, K: np.ndarray, min_depth: float | None = None) -> np.ndarray:
    """(N, 2) float64 pixels (x, y) of (N, 3) camera-frame points, metres, under the (3, 3) pinhole K.

    Args:
        min_depth: if given, depths are clamped to at least this (metres) before dividing, so points
            at or behind the camera plane give finite (meaningless) pixels instead of inf/NaN.
    """
    points = np.asarray(points_camera, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    z = points[:, 2:3] if min_depth is None else np.maximum(points[:, 2:3], min_depth)
    return points[:, :2] / z * np.diag(K)[:2] + K[:2, 2]
