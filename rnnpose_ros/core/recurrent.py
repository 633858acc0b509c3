"""The RNNPose recurrent correspondence stage of one render iteration (docs/method.md §1.4.4–§1.5).

Per render iteration (reference rendered at the current pose Ti, in the zoom crop):
:func:`start_render_iteration` encodes the rendered and observed crops (RAFT encoder), builds the
correlation pyramid and initialises the GRU state from the rendered context map. Each inner step,
:func:`predict_correspondences` turns the current relative pose Tij into the pose-induced flow,
runs one GRU update on top of it, upsamples the flow to the crop and weights every correspondence
by the agreement of rendered 3D and observed 2D descriptors. The caller then solves one LM step on
(reference depth, targets, weights) in :func:`rnnpose_ros.core.loop.run_render_iteration`.

All tensors are batched over instances (B); the crop is H×W (240×240 published), the flow grid
H/8×W/8. No host synchronisation happens here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import backproject_depth, pixel_grid, project_points, transform_points
from .loop import Correspondences
from .model import CONTEXT_DIM, RNNPoseNet
from .nets.confidence import descriptor_confidence
from .nets.raft import FLOW_DOWNSAMPLING, CorrPyramid, convex_upsample, encode_image_pair, run_update_block

#: The published code adds this to the rendered depth before lifting it (background → 1e-5 m).
DEPTH_EPSILON = 1e-5
#: The published context map is scaled by 0.1 before it initialises the GRU.
CONTEXT_SCALE = 0.1


@dataclass
class RenderedReference:
    """The reference rendered at the current pose Ti, and the observed crop, for B instances.

    Attributes:
        rgb: (B, 3, H, W) float32 rendered colour in [0, 1], 0 on background.
        context: (B, 256, H, W) float32 rendered context features (raw, before the 0.1 scale), or
            None when ``coarse_context`` is given instead.
        descriptors: (B, 32, H, W) float32 rendered 3D descriptors, 0 on background.
        depth: (B, H, W) float32 reference depth (nearest-vertex published), metres, 0 = background.
        observed_rgb: (B, 3, H, W) float32 observed crop in [0, 1].
        observed_descriptors: (B, 32, H, W) float32 observed 2D descriptors on the same crop.
        K: (B, 3, 3) float32 intrinsics of the crop.
        coarse_context: (B, 256, H/8, W/8) float32 ``context`` already scaled by 0.1 and resampled to
            the flow grid (what initialises the GRU), when the renderer evaluated it only there.
    """

    rgb: Tensor
    context: Tensor | None
    descriptors: Tensor
    depth: Tensor
    observed_rgb: Tensor
    observed_descriptors: Tensor
    K: Tensor
    coarse_context: Tensor | None = None


@dataclass
class RecurrentState:
    """What one render iteration keeps across its inner steps."""

    reference: RenderedReference
    pyramid: CorrPyramid
    hidden: Tensor  # (B, 128, H/8, W/8) GRU state, carried across inner steps
    context: Tensor  # (B, 128, H/8, W/8) GRU input features
    lifted: Tensor  # (B, H·W, 3) reference points X0 in the reference camera, metres
    foreground: Tensor  # (B, H, W) bool: pixels covered by the rendering


@dataclass
class StepCorrespondences(Correspondences):
    """Correspondences predicted at one inner step (``target`` and ``weight`` as in
    :class:`~rnnpose_ros.core.loop.Correspondences`, plus the intermediate fields).

    Attributes:
        flow_init: (B, 2, H, W) pose-induced flow, 0 on background.
        coarse_flow: (B, 2, H/8, W/8) flow handed to the update block.
        delta_flow: (B, 2, H/8, W/8) the update block's correction.
        flow: (B, 2, H, W) predicted flow in crop pixels.
        similarity: (B, H, W) descriptor agreement s.
        hidden: (B, 128, H/8, W/8) GRU state after this step.
    """

    flow_init: Tensor
    coarse_flow: Tensor
    delta_flow: Tensor
    flow: Tensor
    similarity: Tensor
    hidden: Tensor


def solver_depth(depth: Tensor) -> Tensor:
    """(B, H, W) reference depth as the published solver lifts it: depth + ε (background → ε, which
    stays below the solver's minimum depth)."""
    return depth + DEPTH_EPSILON


def lift_reference(depth: Tensor, K: Tensor) -> Tensor:
    """(B, H·W, 3) reference points from (B, H, W) depth + ε, as the published solver lifts them."""
    return backproject_depth(solver_depth(depth), K).flatten(1, 2)


def pose_induced_flow(lifted: Tensor, foreground: Tensor, Tij: Tensor, K: Tensor) -> Tensor:
    """Flow π(K, Tij·X0) − (x, y) of every reference pixel, (B, 2, H, W), 0 on background."""
    batch, height, width = foreground.shape
    pixels = project_points(transform_points(Tij, lifted), K).reshape(batch, height, width, 2)
    grid = pixel_grid(height, width, pixels.dtype, pixels.device)
    flow = (pixels - grid) * foreground[..., None].to(pixels.dtype)
    return flow.permute(0, 3, 1, 2)


def start_render_iteration(
    net: RNNPoseNet,
    reference: RenderedReference,
    published_conventions: bool = True,
    mixed_precision: bool = False,
) -> RecurrentState:
    """Encode both crops, build the correlation pyramid and initialise the GRU (once per render)."""
    f_rendered, f_observed = encode_image_pair(
        net.fnet, reference.rgb, reference.observed_rgb, published_conventions, mixed_precision
    )
    context = reference.coarse_context
    if context is None:
        context = F.interpolate(
            CONTEXT_SCALE * reference.context, size=f_rendered.shape[-2:], mode="bilinear", align_corners=True
        )
    hidden, gru_input = context.split(CONTEXT_DIM // 2, dim=1)
    return RecurrentState(
        reference=reference,
        pyramid=CorrPyramid(f_rendered, f_observed),
        hidden=torch.tanh(hidden),
        context=torch.relu(gru_input),
        lifted=lift_reference(reference.depth, reference.K),
        # The published mask of the induced flow: lifted depth above the ε it added.
        foreground=solver_depth(reference.depth) > DEPTH_EPSILON,
    )


def predict_correspondences(
    net: RNNPoseNet,
    state: RecurrentState,
    Tij: Tensor,
    published_conventions: bool = True,
    mixed_precision: bool = False,
) -> StepCorrespondences:
    """One GRU update on top of the flow induced by ``Tij`` (B, 4, 4); advances ``state.hidden``."""
    reference = state.reference
    flow_init = pose_induced_flow(state.lifted, state.foreground, Tij, reference.K)
    coarse_size = state.hidden.shape[-2:]
    grid = pixel_grid(*coarse_size, flow_init.dtype, flow_init.device).permute(2, 0, 1)[None]
    coords = grid + F.interpolate(
        flow_init / FLOW_DOWNSAMPLING, size=coarse_size, mode="bilinear", align_corners=True
    )
    # (grid + f) − grid is not bit-equal to f; the published update block sees the former.
    coarse_flow = coords - grid
    corr = state.pyramid.lookup(coords)
    update = run_update_block(
        net.update_block, state.hidden, state.context, corr, coarse_flow, mixed_precision
    )
    state.hidden = update.net
    flow = convex_upsample(coords + update.delta_flow - grid, update.up_mask)
    confidence = descriptor_confidence(
        reference.descriptors,
        reference.observed_descriptors,
        flow,
        reference.depth,
        net.sigma,
        published_conventions,
    )
    return StepCorrespondences(
        flow_init=flow_init,
        coarse_flow=coarse_flow,
        delta_flow=update.delta_flow,
        flow=flow,
        target=confidence.target,
        similarity=confidence.similarity,
        weight=confidence.weight,
        hidden=update.net,
    )
