"""The correspondence-backend interface shared by the classical and the learned refiners.

The :class:`~rnnpose_ros.core.refiner.Refiner` owns the refinement loop and the pose solve; a backend
only produces dense 3D–2D correspondences. The loop (spec §1.4–§1.5) is the same for every backend::

    frame = backend.prepare_frame(image, K, models, T0)           # once per frame
    T = T0
    for r in range(config.outer_iterations):                       # render iterations
        view = backend.prepare_render(frame, T, r)                 # crop + render at T (+ per-render state)
        T_rel = I
        for k in range(config.inner_steps):                        # inner steps
            corr = backend.correspondences(frame, view, T_rel, k)  # target pixels + weights
            T_rel = solve_lm_step(T_rel, view.depth, view.K, corr.target, corr.weight, ...)
        T = T_rel · T

Where each backend's work lands:

=================  ==========================================  ===========================================
stage              classical (``classical.py``)                learned RNNPose (issue 5, spec §1)
=================  ==========================================  ===========================================
prepare_objects    vertex subset for crop windows              KPConv pyramid, 3D features A (N×288)
prepare_frame      image kept for cropping                     first 320 crop, K320, 2D descriptors D2
prepare_render     zoom crop, render RGB + depth, DIS flow     zoom crop 240, render RGB/depth/288-ch,
                   both ways, forward–backward weights         RAFT encoder, correlation pyramid, GRU init
correspondences    the flow target (fixed per render);         induced flow from T_rel, one GRU step,
                   the solver's robust kernel reweights        convex upsampling, descriptor weights
=================  ==========================================  ===========================================

All tensors are batched over the B valid instances of one frame, in one pass per stage. ``view.depth``
and ``view.K`` define the reference points X0 = depth·K⁻¹(u, v, 1) of the LM step (spec §2.10); the
relative pose T_rel maps reference-camera points to the corrected camera, and since crops only
change intrinsics, the absolute update is T ← T_rel·T in the original camera frame.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.solver import EP_LAMBDA, LM_LAMBDA, MAX_STEP, MIN_DEPTH


class BackendError(ValueError):
    """A backend cannot be created (unknown name, not implemented yet, missing weights)."""


@dataclass
class LMConfig:
    """Options of :func:`rnnpose_ros.core.solver.solve_lm_step` used at every inner step.

    Attributes:
        num_iters: Gauss–Newton iterations per inner step on the same correspondences (published: 1).
        robust: None (published), "huber" or "cauchy": IRLS kernel on the reprojection residual.
        robust_scale: kernel scale, pixels of the crop.
        ep_lambda: constant damping λ_ep (published 100).
        lm_lambda: relative damping λ_lm (published 1e-4).
        min_depth: correspondences need reference and moved depth above this, metres (published 0.1).
        max_step: per-component clamp of one increment, metres / radians (published 1).
        pose_dtype: dtype of the relative pose in the solve (published: float32).
    """

    num_iters: int = 1
    robust: str | None = None
    robust_scale: float = 2.0
    ep_lambda: float = EP_LAMBDA
    lm_lambda: float = LM_LAMBDA
    min_depth: float = MIN_DEPTH
    max_step: float = MAX_STEP
    pose_dtype: torch.dtype = torch.float32


@dataclass
class BackendConfig:
    """What every backend configuration provides to the refiner.

    Attributes:
        outer_iterations: render iterations (re-renders at the current pose).
        inner_steps: correspondence + LM steps per render iteration.
        lm: the pose-solve options.
        published_conventions: reproduce the published implementation's quirks (spec §1.8); True only
            where published checkpoints are used.
        min_correspondences: an instance with fewer weighted correspondences in a render iteration
            stops with status TOO_FEW_CORRESPONDENCES.
        score_inlier_px: residual threshold (pixels of the final crop) of the score (see refiner).
        max_translation_change: an instance whose translation moves by more than this many object
            diameters from its initial pose is reported DIVERGED.
        restart_below_score: an instance whose refinement ends with a score below this (or fails) is
            refined again from rotation hypotheses, and the result with the best score is kept
            (None: no restarts). It widens the rotation basin of a backend that is locally accurate.
        restart_angle_deg, restart_hypotheses: the hypotheses turn the initial pose by this angle
            about ``restart_hypotheses`` axes evenly spaced in the camera's x–y plane, through the
            model centre (out-of-plane errors are the ones a silhouette aligns worst).
    """

    outer_iterations: int = 3
    inner_steps: int = 4
    lm: LMConfig = field(default_factory=LMConfig)
    published_conventions: bool = False
    min_correspondences: int = 30
    score_inlier_px: float = 2.0
    max_translation_change: float = 2.0
    restart_below_score: float | None = None
    restart_angle_deg: float = 25.0
    restart_hypotheses: int = 4


@dataclass
class FrameState:
    """Per-frame state a backend builds in :meth:`CorrespondenceBackend.prepare_frame`.

    Attributes:
        image: (H, W, 3) uint8 RGB, the observed image.
        K: (3, 3) float64 camera intrinsics of ``image``.
        models: the B object models, one per instance (an object may appear several times).
    Backends subclass it to add their own per-frame tensors (e.g. the 320 crop and 2D descriptors).
    """

    image: np.ndarray
    K: np.ndarray
    models: list[ObjectModel]


@dataclass
class RenderState:
    """Per-render-iteration state from :meth:`CorrespondenceBackend.prepare_render`.

    Attributes:
        K: (B, 3, 3) float32 intrinsics of the reference crop, on the refiner's device.
        depth: (B, h, w) float32 rendered depth at the render pose, metres, 0 = background.
        crop_scale: (B,) float32 crop pixels per image pixel (to report residuals in image pixels).
    Backends subclass it to add their own (rendered features, flow, correlation pyramid, GRU state).
    """

    K: Tensor
    depth: Tensor
    crop_scale: Tensor


@dataclass
class Correspondences:
    """Dense 3D–2D correspondences of one inner step, on the reference pixels of the render.

    Attributes:
        target: (B, h, w, 2) float32 target pixel x* of every reference pixel (crop pixels, x first).
        weight: (B, h, w) float32 confidence in [0, 1]; 0 on background and rejected pixels.
    """

    target: Tensor
    weight: Tensor


class CorrespondenceBackend(ABC):
    """One correspondence stage of the refiner (see the module docstring for the call order).

    A backend instance belongs to one Refiner: its per-object caches live on it (keyed by class id,
    on the refiner's device). Every method is batched over the B instances of one frame.
    """

    name: str
    config: BackendConfig
    _renderer = None  # a shared Renderer given at construction, else created by :attr:`renderer`

    @property
    def renderer(self):
        """The renderer (created on first use: it opens an OpenGL context)."""
        if self._renderer is None:
            from rnnpose_ros.core.render import Renderer

            self._renderer = Renderer()
        return self._renderer

    def prepare_objects(self, models: Sequence[ObjectModel]) -> None:  # noqa: B027 (optional hook)
        """Build per-object caches once (learned: 3D features); called before each frame's first use."""

    @abstractmethod
    def prepare_frame(
        self, image: np.ndarray, K: np.ndarray, models: Sequence[ObjectModel], poses: Tensor
    ) -> FrameState:
        """Per-frame work shared by all render iterations.

        Args:
            image: (H, W, 3) uint8 RGB, validated.
            K: (3, 3) float64 intrinsics, validated.
            models: B object models, one per instance.
            poses: (B, 4, 4) float64 initial poses (model → camera, metres).
        """

    @abstractmethod
    def prepare_render(self, frame: FrameState, poses: Tensor, iteration: int) -> RenderState:
        """Crop and render at the current poses (B, 4, 4) float64; ``iteration`` counts from 0."""

    @abstractmethod
    def correspondences(
        self, frame: FrameState, view: RenderState, relative_pose: Tensor, step: int
    ) -> Correspondences:
        """Correspondences for inner step ``step`` given the relative pose T_rel (B, 4, 4)
        (dtype ``config.lm.pose_dtype``)."""
