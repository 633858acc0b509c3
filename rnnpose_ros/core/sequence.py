"""Synthetic image sequences for tracking: a moving camera over a still scene, sparse noisy detections.

The objects are placed once (as in :func:`~rnnpose_ros.core.synth.make_scene`); the camera then moves
smoothly, so in frame f every object's pose is ``M_f · T_0``, with M_f a rigid motion about the
scene's centre p (the mean object centre)::

    M_f(x) = R_f · (x − p) + p + d_f,   R_f = exp(ω ⊙ sin(2π t/P + φ_r)),   d_f = a ⊙ sin(2π t/P + φ_t)

t = f / fps seconds, per-axis amplitudes ω (rotation, radians) and a (translation, metres), period
P and random phases: a hand-held camera swaying around the scene. The background photograph pans
with the image motion of p. Light, colour gain and background are fixed per sequence; blur and noise
are drawn per frame. Every ``detect_every``-th frame carries detections: the ground truth perturbed
with the standard initial-pose noise (:func:`~rnnpose_ros.core.synth.perturb_pose`), one per
instance that is at least ``detect_min_visible`` visible, in random order and without ids (a
detector without a tracker).

An optional full occlusion hides every object behind a flat-coloured board (each object's bounding
box, grown by a quarter) for ``occlusion = (first frame, frame count)``.

Everything is deterministic given the models, the seed and the spec.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.observation import Observation
from rnnpose_ros.core.render import Renderer
from rnnpose_ros.core.synth import (
    InstanceRenders,
    Occluder,
    SceneError,
    SceneInstance,
    SceneSpec,
    compose_frame,
    fraction_in_view,
    perturb_pose,
    random_background,
    random_lighting,
    sample_object_pose,
)


@dataclass(frozen=True)
class SequenceSpec:
    """What :func:`make_sequence` generates.

    Attributes:
        frames: number of images.
        fps: frame rate of the motion, frames per second.
        detect_every: every this many frames (from frame 0) carries detections.
        detect_min_visible: an instance less visible than this is not detected.
        rotation_amplitude_deg: (3,) amplitude of the camera sway about the camera x, y, z axes, degrees.
        translation_amplitude: (3,) amplitude of the camera sway along x, y, z, metres.
        period_s: period of the sway, seconds.
        occlusion: (first frame, number of frames) during which every object is fully hidden, or None.
        min_in_view: each object keeps at least this share of its evaluation points in the image over
            the whole sequence (placements are redrawn until it does).
        scene: image, placement and noise options (``occluders`` is not used).
    """

    frames: int = 90
    fps: float = 30.0
    detect_every: int = 10
    detect_min_visible: float = 0.3
    rotation_amplitude_deg: tuple[float, float, float] = (8.0, 8.0, 12.0)
    translation_amplitude: tuple[float, float, float] = (0.04, 0.03, 0.05)
    period_s: float = 3.0
    occlusion: tuple[int, int] | None = None
    min_in_view: float = 0.8
    scene: SceneSpec = field(default_factory=lambda: SceneSpec(distance=(0.4, 0.8)))

    def __post_init__(self) -> None:
        if self.frames < 1 or self.detect_every < 1 or self.fps <= 0 or self.period_s <= 0:
            raise ValueError("frames, detect_every, fps and period_s must be positive")


@dataclass
class SequenceFrame:
    """One image of a sequence.

    Attributes:
        index: frame number (from 0).
        stamp: seconds since the first frame.
        image: (H, W, 3) uint8 RGB.
        K: (3, 3) float64 intrinsics.
        instances: ground truth per object (``pose_init`` is the detection when ``detected``).
        detections: indices into ``instances`` of the detected objects, in the detector's (random)
            order; empty on frames without detections.
    """

    index: int
    stamp: float
    image: np.ndarray
    K: np.ndarray
    instances: list[SceneInstance]
    detections: list[int]

    @property
    def observation(self) -> Observation:
        return Observation(self.image, self.K, stamp=self.stamp)

    @property
    def has_detections(self) -> bool:
        return bool(self.detections)


@dataclass
class _Motion:
    center: np.ndarray
    rot_amp: np.ndarray
    trans_amp: np.ndarray
    phase_r: np.ndarray
    phase_t: np.ndarray
    period_s: float

    def at(self, t: float) -> np.ndarray:
        """(4, 4) float64 rigid motion M(t) of the camera-frame scene (module docstring)."""
        angle = 2.0 * np.pi * t / self.period_s
        R = Rotation.from_rotvec(self.rot_amp * np.sin(angle + self.phase_r)).as_matrix()
        M = np.eye(4)
        M[:3, :3] = R
        M[:3, 3] = self.center - R @ self.center + self.trans_amp * np.sin(angle + self.phase_t)
        return M


def make_sequence(
    models: Sequence[ObjectModel], seed: int, renderer: Renderer, spec: SequenceSpec = SequenceSpec()
) -> Iterator[SequenceFrame]:
    """The frames of one sequence, rendered one at a time (module docstring).

    Raises:
        SceneError: no model, or no placement keeping the objects in view over the whole sequence.
    """
    models = list(models)
    if not models:
        raise SceneError("make_sequence needs at least one model")
    rng = np.random.default_rng(seed)
    scene = spec.scene
    K = scene.intrinsics()
    height, width = scene.size
    poses0, motion = _place(models, rng, spec, K)
    # The background photograph is larger than the image by the largest pan of the scene centre.
    pans = [_pan(K, motion.at(f / spec.fps), motion.center) for f in range(spec.frames)]
    pad = int(np.ceil(max(np.abs(pans).max(), 1.0))) + 1
    background, _ = random_background(rng, (height + 2 * pad, width + 2 * pad), scene.backgrounds)
    lighting = random_lighting(rng)
    occluder_colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)

    def hide(image_hi: np.ndarray, renders: InstanceRenders) -> list[Occluder]:
        """The full occlusion: a board of ``occluder_colour`` in front of every object."""
        boards = [(_covering_patch(mask), i) for i, mask in enumerate(renders.alone)]
        for region, _ in boards:
            image_hi[region] = occluder_colour
        return boards

    for f in range(spec.frames):
        t = f / spec.fps
        M = motion.at(t)
        poses = np.stack([M @ T for T in poses0])
        du, dv = pans[f]
        x0, y0 = round(pad - du), round(pad - dv)
        frame_background = np.ascontiguousarray(background[y0 : y0 + height, x0 : x0 + width])
        occluded = (
            spec.occlusion is not None and spec.occlusion[0] <= f < spec.occlusion[0] + spec.occlusion[1]
        )
        frame = compose_frame(
            renderer,
            models,
            poses,
            frame_background,
            lighting,
            rng,
            scene,
            occlude=hide if occluded else None,
        )
        instances = frame.instances
        detections: list[int] = []
        if f % spec.detect_every == 0:
            detections = [
                i for i, inst in enumerate(instances) if inst.visible_fraction >= spec.detect_min_visible
            ]
            rng.shuffle(detections)
            for i in detections:
                instances[i].pose_init = perturb_pose(
                    instances[i].pose_gt, rng, scene.rot_sigma_deg, scene.trans_sigma, scene.max_angle_deg
                )
        yield SequenceFrame(f, t, frame.image, K, instances, [int(i) for i in detections])


def _place(
    models: list[ObjectModel], rng: np.random.Generator, spec: SequenceSpec, K: np.ndarray
) -> tuple[np.ndarray, _Motion]:
    """Initial poses (N, 4, 4) and a motion keeping every object ``min_in_view`` in view throughout."""
    scene = spec.scene
    for _ in range(scene.max_tries):
        poses = np.stack(
            [sample_object_pose(m, rng, K, scene.size, scene.distance, scene.min_in_view) for m in models]
        )
        centres = np.stack([T[:3, :3] @ m.center + T[:3, 3] for T, m in zip(poses, models, strict=True)])
        motion = _Motion(
            center=centres.mean(0),
            rot_amp=np.radians(np.asarray(spec.rotation_amplitude_deg, dtype=np.float64)),
            trans_amp=np.asarray(spec.translation_amplitude, dtype=np.float64),
            phase_r=rng.uniform(0, 2 * np.pi, size=3),
            phase_t=rng.uniform(0, 2 * np.pi, size=3),
            period_s=spec.period_s,
        )
        if _separated(models, poses) and all(
            fraction_in_view(m.eval_points, motion.at(f / spec.fps) @ T, K, scene.size) >= spec.min_in_view
            for f in range(0, spec.frames, max(spec.frames // 30, 1))
            for m, T in zip(models, poses, strict=True)
        ):
            return poses, motion
    raise SceneError(f"could not place {len(models)} objects in view over {spec.frames} frames")


def _separated(models: list[ObjectModel], poses: np.ndarray) -> bool:
    """No two objects' bounding spheres overlap (instances that intersect are not a physical scene)."""
    centres = [T[:3, :3] @ m.center + T[:3, 3] for T, m in zip(poses, models, strict=True)]
    return all(
        np.linalg.norm(centres[i] - centres[j]) > models[i].bounding_radius + models[j].bounding_radius
        for i in range(len(models))
        for j in range(i + 1, len(models))
    )


def _pan(K: np.ndarray, M: np.ndarray, point: np.ndarray) -> np.ndarray:
    """(2,) image motion, pixels, of the camera-frame ``point`` (3,) under the motion M (4, 4)."""
    moved = M[:3, :3] @ point + M[:3, 3]
    return (K @ moved)[:2] / moved[2] - (K @ point)[:2] / point[2]


def _covering_patch(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the bounding box of the silhouette ``mask`` grown by a quarter of its size on each
    side (a board in front of the object, not an object-shaped patch a tracker could mistake for it)."""
    patch = np.zeros_like(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return patch
    grow_x, grow_y = (xs.max() - xs.min()) // 4 + 1, (ys.max() - ys.min()) // 4 + 1
    patch[
        max(ys.min() - grow_y, 0) : ys.max() + grow_y + 1, max(xs.min() - grow_x, 0) : xs.max() + grow_x + 1
    ] = True
    return patch
