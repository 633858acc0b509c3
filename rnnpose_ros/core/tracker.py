"""Tracking: a stateful layer over the stateless :class:`~rnnpose_ros.core.refiner.Refiner`.

Per track (class id + stable id, :mod:`rnnpose_ros.core.association`) the tracker keeps the last
refined pose, its score and stamp. Every image refines every live track from its previous pose —
predicted forward with a constant velocity when ``TrackerConfig.constant_velocity`` — with a short
schedule: ``TrackerConfig.outer_iterations`` render iterations taken from the *fine end* of the
backend's schedule (``RefinerConfig.first_iteration``), no restarts. That costs a fraction of a full
refinement, which a pose that moved only by one frame's motion does not need.

Loss is decided from the engine's own evidence, not a timer: a tracking refinement that fails (any
status other than OK) or ends with a score below ``lost_below_score`` or below
``lost_below_fraction`` of the track's reference score (that of the full refinement that started
it: the score an object reaches depends on its colours and the scene's) is *weak*; the track then
keeps its predicted pose, and after ``lost_after_frames`` consecutive weak frames it is lost —
dropped from the live tracks and reported once in :attr:`TrackUpdate.lost`.

Detections (seeds) may come with any image. Each is associated with a live track (detector id first,
then class + pose distance, :class:`~rnnpose_ros.core.association.InstanceIds`):

- an unmatched detection creates a track, fully refined from the detection's pose (unless the
  engine cannot refine it at all: status other than OK);
- a matched track that is weak is re-seeded: fully refined from the detection's pose (a full
  refinement has the wide basin a stale pose needs);
- a matched healthy track is tracked as usual: the detection's noisy pose (the standard noise is
  15° and 5 cm of depth) would be worse than the tracked one; if its score is below
  ``reseed_below_score`` it is also fully refined from the detection and the better-scoring result
  is kept (a track that started in a wrong pose gets corrected).

After refinement two tracks of one class closer than ``merge_distance`` diameters are one object
(a detection that fell outside the gate of its own track): the older track is kept. Velocities are
per second from the stamps (per frame when a stamp is missing).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from rnnpose_ros.core.association import Candidate, InstanceIds, pose_distance
from rnnpose_ros.core.objects import ObjectRegistry
from rnnpose_ros.core.observation import Observation
from rnnpose_ros.core.refiner import Instance, Refiner, RefineResult, RefineStatus


@dataclass
class TrackerConfig:
    """Tracking policy.

    Attributes:
        outer_iterations: render iterations of a tracking refinement (the last ones of the backend's
            schedule, see the module docstring).
        inner_steps: LM steps per render iteration (None: the backend's).
        constant_velocity: predict each track's pose from its last two refined poses.
        lost_below_score: a refinement scoring below this is weak (absolute floor).
        lost_below_fraction: a tracking refinement scoring below this fraction of the track's
            reference score (that of the full refinement that created or last re-seeded it) is weak:
            how well the score can get depends on the object and the scene (colours, light), so a
            drop relative to what this track achieved is the evidence of loss.
        reseed_below_score: a detection matched to a healthy track scoring below this also refines
            it fully from the detection, and the better-scoring of the two results is kept (a track
            that started in a wrong pose is corrected at the next detection).
        lost_after_frames: consecutive weak frames after which a track is lost.
        gate: largest pose distance (object diameters) between a detection and the track it seeds.
        merge_distance: two tracks of one class closer than this (diameters) are merged.
    """

    outer_iterations: int = 1
    inner_steps: int | None = None
    constant_velocity: bool = True
    lost_below_score: float = 0.1
    lost_below_fraction: float = 0.5
    reseed_below_score: float = 0.6
    lost_after_frames: int = 3
    gate: float = 1.0
    merge_distance: float = 0.25

    def __post_init__(self) -> None:
        if self.outer_iterations < 1 or self.lost_after_frames < 1:
            raise ValueError("outer_iterations and lost_after_frames must be at least 1")
        if self.inner_steps is not None and self.inner_steps < 1:
            raise ValueError("inner_steps must be at least 1 (or None)")
        for name in ("lost_below_score", "lost_below_fraction", "reseed_below_score"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.gate <= 0 or self.merge_distance < 0:
            raise ValueError("gate must be > 0 and merge_distance ≥ 0")


class TrackEvent(str, enum.Enum):
    """What happened to a track on one image."""

    CREATED = "created"  # a new detection, fully refined
    RESEEDED = "reseeded"  # a weak or unconfirmed track, fully refined from its detection
    TRACKED = "tracked"  # short refinement from the (predicted) previous pose
    WEAK = "weak"  # the refinement failed or scored low: the predicted pose is kept


@dataclass
class Track:
    """One tracked object instance.

    Attributes:
        track_id: stable id, ``<class_id>_<k>`` or from the detector (also the TF frame name).
        class_id: registry class.
        pose: (4, 4) float64 model→camera pose, metres (the last refined one, or the prediction while
            weak).
        score: score of the last refinement (0 when it failed).
        stamp: seconds of the image the pose belongs to (None when images carry no stamp).
        event: what happened on the last image.
        weak_frames: consecutive weak frames so far.
        reference_score: score of the full refinement that created or last re-seeded the track.
        created_frame: update count at creation (older tracks win merges).
        linear_velocity: (3,) float64 velocity of the model centre, metres per second (per frame
            without stamps), camera frame.
        angular_velocity: (3,) float64 rotation vector per second (per frame), camera frame.
    """

    track_id: str
    class_id: str
    pose: np.ndarray
    score: float
    stamp: float | None
    event: TrackEvent
    weak_frames: int = 0
    reference_score: float = 0.0
    created_frame: int = 0
    linear_velocity: np.ndarray = field(default_factory=lambda: np.zeros(3))
    angular_velocity: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def copy(self) -> Track:
        return dataclasses.replace(
            self,
            pose=self.pose.copy(),
            linear_velocity=self.linear_velocity.copy(),
            angular_velocity=self.angular_velocity.copy(),
        )


@dataclass
class Seed:
    """A detection given to the tracker.

    Attributes:
        class_id: registry class.
        pose: (4, 4) float64 model→camera pose from the detector, metres.
        given_id: the detector's instance id ("" when it has none).
    """

    class_id: str
    pose: np.ndarray
    given_id: str = ""


@dataclass
class TrackUpdate:
    """The tracker's answer for one image.

    Attributes:
        tracks: copies of the live tracks after the image, oldest first.
        lost: copies of the tracks lost on this image (last state before loss).
        seed_tracks: per seed, in input order, the id of the track it created or matched ("" when the
            seed could not be used: unknown class, unusable pose, or a new track the engine could not
            refine).
        seconds: wall time of the update (prediction, refinement, bookkeeping).
    """

    tracks: list[Track]
    lost: list[Track]
    seed_tracks: list[str]
    seconds: float


class Tracker:
    """Per-track state over a :class:`Refiner` (module docstring).

    Args:
        refiner: the full refiner (its schedule seeds tracks); the tracking refiner shares its backend
            and per-object caches.
        config: the tracking policy.
    """

    def __init__(self, refiner: Refiner, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self.refiner = refiner
        full = refiner.config
        inner = self.config.inner_steps or full.inner_steps
        outer = self.config.outer_iterations
        short = dataclasses.replace(
            full,
            outer_iterations=outer,
            first_iteration=max(full.first_iteration + full.outer_iterations - outer, 0),
            inner_steps=inner,
            restart_below_score=None,
        )
        self.short_refiner = refiner.with_config(short)
        self.ids = InstanceIds(
            InstanceIds.geometry_of(refiner.registry), gate=self.config.gate, forget_after=1
        )
        self._tracks: dict[str, Track] = {}
        self._updates = 0

    @property
    def tracks(self) -> list[Track]:
        """Copies of the live tracks, oldest first."""
        return [t.copy() for t in self._ordered()]

    def use_registry(self, registry: ObjectRegistry) -> None:
        """Refine with ``registry`` from now on (objects added, replaced or removed at run time); tracks of
        a class no longer registered are dropped."""
        self.refiner.registry = self.short_refiner.registry = registry
        self.ids.geometry = InstanceIds.geometry_of(registry)
        for name in [name for name, track in self._tracks.items() if track.class_id not in registry]:
            del self._tracks[name]

    def reset(self) -> None:
        """Drop every track."""
        self._tracks.clear()
        self.ids = InstanceIds(self.ids.geometry, gate=self.config.gate, forget_after=1)

    def update(
        self,
        observation: Observation,
        seeds: Sequence[Seed] = (),
        stop: Callable[[], bool] | None = None,
    ) -> TrackUpdate:
        """Advance every live track to ``observation`` and apply ``seeds`` (module docstring).

        Args:
            observation: the image; its ``stamp`` (seconds) times the velocities when set.
            seeds: detections on this image (any number, any order).
            stop: passed to the refiner (shutdown).

        Raises:
            InputError: the observation is unusable (the tracks are left unchanged).
            RefinementCancelledError: ``stop`` returned True (the tracks are left unchanged).
        """
        start = time.perf_counter()
        observation = observation.validated()
        stamp = observation.stamp
        usable = [i for i, s in enumerate(seeds) if self._usable(s)]
        names = self.ids.assign(
            [Candidate(seeds[i].class_id, seeds[i].pose, seeds[i].given_id) for i in usable]
        )
        seed_of = dict(zip(names, (seeds[i] for i in usable), strict=True))
        seed_tracks = [""] * len(seeds)
        for i, name in zip(usable, names, strict=True):
            seed_tracks[i] = name

        full: list[tuple[str, Seed]] = []
        for name, seed in seed_of.items():
            track = self._tracks.get(name)
            if track is None or track.weak_frames > 0 or track.score < self.config.reseed_below_score:
                full.append((name, seed))
        # Weak tracks with a detection are only re-seeded; low-scoring healthy ones are refined both ways.
        reseeded = {name for name, _ in full if name in self._tracks and self._tracks[name].weak_frames > 0}
        short = [t for t in self._ordered() if t.track_id not in reseeded]

        predicted = {t.track_id: self._predict(t, stamp) for t in short}
        full_results = self.refiner.refine(
            observation, [Instance(s.class_id, s.pose, name) for name, s in full], stop=stop
        )
        short_results = self.short_refiner.refine(
            observation, [Instance(t.class_id, predicted[t.track_id], t.track_id) for t in short], stop=stop
        )

        lost: list[Track] = []
        tracked = {t.track_id: (t, r) for t, r in zip(short, short_results, strict=True)}
        for (name, seed), result in zip(full, full_results, strict=True):
            old = self._tracks.get(name)
            if old is None:
                if result.status is not RefineStatus.OK:
                    continue  # a detection the engine cannot refine (e.g. behind the camera) starts no track
                old = Track(name, seed.class_id, seed.pose, 0.0, stamp, TrackEvent.CREATED)
                old.created_frame = self._updates
                self._tracks[name] = old
                self._apply(old, result, stamp, TrackEvent.CREATED, from_seed=True)
            elif name not in tracked or _better(result, tracked[name][1]):
                tracked.pop(name, None)
                self._apply(old, result, stamp, TrackEvent.RESEEDED, from_seed=True)
        for track, result in tracked.values():
            self._apply(
                track,
                result,
                stamp,
                TrackEvent.TRACKED,
                from_seed=False,
                prediction=predicted[track.track_id],
            )
            if track.weak_frames >= self.config.lost_after_frames:
                lost.append(self._tracks.pop(track.track_id))
                self.ids.forget(track.track_id)
        merged = self._merge()
        live = self._ordered()
        self.ids.observe([t.track_id for t in live], [t.class_id for t in live], [t.pose for t in live])
        self._updates += 1
        return TrackUpdate(
            tracks=[t.copy() for t in live],
            lost=[t.copy() for t in lost],
            seed_tracks=[
                merged.get(name, name) if name in self._tracks or name in merged else ""
                for name in seed_tracks
            ],
            seconds=time.perf_counter() - start,
        )

    # --- internals -------------------------------------------------------------------------------------

    def _usable(self, seed: Seed) -> bool:
        """A seed of a registered class with a finite (4, 4) pose."""
        pose = np.asarray(seed.pose)
        return (
            seed.class_id in self.refiner.registry and pose.shape == (4, 4) and bool(np.isfinite(pose).all())
        )

    def _ordered(self) -> list[Track]:
        return sorted(self._tracks.values(), key=lambda t: (t.created_frame, t.track_id))

    def _dt(self, track: Track, stamp: float | None) -> float:
        """Time from the track's pose to ``stamp``: seconds, or 1 frame without stamps."""
        if stamp is None or track.stamp is None:
            return 1.0
        return max(stamp - track.stamp, 0.0)

    def _predict(self, track: Track, stamp: float | None) -> np.ndarray:
        """(4, 4) pose of ``track`` at ``stamp``: constant velocity of its centre and rotation."""
        if not self.config.constant_velocity:
            return track.pose.copy()
        dt = self._dt(track, stamp)
        center = self.refiner.registry[track.class_id].center
        R = Rotation.from_rotvec(track.angular_velocity * dt).as_matrix() @ track.pose[:3, :3]
        c = track.pose[:3, :3] @ center + track.pose[:3, 3] + track.linear_velocity * dt
        pose = np.eye(4)
        pose[:3, :3] = R
        pose[:3, 3] = c - R @ center
        return pose

    def _apply(
        self,
        track: Track,
        result: RefineResult,
        stamp: float | None,
        event: TrackEvent,
        from_seed: bool,
        prediction: np.ndarray | None = None,
    ) -> None:
        """Record ``result`` on ``track``: a weak result keeps the prediction and counts a weak frame."""
        threshold = self.config.lost_below_score
        if not from_seed:
            threshold = max(threshold, self.config.lost_below_fraction * track.reference_score)
        weak = result.status is not RefineStatus.OK or result.score < threshold
        if weak and not from_seed:
            track.weak_frames += 1
            track.event = TrackEvent.WEAK
            track.score = result.score if result.status is RefineStatus.OK else 0.0
            if prediction is not None:
                track.pose = prediction
            track.stamp = stamp
            return
        new_pose = np.asarray(result.pose, dtype=np.float64)
        if not from_seed and self.config.constant_velocity:
            dt = self._dt(track, stamp)
            if dt > 0:
                center = self.refiner.registry[track.class_id].center
                old_c = track.pose[:3, :3] @ center + track.pose[:3, 3]
                new_c = new_pose[:3, :3] @ center + new_pose[:3, 3]
                turn = Rotation.from_matrix(new_pose[:3, :3] @ track.pose[:3, :3].T).as_rotvec()
                track.linear_velocity = (new_c - old_c) / dt
                track.angular_velocity = turn / dt
        else:
            track.linear_velocity = np.zeros(3)
            track.angular_velocity = np.zeros(3)
        track.pose = new_pose
        track.score = result.score if result.status is RefineStatus.OK else 0.0
        if from_seed:
            track.reference_score = track.score
        track.stamp = stamp
        track.event = event
        track.weak_frames = 1 if weak else 0

    def _merge(self) -> dict[str, str]:
        """Drop the younger of two tracks of one class within ``merge_distance``; returns dropped id →
        kept id."""
        dropped: dict[str, str] = {}
        live = self._ordered()
        for i, older in enumerate(live):
            if older.track_id not in self._tracks:
                continue
            model = self.refiner.registry[older.class_id]
            for younger in live[i + 1 :]:
                if younger.track_id not in self._tracks or younger.class_id != older.class_id:
                    continue
                if (
                    pose_distance(model.center, model.diameter, older.pose, younger.pose)
                    < self.config.merge_distance
                ):
                    del self._tracks[younger.track_id]
                    dropped[younger.track_id] = older.track_id
                    self.ids.forget(younger.track_id)
        return dropped


def _better(result: RefineResult, other: RefineResult) -> bool:
    """``result`` is OK and scores at least ``other`` (or ``other`` failed)."""
    return result.status is RefineStatus.OK and (
        other.status is not RefineStatus.OK or result.score >= other.score
    )
