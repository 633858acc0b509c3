"""The render-and-compare loop shared by every backend: its policy and one render iteration.

Per render iteration the reference (depth ``view.depth`` in a crop with intrinsics ``view.K``) is
rendered at the current pose; each inner step asks for dense correspondences given the relative pose
T_rel and solves one damped Gauss–Newton step (:func:`~rnnpose_ros.core.solver.solve_lm_step`)::

    T_rel = I
    for k in range(inner_steps):
        corr = correspond(T_rel, k)              # target pixel x* and weight w per reference pixel
        T_rel = solve_lm_step(T_rel, depth, K, corr.target, corr.weight, ...)

:func:`run_render_iteration` is that loop, used by the refiner (all backends), by the parity check
against the published implementation, and by training. The outer loop (re-rendering), divergence,
restarts and the score are the refiner's (:mod:`rnnpose_ros.core.refiner`), configured by
:class:`RefinerConfig`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from torch import Tensor

from rnnpose_ros.core.depth_term import DepthTermConfig
from rnnpose_ros.core.geometry import backproject_depth
from rnnpose_ros.core.solver import LMConfig, LMStep, solve_lm_step


@dataclass
class Convergence:
    """When an instance stops before the end of the schedule (checked after every render iteration).

    An instance has converged when, in one render iteration at index ≥ ``min_iterations`` − 1, the
    rendering already agreed with the image (mean correspondence displacement of the first inner step
    below ``flow_px`` crop pixels) and the whole iteration moved it by less than ``translation``
    object diameters and ``rotation_rad``. A converged instance keeps its pose; when every instance
    of a batch has converged or failed, the batch ends early. Each check costs one host
    synchronisation (the decision to stop), between render iterations.

    Attributes:
        min_iterations: render iterations always run (e.g. the coarse stages of a schedule).
        flow_px: mean flow threshold, pixels of the crop.
        translation: translation threshold, object diameters.
        rotation_rad: rotation threshold, radians.
    """

    min_iterations: int = 1
    flow_px: float = 0.5
    translation: float = 0.002
    rotation_rad: float = 0.002


@dataclass
class RefinerConfig:
    """The refiner's loop policy (each backend has its own default, see ``default_loop``).

    Attributes:
        outer_iterations: render iterations (re-renders at the current pose).
        first_iteration: index in the backend's schedule of the first render iteration (the backend's
            ``prepare_render`` sees ``first_iteration + r``): a short refinement from a pose that is
            already close (tracking) starts at the schedule's fine stage instead of its coarse one.
        inner_steps: correspondence + LM steps per render iteration.
        lm: the pose-solve options.
        min_correspondences: an instance with fewer weighted correspondences in an inner step stops
            with status TOO_FEW_CORRESPONDENCES.
        score_inlier_px: residual threshold τ (pixels of the final crop) of the score (see core/score.py).
        max_translation_change: an instance whose translation moves by more than this many object
            diameters from its initial pose is reported DIVERGED.
        restart_below_score: an instance whose refinement ends with a score below this (or fails) is
            refined again from rotation hypotheses, and the result with the best score is kept
            (None: no restarts). It widens the rotation basin of a backend that is locally accurate.
        restart_below_score_with_depth: the same threshold for an observation with depth (None: as
            ``restart_below_score``): the depth-aware score is another quantity (core/score.py), so
            its threshold is chosen on its own.
        restart_angle_deg, restart_hypotheses: the hypotheses turn the initial pose by this angle
            about ``restart_hypotheses`` axes evenly spaced in the camera's x–y plane, through the
            model centre (out-of-plane errors are the ones a silhouette aligns worst).
        max_batch: instances refined together at most; more (many detections, or restart
            hypotheses) run in consecutive batches of this size, so memory is bounded by one batch.
        convergence: early termination per instance (None: always the whole schedule).
        depth: the depth term's options (used when the observation has a depth image).
    """

    outer_iterations: int = 3
    first_iteration: int = 0
    inner_steps: int = 4
    lm: LMConfig = field(default_factory=LMConfig)
    min_correspondences: int = 30
    score_inlier_px: float = 3.0
    max_translation_change: float = 2.0
    restart_below_score: float | None = None
    restart_below_score_with_depth: float | None = None
    restart_angle_deg: float = 25.0
    restart_hypotheses: int = 4
    max_batch: int = 8
    convergence: Convergence | None = None
    depth: DepthTermConfig = field(default_factory=DepthTermConfig)

    def use_one_restart_threshold(self, score: float) -> None:
        """Restart below ``score`` on every frame, with or without depth (0 = never restart): a
        threshold the user sets replaces both of the backend's."""
        self.restart_below_score = score or None
        self.restart_below_score_with_depth = None

    def restart_threshold(self, with_depth: bool) -> float | None:
        """The score below which a result restarts (None: never), for an observation with or
        without depth."""
        if self.restart_below_score is None:
            return None
        if with_depth and self.restart_below_score_with_depth is not None:
            return self.restart_below_score_with_depth
        return self.restart_below_score


