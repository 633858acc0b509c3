"""Public engine API: refine the 6-DoF poses of all known-object instances of one image.

    refiner = Refiner(ObjectRegistry.from_yaml("config/objects.yaml"), backend="classical")
    results = refiner.refine(Observation(image, K), [Instance("duck", T0)])

The refiner validates inputs at the edge, batches every refinable instance of the frame, and runs the
render-and-compare loop shared by all backends (see :mod:`rnnpose_ros.core.backends.base`): per render
iteration the backend crops and renders at the current poses, per inner step it produces dense 3D–2D
correspondences, and :func:`~rnnpose_ros.core.loop.run_render_iteration` solves one damped
Gauss–Newton step for the whole batch. The loop policy (schedule, solver options, divergence,
restarts, score) is a :class:`~rnnpose_ros.core.loop.RefinerConfig`; each backend has its own default.
Instances that cannot be refined get a status instead of an exception, and every input instance has
exactly one result, in input order.

Restarts (``config.restart_below_score``): instances whose refinement ends with a low score, or fails,
are refined again from ``restart_hypotheses`` rotation hypotheses (the initial pose turned by
``restart_angle_deg`` about axes in the camera's x–y plane, through the model centre), all of them in
one further batch, and the result with the best score is kept. A render-and-compare refiner is
accurate near the truth but has a limited basin for out-of-plane rotation; the score tells a
converged result from a stuck one.

Score (in [0, 1], defined in :mod:`rnnpose_ros.core.score`): the share of the confident evidence of the
last render iteration (its correspondences of every inner step, and the observed depth when there is
one) that the returned pose explains; pixels hidden by an occluder or without texture count neither
for nor against it. 0 for instances that could not be refined.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from torch import Tensor

from rnnpose_ros.core.backends import create_backend
from rnnpose_ros.core.backends.base import CorrespondenceBackend, RenderState
from rnnpose_ros.core.depth_term import DepthTerm
from rnnpose_ros.core.geometry import pixel_grid
from rnnpose_ros.core.loop import Convergence, Correspondences, InnerStep, RefinerConfig, run_render_iteration
from rnnpose_ros.core.objects import ObjectModel, ObjectRegistry
from rnnpose_ros.core.observation import Observation
from rnnpose_ros.core.pinhole import project_to_pixels
from rnnpose_ros.core.score import pose_score
from rnnpose_ros.core.symmetry import closest_equivalent

# Tolerance of the rigidity check on input rotations (max |RᵀR − I|); within it R is re-orthonormalised.
ROTATION_TOLERANCE = 1e-3
# Closest depth (m) a model vertex may have for the instance to count as in front of the camera.
NEAR_PLANE_M = 1e-3
# Farthest depth (m) of an object's centre that is refined: no camera resolves an object usefully
# beyond it, and depths near float limits break the renderer's projection (near = far).
FAR_LIMIT_M = 100.0


class RefineStatus(str, enum.Enum):
    """Outcome of one instance."""

    OK = "ok"
    OUTSIDE_IMAGE = "outside_image"
    BEHIND_CAMERA = "behind_camera"
    TOO_FEW_CORRESPONDENCES = "too_few_correspondences"
    UNKNOWN_CLASS = "unknown_class"
    INVALID_POSE = "invalid_pose"
    DIVERGED = "diverged"
    TOO_FAR = "too_far"
    ENGINE_ERROR = "engine_error"


@dataclass
class Instance:
    """One object instance to refine.

    Attributes:
        class_id: registry key of the object.
        pose: (4, 4) model → camera initial pose (OpenCV camera, metres).
        instance_id: caller's id, passed through to the result.
        reference: (4, 4) pose the result should stay nearest to among the poses a symmetric object
            cannot be told apart in (e.g. the previous frame's output, so a TF frame does not flip);
            None = ``pose``. Unused for an object without declared symmetries.
    """

    class_id: str
    pose: np.ndarray
    instance_id: str | None = None
    reference: np.ndarray | None = None


@dataclass
class IterationTrace:
    """State after one inner step.

    Attributes:
        outer: render iteration (from 0); inner: inner step within it (from 0).
        pose: (4, 4) float64 absolute pose after the step.
        mean_weight: mean correspondence weight over the rendered object pixels, in [0, 1].
        residual_px: weighted RMS reprojection residual before the step, pixels of the crop.
        num_correspondences: pixels with non-zero weight in the step.
        flow_px: mean correspondence displacement ‖x* − x‖ over the rendered object pixels, pixels
            of the crop (how far the image says the rendering must still move).
    """

    outer: int
    inner: int
    pose: np.ndarray
    mean_weight: float
    residual_px: float
    num_correspondences: int
    flow_px: float = 0.0


@dataclass
class StepSnapshot:
    """What a step observer receives after every inner step (tensors on the refiner's device).

    Attributes:
        outer, inner: iteration indices (from 0).
        instance_index: the input index of each of the B batch rows.
        pose: (B, 4, 4) float64 absolute pose estimate after the step.
        K: (B, 3, 3) intrinsics of the reference crop.
        depth: (B, h, w) reference depth of the crop, metres.
        target: (B, h, w, 2) correspondence targets, crop pixels.
        weight: (B, h, w) correspondence weights in [0, 1].
    """

    outer: int
    inner: int
    instance_index: list[int]
    pose: Tensor
    K: Tensor
    depth: Tensor
    target: Tensor
    weight: Tensor


StepObserver = Callable[[StepSnapshot], None]


class RefinementCancelledError(Exception):
    """The caller's ``stop`` callback asked :meth:`Refiner.refine` to stop (between two stages)."""


@dataclass(frozen=True)
class _Call:
    """What one :meth:`Refiner.refine` call carries through its batches."""

    observation: Observation
    observer: StepObserver | None
    stop: Callable[[], bool] | None

    def check_stop(self) -> None:
        if self.stop is not None and self.stop():
            raise RefinementCancelledError("refinement stopped on request")


@dataclass
class RefineResult:
    """Refinement outcome of one instance (the initial pose is returned when status is not OK).

    Attributes:
        pose: (4, 4) float64 refined pose; initial_pose: (4, 4) float64 as given (NaN-filled if the
        input was not a 4×4 array). score: see the module docstring. trace: one entry per inner step.
        restarted: the first refinement was weak and the rotation hypotheses were refined too.
    """

    class_id: str
    instance_id: str | None
    pose: np.ndarray
    initial_pose: np.ndarray
    score: float
    status: RefineStatus
    message: str = ""
    trace: list[IterationTrace] = field(default_factory=list)
    restarted: bool = False


@dataclass
class _Outcome:
    """What the batched loop gives one instance (refined pose or, on failure, the pose it stopped at)."""

    pose: np.ndarray
    score: float
    status: RefineStatus
    message: str
    trace: list[IterationTrace]
    restarted: bool = False

    def better_than(self, other: _Outcome) -> bool:
        """OK beats a failure; among OK outcomes the higher score wins."""
        return self.status is RefineStatus.OK and (
            other.status is not RefineStatus.OK or self.score > other.score
        )


class Refiner:
    """Render-and-compare pose refiner over an object registry.

    Args:
        registry: the known objects.
        backend: a name in :data:`~rnnpose_ros.core.backends.BACKENDS` ("classical": DIS optical flow,
            no weights; "rnnpose": the learned networks), or a ready
            :class:`~rnnpose_ros.core.backends.base.CorrespondenceBackend` (then ``backend_config`` and
            ``renderer`` are unused).
        device: torch device of the batched tensors ("cpu", "cuda", ...).
        config: the loop policy (default: the backend's own, ``default_loop()``).
        backend_config: the backend's options (default: the backend's defaults).
        renderer: a shared renderer (:class:`~rnnpose_ros.core.renderers.RendererLike`; if None, the
            one :func:`~rnnpose_ros.core.renderers.make_renderer` chooses for ``device``, on first use).
    """

    def __init__(
        self,
        registry: ObjectRegistry,
        backend: str | CorrespondenceBackend = "classical",
        device: str | torch.device = "cpu",
        config: RefinerConfig | None = None,
        backend_config: Any = None,
        renderer: Any = None,
    ) -> None:
        self.registry = registry
        self.device = torch.device(device)
        if isinstance(backend, CorrespondenceBackend):
            self.backend = backend
        else:
            self.backend = create_backend(
                backend, device=self.device, config=backend_config, renderer=renderer
            )
        self.config = config if config is not None else self.backend.default_loop()

    def with_config(self, config: RefinerConfig) -> Refiner:
        """A refiner with the loop policy ``config`` that shares this one's backend (and so its
        per-object caches), e.g. a short schedule for tracking beside the full one."""
        return Refiner(self.registry, backend=self.backend, device=self.device, config=config)

    def prepare(self, models: Sequence[ObjectModel] | None = None) -> None:
        """Build the backend's per-object caches now (default: every registered object), so that a
        missing or broken weights file shows at start rather than in the first frame.

        Raises:
            BackendError: an object cannot be prepared (e.g. its weights file is missing).
        """
        self.backend.prepare_objects(list(self.registry) if models is None else models)

    def refine(
        self,
        observation: Observation,
        instances: Sequence[Instance],
        observer: StepObserver | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> list[RefineResult]:
        """Refine every instance of one observation.

        Args:
            observation: the camera frame (image, intrinsics; validated here).
            instances: the instances to refine (any mix of classes, repeats allowed).
            observer: called with a :class:`StepSnapshot` after every inner step (visualisation,
                debugging); None on the product path, which then keeps nothing per step.
            stop: polled before every stage (frame preparation, render iteration, inner step); when
                it returns True the call ends with :class:`RefinementCancelledError`, so that a node can
                shut down within one stage's time instead of abandoning a thread in native code.

        Returns:
            One :class:`RefineResult` per instance, in input order.

        Raises:
            InputError: for an unusable image or K (never for a bad instance).
            RefinementCancelledError: ``stop`` returned True.
        """
        observation = observation.validated()
        call = _Call(observation, observer, stop)
        results: list[RefineResult | None] = [None] * len(instances)
        batch_index: list[int] = []
        batch_models: list[ObjectModel] = []
        batch_poses: list[np.ndarray] = []
        for i, instance in enumerate(instances):
            checked = self._check_instance(instance, observation)
            if isinstance(checked, RefineResult):
                results[i] = checked
            else:
                model, pose = checked
                batch_index.append(i)
                batch_models.append(model)
                batch_poses.append(pose)
        if batch_index:
            self.backend.prepare_objects(batch_models)
            outcomes = self._refine_chunked(call, batch_models, batch_poses, batch_index)
            outcomes = self._restart_weak(call, batch_models, batch_poses, batch_index, outcomes)
            for i, model, outcome in zip(batch_index, batch_models, outcomes, strict=True):
                instance = instances[i]
                ok = outcome.status is RefineStatus.OK
                pose = (
                    _symmetry_choice(outcome.pose, instance, model) if ok else _as_pose_array(instance.pose)
                )
                results[i] = RefineResult(
                    class_id=instance.class_id,
                    instance_id=instance.instance_id,
                    pose=pose,
                    initial_pose=_as_pose_array(instance.pose),
                    score=outcome.score if ok else 0.0,
                    status=outcome.status,
                    message=outcome.message,
                    trace=outcome.trace,
                    restarted=outcome.restarted,
                )
        return [r for r in results if r is not None]

    # --- per-instance validation -----------------------------------------------------------------------

    def _check_instance(
        self, instance: Instance, observation: Observation
    ) -> RefineResult | tuple[ObjectModel, np.ndarray]:
        """The model and re-orthonormalised pose of a refinable instance, or a failed result."""

        def failed(status: RefineStatus, message: str) -> RefineResult:
            initial = _as_pose_array(getattr(instance, "pose", None))
            return RefineResult(
                class_id=str(getattr(instance, "class_id", "")),
                instance_id=getattr(instance, "instance_id", None),
                pose=initial,
                initial_pose=initial.copy(),
                score=0.0,
                status=status,
                message=message,
            )

        class_id = getattr(instance, "class_id", None)
        if not isinstance(class_id, str) or class_id not in self.registry:
            known = ", ".join(self.registry.class_ids) or "(none)"
            return failed(
                RefineStatus.UNKNOWN_CLASS, f"unknown object class {class_id!r}; registered: {known}"
            )
        model = self.registry[class_id]
        pose, problem = _rigid_pose(getattr(instance, "pose", None))
        if pose is None:
            return failed(RefineStatus.INVALID_POSE, problem)
        centre_z = float(pose[2, :3] @ model.center + pose[2, 3])
        if centre_z > FAR_LIMIT_M:
            return failed(
                RefineStatus.TOO_FAR,
                f"object centre at z = {centre_z:.3g} m is beyond the {FAR_LIMIT_M:g} m depth limit",
            )
        camera_points = model.vertices.astype(np.float64) @ pose[:3, :3].T + pose[:3, 3]
        if camera_points[:, 2].min() <= NEAR_PLANE_M:
            where = "behind the camera" if centre_z <= 0 else "crossing the camera plane"
            return failed(RefineStatus.BEHIND_CAMERA, f"object is {where} (centre z = {centre_z:.3f} m)")
        pixels = project_to_pixels(camera_points, observation.K)
        lo, hi = pixels.min(axis=0), pixels.max(axis=0)
        height, width = observation.size
        if hi[0] < -0.5 or hi[1] < -0.5 or lo[0] > width - 0.5 or lo[1] > height - 0.5:
            return failed(
                RefineStatus.OUTSIDE_IMAGE,
                f"projection [{lo[0]:.0f}, {hi[0]:.0f}] x [{lo[1]:.0f}, {hi[1]:.0f}] px misses the "
                f"{width}x{height} image",
            )
        return model, pose

    # --- the batched loop --------------------------------------------------------------------------------

    def _restart_weak(
        self,
        call: _Call,
        models: list[ObjectModel],
        initial: list[np.ndarray],
        instance_index: list[int],
        outcomes: list[_Outcome],
    ) -> list[_Outcome]:
        """Refine weak outcomes again from rotation hypotheses (``config.restart_threshold``), all in
        one batch, and keep per instance the OK outcome with the best score (the first one if none)."""
        config = self.config
        threshold = config.restart_threshold(call.observation.depth is not None)
        if threshold is None:
            return outcomes
        weak = [
            b
            for b, outcome in enumerate(outcomes)
            if outcome.status is not RefineStatus.OK or outcome.score < threshold
        ]
        if not weak:
            return outcomes
        owners, hypotheses = [], []
        for b in weak:
            for pose in rotation_hypotheses(
                initial[b], models[b].center, config.restart_angle_deg, config.restart_hypotheses
            ):
                owners.append(b)
                hypotheses.append(pose)
        retried = self._refine_chunked(
            call, [models[b] for b in owners], hypotheses, [instance_index[b] for b in owners]
        )
        best = [replace(outcome, restarted=b in weak) for b, outcome in enumerate(outcomes)]
        for b, outcome in zip(owners, retried, strict=True):
            outcome = replace(outcome, restarted=True)
            if outcome.better_than(best[b]):
                best[b] = outcome
        return best

    def _refine_chunked(
        self, call: _Call, models: list[ObjectModel], initial: list[np.ndarray], instance_index: list[int]
    ) -> list[_Outcome]:
        """The instances in consecutive batches of at most ``config.max_batch``."""
        size = max(1, self.config.max_batch)
        return [
            outcome
            for start in range(0, len(models), size)
            for outcome in self._refine_isolated(
                call,
                models[start : start + size],
                initial[start : start + size],
                instance_index[start : start + size],
            )
        ]

    def _refine_isolated(
        self, call: _Call, models: list[ObjectModel], initial: list[np.ndarray], instance_index: list[int]
    ) -> list[_Outcome]:
        """:meth:`_refine_batch`, and where it raises, each instance alone, so that an instance the
        engine cannot handle costs only its own result (status ENGINE_ERROR), never its neighbours'."""
        try:
            return self._refine_batch(call, models, initial, instance_index)
        except RefinementCancelledError:
            raise
        except Exception as error:  # any failure of a stage: isolate the instance(s) it concerns
            if len(models) == 1:
                message = f"engine failed on this instance: {type(error).__name__}: {error}"
                return [_Outcome(initial[0], 0.0, RefineStatus.ENGINE_ERROR, message, [])]
            return [
                outcome
                for b in range(len(models))
                for outcome in self._refine_isolated(
                    call, models[b : b + 1], initial[b : b + 1], instance_index[b : b + 1]
                )
            ]

    def _refine_batch(
        self, call: _Call, models: list[ObjectModel], initial: list[np.ndarray], instance_index: list[int]
    ) -> list[_Outcome]:
        """Run the shared outer/inner loop on B valid instances; returns per-instance outcomes."""
        config = self.config
        batch = _BatchState.start(initial, models, self.device)
        call.check_stop()
        frame = self.backend.prepare_frame(call.observation, models, batch.poses)
        recorder = _TraceRecorder(config.lm.min_depth)
        last: tuple[RenderState, list[Correspondences], Tensor, DepthTerm | None] | None = None
        for outer in range(config.outer_iterations):
            call.check_stop()
            view = self.backend.prepare_render(frame, batch.poses, config.first_iteration + outer)
            depth_term = None
            if view.observed_depth is not None:
                depth_term = DepthTerm(
                    view.depth, view.K, view.observed_depth, batch.active(torch.float64), config.depth
                )

            def correspond(
                relative: Tensor,
                inner: int,
                view: RenderState = view,
                depth_term: DepthTerm | None = depth_term,
            ) -> Correspondences:
                call.check_stop()
                corr = self.backend.correspondences(frame, view, relative, inner)
                if depth_term is not None:  # where the image shows the object tells its depth layer
                    depth_term.guide(corr.target, corr.weight)
                # Instances that failed get zero weight: their step is exactly 0 (b = 0).
                return Correspondences(
                    corr.target, corr.weight * batch.active(corr.weight.dtype)[:, None, None]
                )

            relative = torch.eye(4, dtype=config.lm.pose_dtype, device=self.device).expand(len(models), 4, 4)
            steps: list[Correspondences] = []
            for step in run_render_iteration(
                correspond,
                view.depth,
                view.K,
                relative,
                config.inner_steps,
                config.lm,
                extra_terms=None if depth_term is None else depth_term.solver_terms,
            ):
                relative = step.solve.pose
                count = config.lm.correspondence_count(step.solve.num_valid)
                batch.fail_where(count < config.min_correspondences, RefineStatus.TOO_FEW_CORRESPONDENCES)
                recorder.record(step, view, batch.poses, count)
                if call.observer is not None:
                    call.observer(recorder.snapshot(outer, step, view, instance_index))
                steps.append(step.correspondences)
                last = (view, steps, relative, depth_term)
            moving = batch.moving()
            batch.advance(relative, config.max_translation_change)
            if last is not None:
                # An instance that stopped earlier is scored with the pose it kept.
                identity = torch.eye(4, dtype=relative.dtype, device=relative.device)
                last = (view, last[1], torch.where(moving[:, None, None], relative, identity), last[3])
            if config.convergence is not None and batch.converge(
                config.convergence, outer, relative, recorder.flows[-config.inner_steps]
            ):
                break
        scores = self._score(*last) if last is not None else torch.zeros(len(models))
        return batch.outcomes(scores, recorder, config)

    def _score(
        self, view: RenderState, steps: list[Correspondences], relative: Tensor, depth_term: DepthTerm | None
    ) -> Tensor:
        """(B,) score of the last render iteration (:func:`~rnnpose_ros.core.score.pose_score`)."""
        return pose_score(
            view.depth,
            view.K,
            steps,
            relative,
            depth_term,
            self.config.score_inlier_px,
            self.config.lm.min_depth,
        )


# Failures detected inside the batched loop, encoded on the device as small integers (0 = OK).
_LOOP_FAILURES = (RefineStatus.OK, RefineStatus.TOO_FEW_CORRESPONDENCES, RefineStatus.DIVERGED)


@dataclass
class _BatchState:
    """Poses and failures of the B instances of one batched run, on the refiner's device.

    Attributes:
        poses: (B, 4, 4) float64 current absolute poses (model → camera, metres).
        initial: (B, 4, 4) float64 starting poses.
        diameters: (B,) float64 object diameters, metres.
        failure: (B,) int64 index into ``_LOOP_FAILURES`` (0 = still fine); a failed instance keeps
            the pose it had when it failed.
    """

    poses: Tensor
    initial: Tensor
    diameters: Tensor
    failure: Tensor
    converged: Tensor
    converged_at: Tensor

    @classmethod
    def start(
        cls, initial: Sequence[np.ndarray], models: Sequence[ObjectModel], device: torch.device
    ) -> _BatchState:
        poses = torch.as_tensor(np.stack(initial), dtype=torch.float64, device=device)
        return cls(
            poses=poses,
            initial=poses.clone(),
            diameters=torch.tensor([m.diameter for m in models], dtype=torch.float64, device=device),
            failure=torch.zeros(len(models), dtype=torch.int64, device=device),
            converged=torch.zeros(len(models), dtype=torch.bool, device=device),
            converged_at=torch.full((len(models),), -1, dtype=torch.int64, device=device),
        )

    def active(self, dtype: torch.dtype) -> Tensor:
        """(B,) 1 for instances not failed, 0 for failed ones."""
        return (self.failure == 0).to(dtype)

    def moving(self) -> Tensor:
        """(B,) bool: instances whose pose still changes (neither failed nor converged)."""
        return (self.failure == 0) & ~self.converged

    def converge(self, rule: Convergence, outer: int, relative: Tensor, first_flow: Tensor) -> bool:
        """Mark the instances that converged in render iteration ``outer`` (relative pose (B, 4, 4) of
        the iteration, (B,) mean flow of its first inner step, crop pixels); returns whether every
        instance has now converged or failed (one host synchronisation)."""
        if outer + 1 < rule.min_iterations:
            return False
        relative = relative.to(torch.float64)
        moved = torch.linalg.vector_norm(relative[:, :3, 3], dim=-1) / self.diameters
        cos_angle = ((torch.diagonal(relative[:, :3, :3], dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(
            -1.0, 1.0
        )
        still = (
            (first_flow.to(torch.float64) < rule.flow_px)
            & (moved < rule.translation)
            & (cos_angle > math.cos(rule.rotation_rad))
        )
        newly = still & (self.failure == 0) & ~self.converged
        self.converged_at = torch.where(newly, outer, self.converged_at)
        self.converged = self.converged | newly
        return bool((self.converged | (self.failure != 0)).all())

    def fail_where(self, condition: Tensor, status: RefineStatus) -> None:
        """Mark the still-active instances where ``condition`` (B,) holds as failed with ``status``."""
        code = torch.full_like(self.failure, _LOOP_FAILURES.index(status))
        self.failure = torch.where((self.failure == 0) & condition, code, self.failure)

    def advance(self, relative: Tensor, max_translation_change: float) -> None:
        """Apply the render iteration's relative poses to the moving instances, then mark DIVERGED those
        that left the camera's front, became non-finite or moved more than ``max_translation_change``
        diameters from their start."""
        moved_poses = relative.to(torch.float64) @ self.poses
        self.poses = torch.where(self.moving()[:, None, None], moved_poses, self.poses)
        moved = torch.linalg.vector_norm(self.poses[:, :3, 3] - self.initial[:, :3, 3], dim=-1)
        diverged = (
            ~torch.isfinite(self.poses).all(-1).all(-1)
            | (moved > max_translation_change * self.diameters)
            | (self.poses[:, 2, 3] <= 0)
        )
        self.fail_where(diverged, RefineStatus.DIVERGED)

    def outcomes(self, scores: Tensor, recorder: _TraceRecorder, config: RefinerConfig) -> list[_Outcome]:
        """Per-instance outcomes, with one host transfer for the whole batch (poses, statuses, scores
        and every trace figure packed into one float64 tensor; counts are exact in it)."""
        batch = self.poses.shape[0]
        head = torch.cat(
            (
                self.poses.reshape(batch, 16),
                self.failure[:, None].to(torch.float64),
                scores[:, None].to(device=self.poses.device, dtype=torch.float64),
                self.converged_at[:, None].to(torch.float64),
            ),
            1,
        )
        figures = recorder.stacked()
        packed = head if figures is None else torch.cat((head, figures.flatten(1)), 1)
        host = packed.cpu().numpy()
        poses, failure, scores_np, converged_at = (
            host[:, :16].reshape(-1, 4, 4),
            host[:, 16],
            host[:, 17],
            host[:, 18],
        )
        traces = (
            []
            if figures is None
            else recorder.traces(host[:, 19:].reshape(batch, -1, _TraceRecorder.WIDTH), config.inner_steps)
        )
        messages = {
            RefineStatus.OK: "",
            RefineStatus.TOO_FEW_CORRESPONDENCES: (
                f"fewer than {config.min_correspondences} weighted correspondences (object hidden, "
                "too small, or lost); initial pose returned"
            ),
            RefineStatus.DIVERGED: (
                f"pose moved more than {config.max_translation_change} diameters or behind the camera; "
                "initial pose returned"
            ),
        }
        outcomes = []
        for b in range(batch):
            status = _LOOP_FAILURES[int(failure[b])]
            trace = traces[b] if traces else []
            if converged_at[b] >= 0:  # the steps after convergence did not move it
                trace = trace[: (int(converged_at[b]) + 1) * config.inner_steps]
            outcomes.append(_Outcome(poses[b], float(scores_np[b]), status, messages[status], trace))
        return outcomes


class _TraceRecorder:
    """Per-step batched figures of a run, turned into per-instance :class:`IterationTrace` lists at the
    end (transferred to the host with the outcomes, :meth:`_BatchState.outcomes`)."""

    #: Figures per step in :meth:`stacked`: pose (16), mean weight, residual, count, flow.
    WIDTH = 20

    def __init__(self, min_depth: float) -> None:
        self.min_depth = min_depth
        self.poses: list[Tensor] = []
        self.weights: list[Tensor] = []
        self.residuals: list[Tensor] = []
        self.counts: list[Tensor] = []
        self.flows: list[Tensor] = []

    def record(self, step: InnerStep, view: RenderState, poses: Tensor, count: Tensor) -> None:
        """Keep the figures of one inner step (``count``: its (B,) weighted correspondences)."""
        corr = step.correspondences
        foreground = (view.depth > self.min_depth).to(corr.weight.dtype)
        self.poses.append(step.solve.pose.to(torch.float64) @ poses)
        self.weights.append((corr.weight * foreground).sum((1, 2)) / foreground.sum((1, 2)).clamp_min(1.0))
        self.residuals.append(step.solve.residual_rms)
        self.counts.append(count)
        self.flows.append(_mean_flow(corr.target, foreground))

    def snapshot(
        self, outer: int, step: InnerStep, view: RenderState, instance_index: list[int]
    ) -> StepSnapshot:
        corr = step.correspondences
        return StepSnapshot(
            outer, step.index, instance_index, self.poses[-1], view.K, view.depth, corr.target, corr.weight
        )

    def stacked(self) -> Tensor | None:
        """(B, S, WIDTH) float64 figures of the S steps recorded, or None before the first."""
        if not self.poses:
            return None
        scalars = [
            torch.stack(values, 1).to(torch.float64)[..., None]
            for values in (self.weights, self.residuals, self.counts, self.flows)
        ]
        poses = torch.stack(self.poses, 1)
        return torch.cat((poses.flatten(2), *scalars), -1)

    @staticmethod
    def traces(figures: np.ndarray, inner_steps: int) -> list[list[IterationTrace]]:
        """Per-instance traces from :meth:`stacked`'s figures on the host, (B, S, WIDTH)."""
        return [
            [
                IterationTrace(
                    outer=s // inner_steps,
                    inner=s % inner_steps,
                    pose=row[:16].reshape(4, 4),
                    mean_weight=float(row[16]),
                    residual_px=float(row[17]),
                    num_correspondences=int(row[18]),
                    flow_px=float(row[19]),
                )
                for s, row in enumerate(steps)
            ]
            for steps in figures
        ]


def rotation_hypotheses(
    pose: np.ndarray, center: np.ndarray, angle_deg: float, count: int = 4
) -> list[np.ndarray]:
    """``count`` (4, 4) float64 poses: ``pose`` turned by ``angle_deg`` about axes in the camera's x–y
    plane evenly spaced from +x (4: +x, +y, −x, −y), through the model centre ``center`` (3,) (model
    frame, metres), which stays where it was."""
    out = []
    centre_cam = pose[:3, :3] @ center + pose[:3, 3]
    for phi in np.arange(count) * (2.0 * np.pi / count):
        axis = np.array([np.cos(phi), np.sin(phi), 0.0])
        turn = Rotation.from_rotvec(np.radians(angle_deg) * axis).as_matrix()
        turned = pose.copy()
        turned[:3, :3] = turn @ pose[:3, :3]
        turned[:3, 3] = centre_cam - turned[:3, :3] @ center
        out.append(turned)
    return out


def _mean_flow(target: Tensor, foreground: Tensor) -> Tensor:
    """(B,) mean ‖x* − x‖ over the foreground pixels of (B, h, w, 2) targets, crop pixels."""
    _, height, width, _ = target.shape
    grid = pixel_grid(height, width, target.dtype, target.device)
    flow = target - grid
    length = torch.hypot(flow[..., 0], flow[..., 1])  # vector_norm over a last axis of 2 is slower
    return (length * foreground).sum((1, 2)) / foreground.sum((1, 2)).clamp_min(1.0)


def _symmetry_choice(pose: np.ndarray, instance: Instance, model: ObjectModel) -> np.ndarray:
    """``pose`` or, for a symmetric object, its equivalent nearest to the instance's reference (or
    initial) rotation (:func:`~rnnpose_ros.core.symmetry.closest_equivalent`)."""
    if not model.symmetries:
        return pose
    reference = instance.reference if instance.reference is not None else instance.pose
    reference = np.asarray(reference, dtype=np.float64)
    if reference.shape != (4, 4) or not np.isfinite(reference).all():
        return pose  # an unusable reference leaves the refined pose as the engine found it
    return closest_equivalent(pose, reference, model.symmetries)


def _as_pose_array(pose: Any) -> np.ndarray:
    """The input pose as a (4, 4) float64 array, NaN-filled if it is not one."""
    try:
        array = np.array(pose, dtype=np.float64)
    except (TypeError, ValueError):
        return np.full((4, 4), np.nan)
    return array if array.shape == (4, 4) else np.full((4, 4), np.nan)


def _rigid_pose(pose: Any) -> tuple[np.ndarray | None, str]:
    """(re-orthonormalised (4, 4) float64 pose, "") or (None, reason)."""
    try:
        array = np.array(pose, dtype=np.float64)
    except (TypeError, ValueError):
        return None, f"pose is not numeric: {type(pose).__name__}"
    if array.shape != (4, 4):
        return None, f"pose must be a (4, 4) matrix, got shape {array.shape}"
    if not np.isfinite(array).all():
        return None, "pose contains NaN or infinite values"
    if not np.allclose(array[3], (0.0, 0.0, 0.0, 1.0), atol=1e-6):
        return None, f"pose bottom row must be [0, 0, 0, 1], got {array[3].tolist()}"
    R = array[:3, :3]
    error = float(np.abs(R.T @ R - np.eye(3)).max())
    if error > ROTATION_TOLERANCE or np.linalg.det(R) <= 0:
        return (
            None,
            f"pose rotation is not a rotation (max |RᵀR − I| = {error:.2g}, det = {np.linalg.det(R):.3g})",
        )
    # Polar decomposition: the closest rotation, R·(RᵀR)^(-1/2) = U·Vᵀ.
    U, _, Vt = np.linalg.svd(R)
    array[:3, :3] = U @ Vt
    return array, ""
