"""Correspondence backends of the refiner and their factory.

``classical``: render-and-compare with DIS optical flow and robust weights (no learned weights).
``rnnpose``: the learned RNNPose loop (module ``learned.py``, issue 5).
The interface both implement is :class:`rnnpose_ros.core.backends.base.CorrespondenceBackend`.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from rnnpose_ros.core.backends.base import BackendError, CorrespondenceBackend

# name -> (module, class) so that a backend's heavy imports happen only when it is used.
BACKENDS: dict[str, tuple[str, str]] = {
    "classical": ("rnnpose_ros.core.backends.classical", "ClassicalBackend"),
    "rnnpose": ("rnnpose_ros.core.backends.learned", "LearnedBackend"),
}


def create_backend(
    name: str, device: torch.device, config: Any = None, renderer: Any = None
) -> CorrespondenceBackend:
    """Instantiate backend ``name`` with its config (None = the backend's defaults).

    Raises:
        BackendError: unknown name, or a backend whose module is not available yet.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise BackendError(
            f"backend {name!r} is not implemented yet (module {module_name} is missing); use 'classical'"
        ) from None
    backend_class = getattr(module, class_name)
    return backend_class(device=device, config=config, renderer=renderer)
