"""A depth-camera model: what an RGB-D sensor makes of a scene's exact depth.

:func:`simulate_depth` turns an exact metric depth image (objects, occluders, background surface)
into what a registered ``aligned_depth_to_color`` topic carries: float32 metres, 0 where the sensor
has no value. The effects, in the order applied:

1. **Holes at depth edges**: pixels within ``edge_px`` of a jump larger than ``edge_jump_m`` lose
   their value with probability ``edge_hole_prob`` (stereo occlusion, structured-light shadowing);
   of the ones that keep it, ``flying_prob`` become *flying pixels*, a random mix of the depths on
   both sides of the jump (what multi-path and the matcher's window do at silhouettes).
2. **Grazing angles**: a surface seen at more than ``grazing_deg`` from its normal returns nothing.
3. **Axial noise** growing with the square of the distance (stereo: the disparity error is constant
   in pixels): σ_z(z) = ``sigma_0`` + ``sigma_2``·(z − ``z_0``)², metres, Gaussian.
4. **Dropouts**: each pixel is lost with probability ``dropout_prob``.
5. **Range**: values outside [``min_range_m``, ``max_range_m``] are holes.
6. **Quantisation** to ``quantum_m`` (1 mm: a 16UC1 image in millimetres).
7. **Misregistration**: the depth image is shifted by ``shift_px`` (dx, dy) whole pixels against the
   colour image (an imperfect colour↔depth extrinsic calibration), holes where it moves in.

Defaults: the axial noise of an Intel RealSense D435 at its default 848×480 resolution, from Intel's
formula RMS(z) = z²·s / (f·B) (Grunnet-Jepsen et al., "Best-Known-Methods for Tuning Intel RealSense
D400 Depth Cameras", 2018) with subpixel s = 0.08, f = 424 / tan(87°/2) = 447 px, baseline B = 50 mm:
σ_z = 0.0036·z² m (0.9 mm at 0.5 m, 3.6 mm at 1 m). :meth:`DepthSensorModel.kinect_v1` gives the
Kinect v1 fit of Nguyen, Izadi and Lovell (3DIMPVT 2012): σ_z = 0.0012 + 0.0019·(z − 0.4)² m.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class DepthSensorModel:
    """Parameters of :func:`simulate_depth` (module docstring; metres, pixels, probabilities in [0, 1]).

    Attributes:
        sigma_0, sigma_2, z_0: axial noise σ_z(z) = sigma_0 + sigma_2·(z − z_0)², metres (sigma_2 in 1/m).
        quantum_m: depth quantisation step, metres (0: none).
        edge_jump_m: a neighbour farther apart than this is a depth edge, metres.
        edge_px: width of the band around depth edges that holes and flying pixels affect, pixels.
        edge_hole_prob: probability that an edge-band pixel is a hole.
        flying_prob: probability that an edge-band pixel that is not a hole mixes both sides' depths.
        grazing_deg: surfaces seen more obliquely than this (angle between ray and normal) are holes.
        dropout_prob: probability that any pixel is a hole.
        min_range_m, max_range_m: the sensor's working range, metres.
        shift_px: (dx, dy) misregistration of depth against colour, whole pixels.
    """

    sigma_0: float = 0.0
    sigma_2: float = 0.0036
    z_0: float = 0.0
    quantum_m: float = 0.001
    edge_jump_m: float = 0.02
    edge_px: int = 1
    edge_hole_prob: float = 0.5
    flying_prob: float = 0.3
    grazing_deg: float = 80.0
    dropout_prob: float = 0.01
    min_range_m: float = 0.1
    max_range_m: float = 10.0
    shift_px: tuple[int, int] = (0, 0)

    @classmethod
    def kinect_v1(cls, **overrides) -> DepthSensorModel:
        """The Kinect v1 axial-noise fit (module docstring), other effects at their defaults."""
        return cls(**{"sigma_0": 0.0012, "sigma_2": 0.0019, "z_0": 0.4, **overrides})

    def sigma(self, z: np.ndarray) -> np.ndarray:
        """Axial noise standard deviation σ_z(z), metres, of depths ``z`` (metres), same shape."""
        return self.sigma_0 + self.sigma_2 * (np.asarray(z, dtype=np.float64) - self.z_0) ** 2


def simulate_depth(
    depth: np.ndarray, K: np.ndarray, rng: np.random.Generator, model: DepthSensorModel = DepthSensorModel()
) -> np.ndarray:
    """What the sensor ``model`` reports for an exact depth image.

    Args:
        depth: (H, W) exact metric depth (camera z), metres; 0 or inf where nothing is in range.
        K: (3, 3) intrinsics of the image, pixels (for the viewing angle).
        rng: the random stream of the sensor's noise.
        model: the sensor.

    Returns:
        (H, W) float32 depth, metres, 0 = no value.
    """
    exact = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float64)
    valid = exact > 0
    out = exact.copy()
    edge = _edge_band(exact, valid, model.edge_jump_m, model.edge_px)
    holes = edge & (rng.random(exact.shape) < model.edge_hole_prob)
    flying = edge & ~holes & (rng.random(exact.shape) < model.flying_prob)
    if flying.any():
        size = 2 * model.edge_px + 1
        near = cv2.erode(np.where(valid, exact, np.inf).astype(np.float32), np.ones((size, size), np.uint8))
        far = cv2.dilate(exact.astype(np.float32), np.ones((size, size), np.uint8))
        mix = rng.random(exact.shape)
        finite_near = np.where(np.isfinite(near), near, far)
        out = np.where(flying, mix * finite_near + (1.0 - mix) * far, out)
    holes |= _grazing(exact, valid & ~edge, K, model.grazing_deg)
    out = out + rng.normal(0.0, 1.0, exact.shape) * model.sigma(out)
    holes |= rng.random(exact.shape) < model.dropout_prob
    holes |= ~valid | (out < model.min_range_m) | (out > model.max_range_m)
    if model.quantum_m > 0:
        out = np.round(out / model.quantum_m) * model.quantum_m
    out = np.where(holes, 0.0, out).astype(np.float32)
    return _shift(out, model.shift_px)


def _edge_band(depth: np.ndarray, valid: np.ndarray, jump_m: float, width_px: int) -> np.ndarray:
    """(H, W) bool pixels within ``width_px`` of a neighbour pair differing by more than ``jump_m``
    (a pixel next to one without depth counts as an edge too)."""
    filled = np.where(valid, depth, 1e3)  # out-of-range reads as very far: its border is an edge
    jump = np.zeros(depth.shape, dtype=bool)
    jump[:, 1:] |= np.abs(np.diff(filled, axis=1)) > jump_m
    jump[:, :-1] |= np.abs(np.diff(filled, axis=1)) > jump_m
    jump[1:, :] |= np.abs(np.diff(filled, axis=0)) > jump_m
    jump[:-1, :] |= np.abs(np.diff(filled, axis=0)) > jump_m
    if width_px > 1:
        size = 2 * width_px - 1
        jump = cv2.dilate(jump.astype(np.uint8), np.ones((size, size), np.uint8)) > 0
    return jump & valid


def _grazing(depth: np.ndarray, valid: np.ndarray, K: np.ndarray, max_deg: float) -> np.ndarray:
    """(H, W) bool pixels of ``valid`` whose surface (normal from the depth image's neighbours) is seen
    at more than ``max_deg`` from its normal (pass ``valid`` without depth edges, where the
    neighbours belong to different surfaces)."""
    height, width = depth.shape
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    rays = np.stack(((u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)), -1)
    points = rays * depth[..., None]
    du = np.zeros_like(points)
    dv = np.zeros_like(points)
    du[:, 1:-1] = points[:, 2:] - points[:, :-2]
    dv[1:-1] = points[2:] - points[:-2]
    normal = np.cross(du, dv)
    norm = np.linalg.norm(normal, axis=-1)
    cosine = np.abs((normal * rays).sum(-1)) / np.maximum(norm * np.linalg.norm(rays, axis=-1), 1e-12)
    defined = valid & (norm > 0)
    return defined & (cosine < np.cos(np.radians(max_deg)))


def _shift(depth: np.ndarray, shift_px: tuple[int, int]) -> np.ndarray:
    """``depth`` moved by (dx, dy) whole pixels, 0 where it moves in."""
    dx, dy = int(shift_px[0]), int(shift_px[1])
    if dx == 0 and dy == 0:
        return depth
    height, width = depth.shape
    out = np.zeros_like(depth)
    out[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = depth[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out
