"""The render layer's one interface and the choice of its implementation by device.

Two renderers produce the same per-pixel face index, barycentrics, metric depth and Phong colour:

- ``opengl`` (:class:`rnnpose_ros.core.render.Renderer`): rasterises on the host (EGL or OSMesa) and
  shades with NumPy. Results for device tensors are read back and uploaded.
- ``warp`` (:class:`rnnpose_ros.core.render_warp.WarpRenderer`): casts rays with NVIDIA Warp on the
  device of the pose tensors (CPU or CUDA) and shades with torch there; nothing is read back.

``auto`` takes Warp on CUDA and OpenGL on the CPU, where the two were measured at about the same speed
(``python -m rnnpose_ros.tools.bench_render``; README) and OpenGL is the renderer every other part of
the project (synthetic scenes, tools) already uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch and the graphics libraries load when a renderer is made (tools' --help stays fast)
    import numpy as np
    import torch

    from rnnpose_ros.core.objects import ObjectModel
    from rnnpose_ros.core.render import Lighting, RenderOutput, RenderTensors

#: Accepted values of ``kind``.
RENDERER_KINDS = ("auto", "opengl", "warp")


class RendererLike(Protocol):
    """What the backends, the synthetic scenes and the tools call on a renderer."""

    def render(
        self,
        models: Sequence[ObjectModel],
        poses: np.ndarray | torch.Tensor,
        K: np.ndarray | torch.Tensor,
        size: tuple[int, int],
        lighting: Lighting | None = None,
    ) -> RenderOutput:
        """B views (poses (B, 4, 4) model→camera in metres, K (B, 3, 3), size (H, W)) as host arrays."""

    def render_tensors(
        self,
        models: Sequence[ObjectModel],
        poses: np.ndarray | torch.Tensor,
        K: np.ndarray | torch.Tensor,
        size: tuple[int, int],
        lighting: Lighting | None = None,
    ) -> RenderTensors:
        """The same views as torch tensors on the device of ``poses``."""

    def surface_normals(
        self, models: Sequence[ObjectModel], poses: np.ndarray | torch.Tensor, output: RenderOutput
    ) -> np.ndarray:
        """(B, H, W, 3) float32 camera-frame unit normals of a :meth:`render` output."""

    def close(self) -> None:
        """Release the renderer's resources."""


def default_renderer_kind(device: torch.device | str) -> str:
    """``warp`` for a CUDA device, ``opengl`` otherwise."""
    return "warp" if str(device).startswith("cuda") else "opengl"


def make_renderer(
    device: torch.device | str = "cpu", kind: str = "auto", lighting: Lighting | None = None
) -> RendererLike:
    """A renderer for tensors on ``device``.

    Args:
        device: where the refinement's tensors live.
        kind: one of :data:`RENDERER_KINDS`.
        lighting: default Phong parameters (None: :class:`Lighting` defaults).

    Raises:
        ValueError: unknown ``kind``.
        RenderError: the requested renderer cannot be created (``auto`` falls back from Warp to
            OpenGL with a warning instead).
    """
    if kind not in RENDERER_KINDS:
        raise ValueError(f"unknown renderer {kind!r}; choose one of {', '.join(RENDERER_KINDS)}")
    from rnnpose_ros.core.render import Renderer, RenderError

    chosen = default_renderer_kind(device) if kind == "auto" else kind
    if chosen == "warp":
        from rnnpose_ros.core.render_warp import WarpRenderer

        try:
            return WarpRenderer(lighting, device=device)
        except RenderError as exc:
            if kind != "auto":
                raise
            warnings.warn(f"{exc}; rendering with OpenGL on the host instead", RuntimeWarning, stacklevel=2)
    return Renderer(lighting)
