"""The correspondence-backend interface shared by the classical and the learned refiners.

The :class:`~rnnpose_ros.core.refiner.Refiner` owns the refinement loop and the pose solve; a backend
only produces dense 3D–2D correspondences. The loop (docs/method.md §1.4–§1.5) is the same for every
backend::

    frame = backend.prepare_frame(observation, models, T0)        # once per frame
    T = T0
    for r in range(config.outer_iterations):                       # render iterations
        view = backend.prepare_render(frame, T, r)                 # crop + render at T (+ per-render state)
        T_rel = I
        for k in range(config.inner_steps):                        # inner steps (core/loop.py)
            corr = backend.correspondences(frame, view, T_rel, k)  # target pixels + weights
            T_rel = solve_lm_step(T_rel, view.depth, view.K, corr.target, corr.weight, ...)
        T = T_rel · T

Where each backend's work lands:

=================  ==========================================  ===========================================
stage              classical (``classical.py``)                learned RNNPose (``learned.py``)
=================  ==========================================  ===========================================
prepare_objects    vertex subset for crop windows              KPConv pyramid, 3D features A (N×288)
prepare_frame      image kept for cropping                     first 320 crop, K320, 2D descriptors D2
prepare_render     zoom crop, render RGB + depth, DIS flow     zoom crop 240, render RGB/depth/288-ch,
                   both ways, forward–backward weights         RAFT encoder, correlation pyramid, GRU init
correspondences    the flow target (fixed per render);         induced flow from T_rel, one GRU step,
                   the solver's robust kernel reweights        convex upsampling, descriptor weights
=================  ==========================================  ===========================================

All tensors are batched over the B valid instances of one frame, in one pass per stage. ``view.depth``
and ``view.K`` define the reference points X0 = depth·K⁻¹(u, v, 1) of the LM step (docs/method.md
§2.10); the relative pose T_rel maps reference-camera points to the corrected camera, and since crops
only change intrinsics, the absolute update is T ← T_rel·T in the original camera frame.

A backend is generic over its own frame and view types, so it reads its own state without downcasts;
the refiner treats both as opaque.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor

from rnnpose_ros.core.backends import BackendError
from rnnpose_ros.core.loop import Correspondences, RefinerConfig
from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.observation import Observation


@dataclass
class FrameState:
    """Per-frame state a backend builds in :meth:`CorrespondenceBackend.prepare_frame`.

    Attributes:
        observation: the validated observation (uint8 RGB, float64 K).
        models: the B object models, one per instance (an object may appear several times).
    Backends subclass it to add their own per-frame tensors (e.g. the 320 crop and 2D descriptors).
    """

    observation: Observation
    models: list[ObjectModel]


@dataclass
class RenderState:
    """Per-render-iteration state from :meth:`CorrespondenceBackend.prepare_render`.

    Attributes:
        K: (B, 3, 3) float32 intrinsics of the reference crop, on the refiner's device.
        depth: (B, h, w) float32 rendered depth at the render pose, metres; background at or below
            the solver's ``min_depth`` (0 classically, 1e-5 m in the learned backend, as published).
        observed_depth: (B, h, w) float32 the observation's registered depth resampled into the same
            crop (nearest neighbour), metres, 0 = unknown; None when the frame has no depth.
    Backends subclass it to add their own (rendered features, flow, correlation pyramid, GRU state).
    """

    K: Tensor
    depth: Tensor
    observed_depth: Tensor | None = field(default=None, kw_only=True)


CachedT = TypeVar("CachedT")


class ObjectCache(Generic[CachedT]):
    """Per-object values built once, keyed by class id.

    An entry belongs to the model object it was built from: when another model is registered under
    the same class id (an object replaced at run time), the entry is built again. The cache refers to
    models weakly, so the entry of an object that is no longer used anywhere (removed at run time) is
    dropped at the next :meth:`prepare` instead of being kept for the life of the backend.
    """

    def __init__(self, build: Callable[[ObjectModel], CachedT]) -> None:
        self._build = build
        self._entries: dict[str, tuple[weakref.ref[ObjectModel], CachedT]] = {}

    def prepare(self, models: Sequence[ObjectModel]) -> None:
        """Build the entries of ``models`` that are missing or stale; drop those of released models."""
        for class_id in [key for key, (ref, _) in self._entries.items() if ref() is None]:
            del self._entries[class_id]
        for model in models:
            entry = self._entries.get(model.class_id)
            if entry is None or entry[0]() is not model:
                self._entries[model.class_id] = (weakref.ref(model), self._build(model))

    def __getitem__(self, model: ObjectModel) -> CachedT:
        entry = self._entries.get(model.class_id)
        if entry is None or entry[0]() is not model:
            raise KeyError(f"object {model.class_id!r} was not prepared (call prepare_objects first)")
        return entry[1]

    def __len__(self) -> int:
        return len(self._entries)


FrameT = TypeVar("FrameT", bound=FrameState)
ViewT = TypeVar("ViewT", bound=RenderState)


class CorrespondenceBackend(ABC, Generic[FrameT, ViewT]):
    """One correspondence stage of the refiner (see the module docstring for the call order).

    A backend instance belongs to one Refiner: its per-object caches live on it (an
    :class:`ObjectCache`, on the refiner's device). Every method is batched over the B instances of
    one frame.

    Args:
        device: torch device of the batched tensors.
        config: the backend's options (an instance of ``config_class``; None = its defaults).
        renderer: a shared renderer (:class:`~rnnpose_ros.core.renderers.RendererLike`; if None, the
            one :func:`~rnnpose_ros.core.renderers.make_renderer` chooses for ``device``, on first use).
    """

    name: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, device: torch.device | str, config: Any = None, renderer: Any = None) -> None:
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise BackendError(
                f"the {self.name} backend needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.device = torch.device(device)
        self._renderer = renderer

    @staticmethod
    @abstractmethod
    def default_loop() -> RefinerConfig:
        """The loop policy this backend is tuned for (schedule, solver, restarts)."""

    @property
    def renderer(self):
        """The renderer (made on first use by :func:`~rnnpose_ros.core.renderers.make_renderer`)."""
        if self._renderer is None:
            from rnnpose_ros.core.renderers import make_renderer

            self._renderer = make_renderer(self.device)
        return self._renderer

    @abstractmethod
    def prepare_objects(self, models: Sequence[ObjectModel]) -> None:
        """Build the per-object caches of ``models`` that are missing (learned: 3D features)."""

    @abstractmethod
    def prepare_frame(self, observation: Observation, models: Sequence[ObjectModel], poses: Tensor) -> FrameT:
        """Per-frame work shared by all render iterations.

        Args:
            observation: the validated observation.
            models: B object models, one per instance, prepared by :meth:`prepare_objects`.
            poses: (B, 4, 4) float64 initial poses (model → camera, metres).
        """

    @abstractmethod
    def prepare_render(self, frame: FrameT, poses: Tensor, iteration: int) -> ViewT:
        """Crop and render at the current poses (B, 4, 4) float64; ``iteration`` counts from 0."""

    @abstractmethod
    def correspondences(
        self, frame: FrameT, view: ViewT, relative_pose: Tensor, step: int
    ) -> Correspondences:
        """Correspondences for inner step ``step`` given the relative pose T_rel (B, 4, 4)
        (dtype ``RefinerConfig.lm.pose_dtype``)."""
