"""The registry of correspondence backends: the one place that names them.

The node, evaluate, bench and demo take their choices and help text from :data:`BACKENDS`. The
interface every backend implements is :class:`rnnpose_ros.core.backends.base.CorrespondenceBackend`;
adding a backend is a module beside ``classical.py`` plus one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the registry itself stays light: the node reads it before loading torch
    import torch

    from rnnpose_ros.core.backends.base import CorrespondenceBackend
    from rnnpose_ros.core.loop import RefinerConfig


class BackendError(ValueError):
    """A backend cannot be created or prepared (unknown name, wrong config, missing weights)."""


@dataclass(frozen=True)
class BackendInfo:
    """One registered backend.

    Attributes:
        name: the name users choose it by (node parameter ``backend``, ``--backend``).
        summary: one line for help texts.
        needs_weights: whether every object needs a weights file (``weights`` in objects.yaml).
        module, class_name: where the backend class lives (imported on first use: its
            dependencies are heavy).
    """

    name: str
    summary: str
    needs_weights: bool
    module: str
    class_name: str

    def backend_class(self) -> type[CorrespondenceBackend]:
        return getattr(importlib.import_module(self.module), self.class_name)

    def config_class(self) -> type:
        """The dataclass of the backend's options."""
        return self.backend_class().config_class

    def default_loop(self) -> RefinerConfig:
        """The loop policy the backend is tuned for."""
        return self.backend_class().default_loop()


BACKENDS: dict[str, BackendInfo] = {
    info.name: info
    for info in (
        BackendInfo(
            "classical",
            "render-and-compare with DIS optical flow; needs no weights",
            needs_weights=False,
            module="rnnpose_ros.core.backends.classical",
            class_name="ClassicalBackend",
        ),
        BackendInfo(
            "rnnpose",
            "the learned RNNPose networks; needs a weights file per object",
            needs_weights=True,
            module="rnnpose_ros.core.backends.learned",
            class_name="LearnedBackend",
        ),
    )
}


def backend_info(name: str) -> BackendInfo:
    """The registry entry of ``name``; raises BackendError naming the available ones."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def backend_help() -> str:
    """One line per backend, for command-line and parameter help."""
    return "; ".join(f"{info.name}: {info.summary}" for info in BACKENDS.values())


def create_backend(
    name: str, device: torch.device | str, config: Any = None, renderer: Any = None
) -> CorrespondenceBackend:
    """Instantiate backend ``name`` with its options (None = the backend's defaults).

    Raises:
        BackendError: unknown name, or options of the wrong type.
    """
    return backend_info(name).backend_class()(device=device, config=config, renderer=renderer)