@dataclass
class Correspondences:
    """Dense 3D–2D correspondences of one inner step, on the reference pixels of the render.

    Attributes:
        target: (B, h, w, 2) float32 target pixel x* of every reference pixel (crop pixels, x first).
        weight: (B, h, w) float32 confidence in [0, 1]; 0 on background and rejected pixels.
    """

    target: Tensor
    weight: Tensor


CorrespondencesT = TypeVar("CorrespondencesT", bound=Correspondences)


@dataclass
class InnerStep(Generic[CorrespondencesT]):
    """One inner step: the relative pose it started from, its correspondences and the LM solve.

    Attributes:
        index: inner step within the render iteration (from 0).
        pose_in: (B, 4, 4) relative pose T_rel before the step (detached from earlier steps).
        correspondences: what ``correspond`` returned for it.
        solve: the LM step; ``solve.pose`` is T_rel after the step.
    """

    index: int
    pose_in: Tensor
    correspondences: CorrespondencesT
    solve: LMStep


def run_render_iteration(
    correspond: Callable[[Tensor, int], CorrespondencesT],
    depth: Tensor,
    K: Tensor,
    relative: Tensor,
    steps: int,
    lm: LMConfig,
    extra_terms: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> Iterator[InnerStep[CorrespondencesT]]:
    """The inner steps of one render iteration, one :class:`InnerStep` at a time.

    Args:
        correspond: (T_rel (B, 4, 4), step index) -> correspondences on the reference pixels.
        depth: (B, h, w) reference depth of the render, metres (background ≤ ``lm.min_depth``).
        K: (B, 3, 3) intrinsics of the reference crop.
        relative: (B, 4, 4) relative pose at the start (identity in the refiner), dtype
            ``lm.pose_dtype``.
        steps: number of inner steps.
        lm: the solve options.
        extra_terms: a further term of every LM iteration (the depth term), see
            :func:`~rnnpose_ros.core.solver.solve_lm_step`.

    Yields:
        One :class:`InnerStep` per inner step. The pose is detached before every step, so gradients
        flow through each step's correspondences and solve but not from one step into the next (the
        published gradient truncation). A caller may change what ``correspond`` returns between
        steps (the refiner zeroes the weights of instances that failed).
    """
    points = backproject_depth(depth.to(relative.dtype), K.to(relative.dtype))
    pixels = lm.solve_pixels(depth)
    for k in range(steps):
        relative = relative.detach()
        correspondences = correspond(relative, k)
        solve = solve_lm_step(
            relative,
            depth,
            K,
            correspondences.target,
            correspondences.weight,
            reference_points=points,
            extra_terms=extra_terms,
            pixels=pixels,
            **lm.solver_options(),
        )
        yield InnerStep(k, relative, correspondences, solve)
        relative = solve.pose
