"""Public engine API: refine the 6-DoF poses of all known-object instances of one image.

    refiner = Refiner(ObjectRegistry.from_yaml("config/objects.yaml"), backend="classical")
    results = refiner.refine(image, K, [Instance("duck", T0)])

The refiner validates inputs at the edge, batches every refinable instance of the frame, and runs the
render-and-compare loop shared by all backends (see :mod:`rnnpose_ros.core.backends.base`): per render
iteration the backend crops and renders at the current poses, per inner step it produces dense 3D–2D
correspondences, and the refiner solves one damped Gauss–Newton step (:func:`solve_lm_step`) for the
whole batch. Instances that cannot be refined get a status instead of an exception, and every input
instance has exactly one result, in input order.

Restarts (``config.restart_below_score``): instances whose refinement ends with a low score, or fails,
are refined again from ``restart_hypotheses`` rotation hypotheses (the initial pose turned by
``restart_angle_deg`` about axes in the camera's x–y plane, through the model centre), all of them in
one further batch, and the result with the best score is kept. A render-and-compare refiner is
accurate near the truth but has a limited basin for out-of-plane rotation; the score tells a
converged result from a stuck one.

Score (documented meaning, in [0, 1]): in the last render iteration, with the final relative pose,

    score = (1/N) · Σ_p w_p · [‖x*_p − π(K, T_rel·X0_p)‖ < τ]

over the N rendered object pixels p (reference depth > solver ``min_depth``), where x*_p is the
backend's correspondence target, w_p ∈ [0, 1] its confidence weight (classical: forward–backward
flow consistency; learned: descriptor similarity weight) and τ = ``config.score_inlier_px`` pixels of
the final crop. It is the weighted fraction of the rendered silhouette that agrees with the image
under the returned pose: 1 when every rendered pixel is matched confidently and consistently, lower
with misalignment, occlusion, or low confidence; 0 for instances that could not be refined.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from torch import Tensor

from rnnpose_ros.core.backends import create_backend
from rnnpose_ros.core.backends.base import BackendConfig, CorrespondenceBackend, Correspondences, RenderState
from rnnpose_ros.core.geometry import backproject_depth, pixel_grid, project_points
from rnnpose_ros.core.objects import ObjectModel, ObjectRegistry
from rnnpose_ros.core.solver import solve_lm_step

# Tolerance of the rigidity check on input rotations (max |RᵀR − I|); within it R is re-orthonormalised.
ROTATION_TOLERANCE = 1e-3
# Closest depth (m) a model vertex may have for the instance to count as in front of the camera.
NEAR_PLANE_M = 1e-3


class InputError(ValueError):
    """The image or the camera matrix given to :meth:`Refiner.refine` cannot be used."""


class RefineStatus(str, enum.Enum):
    """Outcome of one instance."""

    OK = "ok"
    OUTSIDE_IMAGE = "outside_image"
    BEHIND_CAMERA = "behind_camera"
    TOO_FEW_CORRESPONDENCES = "too_few_correspondences"
    UNKNOWN_CLASS = "unknown_class"
    INVALID_POSE = "invalid_pose"
    DIVERGED = "diverged"


# Failures detected inside the batched loop, encoded on the device as small integers (0 = OK).
_LOOP_FAILURES = (RefineStatus.OK, RefineStatus.TOO_FEW_CORRESPONDENCES, RefineStatus.DIVERGED)


@dataclass
class Instance:
    """One object instance to refine.

    Attributes:
        class_id: registry key of the object.
        pose: (4, 4) model → camera initial pose (OpenCV camera, metres).
        instance_id: caller's id, passed through to the result.
    """

    class_id: str
    pose: np.ndarray
    instance_id: str | None = None


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


@dataclass
class RefineResult:
    """Refinement outcome of one instance (the initial pose is returned when status is not OK).

    Attributes:
        pose: (4, 4) float64 refined pose; initial_pose: (4, 4) float64 as given (NaN-filled if the
        input was not a 4×4 array). score: see the module docstring. trace: one entry per inner step.
    """

    class_id: str
    instance_id: str | None
    pose: np.ndarray
    initial_pose: np.ndarray
    score: float
    status: RefineStatus
    message: str = ""
    trace: list[IterationTrace] = field(default_factory=list)


# What the batched loop returns per instance: pose, score, status, message, trace.
_Outcome = tuple[np.ndarray, float, RefineStatus, str, list[IterationTrace]]


class Refiner:
    """Render-and-compare pose refiner over an object registry.

    Args:
        registry: the known objects.
        backend: "classical" (DIS optical flow, no weights), "rnnpose" (learned, issue 5), or a
            ready :class:`CorrespondenceBackend` instance (then ``config`` and ``renderer`` are unused).
        device: torch device of the batched tensors ("cpu", "cuda", ...).
        config: the backend's config dataclass (default: the backend's own defaults).
        renderer: a shared :class:`~rnnpose_ros.core.render.Renderer` (created on first use if None).
    """

    def __init__(
        self,
        registry: ObjectRegistry,
        backend: str | CorrespondenceBackend = "classical",
        device: str | torch.device = "cpu",
        config: Any = None,
        renderer: Any = None,
    ) -> None:
        self.registry = registry
        self.device = torch.device(device)
        if isinstance(backend, CorrespondenceBackend):
            self.backend = backend
        else:
            self.backend = create_backend(backend, device=self.device, config=config, renderer=renderer)

    @property
    def config(self) -> BackendConfig:
        return self.backend.config

    def refine(
        self,
        image: np.ndarray,
        K: np.ndarray,
        instances: Sequence[Instance],
        observer: StepObserver | None = None,
    ) -> list[RefineResult]:
        """Refine every instance of one image.

        Args:
            image: (H, W, 3) uint8 RGB (a float image in [0, 1] is accepted and quantised).
            K: (3, 3) pinhole intrinsics in pixels (no skew, no distortion).
            instances: the instances to refine (any mix of classes, repeats allowed).
            observer: called with a :class:`StepSnapshot` after every inner step (visualisation,
                debugging); None on the product path, which then keeps nothing per step.

        Returns:
            One :class:`RefineResult` per instance, in input order.

        Raises:
            InputError: for an unusable image or K (never for a bad instance).
        """
        image = _validate_image(image)
        K = _validate_intrinsics(K)
        height, width = image.shape[:2]
        results: list[RefineResult | None] = [None] * len(instances)
        batch_index: list[int] = []
        batch_models: list[ObjectModel] = []
        batch_poses: list[np.ndarray] = []
        for i, instance in enumerate(instances):
            checked = self._check_instance(instance, K, height, width)
            if isinstance(checked, RefineResult):
                results[i] = checked
            else:
                model, pose = checked
                batch_index.append(i)
                batch_models.append(model)
                batch_poses.append(pose)
        if batch_index:
            refined = self._refine_batch(image, K, batch_models, np.stack(batch_poses), batch_index, observer)
            refined = self._restart_weak(image, K, batch_models, batch_poses, batch_index, refined, observer)
            for i, (pose, score, status, message, trace) in zip(batch_index, refined, strict=True):
                instance = instances[i]
                ok = status is RefineStatus.OK
                results[i] = RefineResult(
                    class_id=instance.class_id,
                    instance_id=instance.instance_id,
                    pose=pose if ok else _as_pose_array(instance.pose),
                    initial_pose=_as_pose_array(instance.pose),
                    score=score if ok else 0.0,
                    status=status,
                    message=message,
                    trace=trace,
                )
        return [r for r in results if r is not None]

    # --- per-instance validation -----------------------------------------------------------------------

    def _check_instance(
        self, instance: Instance, K: np.ndarray, height: int, width: int
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
        camera_points = model.vertices.astype(np.float64) @ pose[:3, :3].T + pose[:3, 3]
        if camera_points[:, 2].min() <= NEAR_PLANE_M:
            centre_z = float(pose[2, :3] @ model.center + pose[2, 3])
            where = "behind the camera" if centre_z <= 0 else "crossing the camera plane"
            return failed(RefineStatus.BEHIND_CAMERA, f"object is {where} (centre z = {centre_z:.3f} m)")
        pixels = camera_points[:, :2] / camera_points[:, 2:] * np.diag(K)[:2] + K[:2, 2]
        lo, hi = pixels.min(axis=0), pixels.max(axis=0)
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
        image: np.ndarray,
        K: np.ndarray,
        models: list[ObjectModel],
        initial: list[np.ndarray],
        instance_index: list[int],
        outcomes: list[_Outcome],
        observer: StepObserver | None,
    ) -> list[_Outcome]:
        """Refine weak outcomes again from rotation hypotheses (``config.restart_below_score``), all in
        one batch, and keep per instance the OK outcome with the best score (the first one if none)."""
        config = self.backend.config
        if config.restart_below_score is None:
            return outcomes
        weak = [
            b
            for b, (_, score, status, _, _) in enumerate(outcomes)
            if status is not RefineStatus.OK or score < config.restart_below_score
        ]
        if not weak:
            return outcomes
        owners, hypotheses = [], []
        for b in weak:
            hypotheses_b = rotation_hypotheses(
                initial[b], models[b].center, config.restart_angle_deg, config.restart_hypotheses
            )
            for pose in hypotheses_b:
                owners.append(b)
                hypotheses.append(pose)
        retried = self._refine_batch(
            image,
            K,
            [models[b] for b in owners],
            np.stack(hypotheses),
            [instance_index[b] for b in owners],
            observer,
        )
        best = list(outcomes)
        for b, outcome in zip(owners, retried, strict=True):
            _, score, status, _, _ = outcome
            if status is RefineStatus.OK and (best[b][2] is not RefineStatus.OK or score > best[b][1]):
                best[b] = outcome
        return best

    def _refine_batch(
        self,
        image: np.ndarray,
        K: np.ndarray,
        models: list[ObjectModel],
        initial: np.ndarray,
        instance_index: list[int],
        observer: StepObserver | None,
    ) -> list[_Outcome]:
        """Run the shared outer/inner loop on B valid instances; returns per-instance outcomes."""
        config = self.backend.config
        lm = config.lm
        device = self.device
        batch = len(models)
        poses = torch.as_tensor(initial, dtype=torch.float64, device=device)
        initial_t = poses.clone()
        diameters = torch.tensor([m.diameter for m in models], dtype=torch.float64, device=device)
        failure = torch.zeros(batch, dtype=torch.int64, device=device)  # index into _LOOP_FAILURES
        eye = torch.eye(4, dtype=lm.pose_dtype, device=device).expand(batch, 4, 4)
        trace_poses, trace_weight, trace_residual, trace_count, trace_flow = [], [], [], [], []

        self.backend.prepare_objects(models)
        frame = self.backend.prepare_frame(image, K, models, poses)
        view: RenderState | None = None
        corr: Correspondences | None = None
        relative = eye.clone()
        for outer in range(config.outer_iterations):
            view = self.backend.prepare_render(frame, poses, outer)
            relative = eye.clone()
            for inner in range(config.inner_steps):
                corr = self.backend.correspondences(frame, view, relative, inner)
                # Instances that failed keep a zero weight: their step is exactly 0 (b = 0).
                active = (failure == 0).to(corr.weight.dtype)[:, None, None]
                step = solve_lm_step(
                    relative,
                    view.depth,
                    view.K,
                    corr.target,
                    corr.weight * active,
                    num_iters=lm.num_iters,
                    ep_lambda=lm.ep_lambda,
                    lm_lambda=lm.lm_lambda,
                    min_depth=lm.min_depth,
                    max_step=lm.max_step,
                    robust=lm.robust,
                    robust_scale=lm.robust_scale,
                )
                relative = step.pose
                few = step.num_valid < config.min_correspondences
                failure = torch.where((failure == 0) & few, torch.ones_like(failure), failure)
                foreground = (view.depth > lm.min_depth).to(corr.weight.dtype)
                mean_weight = (corr.weight * foreground).sum((1, 2)) / foreground.sum((1, 2)).clamp_min(1.0)
                trace_poses.append(relative.to(torch.float64) @ poses)
                trace_weight.append(mean_weight)
                trace_residual.append(step.residual_rms)
                trace_count.append(step.num_valid)
                trace_flow.append(_mean_flow(corr.target, foreground))
                if observer is not None:
                    observer(
                        StepSnapshot(
                            outer,
                            inner,
                            instance_index,
                            trace_poses[-1],
                            view.K,
                            view.depth,
                            corr.target,
                            corr.weight,
                        )
                    )
            poses = torch.where((failure == 0)[:, None, None], relative.to(torch.float64) @ poses, poses)
            moved = torch.linalg.vector_norm(poses[:, :3, 3] - initial_t[:, :3, 3], dim=-1)
            centre_z = poses[:, 2, 3]
            diverged = ~torch.isfinite(poses).all(-1).all(-1) | (
                moved > config.max_translation_change * diameters
            )
            diverged = diverged | (centre_z <= 0)
            failure = torch.where((failure == 0) & diverged, torch.full_like(failure, 2), failure)

        scores = (
            self._score(view, corr, relative) if view is not None and corr is not None else torch.zeros(batch)
        )
        # One host transfer for the whole batch, after the loop.
        poses_np = poses.cpu().numpy()
        failure_np = failure.cpu().numpy()
        scores_np = scores.cpu().numpy()
        traces = _traces(
            trace_poses, trace_weight, trace_residual, trace_count, trace_flow, config.inner_steps
        )
        outcomes = []
        for b in range(batch):
            status = _LOOP_FAILURES[int(failure_np[b])]
            message = {
                RefineStatus.OK: "",
                RefineStatus.TOO_FEW_CORRESPONDENCES: (
                    f"fewer than {config.min_correspondences} weighted correspondences (object hidden, "
                    "too small, or lost); initial pose returned"
                ),
                RefineStatus.DIVERGED: (
                    f"pose moved more than {config.max_translation_change} diameters or behind the camera; "
                    "initial pose returned"
                ),
            }[status]
            outcomes.append((poses_np[b], float(scores_np[b]), status, message, traces[b]))
        return outcomes

    def _score(self, view: RenderState, corr: Correspondences, relative: Tensor) -> Tensor:
        """(B,) weighted inlier fraction of the last render iteration (module docstring)."""
        config = self.backend.config
        batch = view.depth.shape[0]
        rel = relative.to(torch.float64)
        X0 = backproject_depth(view.depth.to(torch.float64), view.K.to(torch.float64)).reshape(batch, -1, 3)
        X1 = X0 @ rel[:, :3, :3].transpose(-1, -2) + rel[:, None, :3, 3]
        pixels = project_points(X1, view.K.to(torch.float64))
        residual = torch.linalg.vector_norm(
            corr.target.reshape(batch, -1, 2).to(torch.float64) - pixels, dim=-1
        )
        foreground = view.depth.reshape(batch, -1) > config.lm.min_depth
        inlier = (residual < config.score_inlier_px) & foreground
        weight = corr.weight.reshape(batch, -1).to(torch.float64).clamp(0.0, 1.0)
        score = (weight * inlier).sum(-1) / foreground.sum(-1).clamp_min(1)
        return score.clamp(0.0, 1.0)


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
    length = torch.linalg.vector_norm(target - grid, dim=-1)
    return (length * foreground).sum((1, 2)) / foreground.sum((1, 2)).clamp_min(1.0)


def _traces(
    poses: list[Tensor],
    weights: list[Tensor],
    residuals: list[Tensor],
    counts: list[Tensor],
    flows: list[Tensor],
    inner_steps: int,
) -> list[list[IterationTrace]]:
    """Per-instance trace lists from per-step batched tensors (one host transfer each)."""
    if not poses:
        return []
    poses_np = torch.stack(poses, 1).cpu().numpy()  # (B, S, 4, 4)
    weights_np = torch.stack(weights, 1).cpu().numpy()
    residuals_np = torch.stack(residuals, 1).cpu().numpy()
    counts_np = torch.stack(counts, 1).cpu().numpy()
    flows_np = torch.stack(flows, 1).cpu().numpy()
    return [
        [
            IterationTrace(
                outer=s // inner_steps,
                inner=s % inner_steps,
                pose=poses_np[b, s],
                mean_weight=float(weights_np[b, s]),
                residual_px=float(residuals_np[b, s]),
                num_correspondences=int(counts_np[b, s]),
                flow_px=float(flows_np[b, s]),
            )
            for s in range(poses_np.shape[1])
        ]
        for b in range(poses_np.shape[0])
    ]


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
