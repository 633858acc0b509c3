"""What the camera saw in one frame: the engine's single input type for an image.

    observation = Observation(image, K)                 # RGB only
    observation = Observation(image, K, depth=depth)    # with a registered depth image

:meth:`Observation.validated` checks everything at the engine's edge and returns an observation in
canonical form (uint8 RGB, float64 K), so that backends never re-check their inputs. A new sensor
input is a new optional field here, validated here, and read by the backends that use it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np


class InputError(ValueError):
    """The image or the camera matrix of an :class:`Observation` cannot be used."""


@dataclass(frozen=True)
class Observation:
    """One camera frame.

    Attributes:
        image: (H, W, 3) uint8 RGB (a float image in [0, 1] is accepted and quantised by
            :meth:`validated`).
        K: (3, 3) pinhole intrinsics of ``image`` in pixels (no skew, no distortion: rectified images).
        depth: (H, W) float32 metric depth registered to ``image`` (same size and intrinsics), metres,
            0 or NaN where unknown; None for an RGB-only frame. Both backends crop it like the image
            and the refiner adds a depth term to every LM step (:mod:`rnnpose_ros.core.depth_term`).
        stamp: acquisition time in seconds (any clock the caller uses consistently), or None.
    """

    image: np.ndarray
    K: np.ndarray
    depth: np.ndarray | None = None
    stamp: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image, pixels."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def validated(self) -> Observation:
        """This observation with uint8 RGB and float64 K, or raise :class:`InputError` naming the problem."""
        image = _validate_image(self.image)
        K = _validate_intrinsics(self.K)
        depth = None if self.depth is None else _validate_depth(self.depth, image.shape[:2])
        return replace(self, image=image, K=K, depth=depth)


def _validate_image(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 RGB, or raise InputError naming the problem."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image must have shape (H, W, 3) (RGB), got {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise InputError(f"image is too small: {image.shape[1]}x{image.shape[0]} pixels")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise InputError("image contains NaN or infinite values")
        if image.min() < 0.0 or image.max() > 1.0:
            raise InputError(
                f"a floating-point image must lie in [0, 1], got [{image.min():.3g}, {image.max():.3g}]; "
                "pass uint8 RGB instead"
            )
        return np.round(image * 255.0).astype(np.uint8)
    raise InputError(f"image must be uint8 RGB (or float in [0, 1]), got dtype {image.dtype}")


def _validate_intrinsics(K: Any) -> np.ndarray:
    """(3, 3) float64 pinhole matrix, or raise InputError naming the problem."""
    try:
        K = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"K must be a 3x3 numeric matrix: {exc}") from exc
    if K.shape != (3, 3):
        raise InputError(f"K must have shape (3, 3), got {K.shape}")
    if not np.isfinite(K).all():
        raise InputError("K contains NaN or infinite values")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise InputError(f"K focal lengths must be positive, got fx={K[0, 0]:g}, fy={K[1, 1]:g}")
    if not np.allclose(K[2], (0.0, 0.0, 1.0)) or K[1, 0] != 0.0:
        raise InputError(
            f"K must be a pinhole matrix [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], got {K.tolist()}"
        )
    if abs(K[0, 1]) > 1e-6 * K[0, 0]:
        raise InputError(f"K has skew {K[0, 1]:g}; skewed intrinsics are not supported")
    return K


def _validate_depth(depth: Any, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 metres with unknown pixels as 0, or raise InputError naming the problem."""
    if not isinstance(depth, np.ndarray):
        raise InputError(f"depth must be a numpy array (H, W) in metres, got {type(depth).__name__}")
    if not np.issubdtype(depth.dtype, np.floating):
        # An integer image is millimetres (16UC1) far more often than metres: make the caller say so.
        raise InputError(f"depth must be floating-point metres, got dtype {depth.dtype} (convert mm first)")
    if depth.shape != size:
        raise InputError(f"depth must have the image's size {size}, got {depth.shape}")
    depth = depth.astype(np.float32)
    return np.where(np.isfinite(depth) & (depth > 0.0), depth, np.float32(0.0))
