"""RAFT pieces used by RNNPose's flow network (docs/method.md §2.2–2.4).

* :class:`BasicEncoder`: the feature encoder (instance norm), keys relative to
  ``motion_net.image_fea_enc.fnet.``; :func:`published_encoder_input` is the input transform of
  the published wrapper, :func:`encode_image_pair` runs both crops the way the wrapper does.
* :class:`CorrPyramid`: all-pairs correlation volume, its average-pooled pyramid and the windowed
  lookup.
* :class:`BasicUpdateBlock`: motion encoder + SepConvGRU + flow head + upsampling-mask head, keys
  relative to ``motion_net.cf_net.update_block.``.
* :func:`convex_upsample`: learned convex 8× upsampling of a coarse flow.

Mixed precision (``mixed_precision=True``, docs/method.md §1.8): on CUDA the encoder
(:func:`encode_image_pair`) and the update block (:func:`run_update_block`) run under
``torch.autocast('cuda', dtype=torch.float16)``, and their outputs are cast back to float32; the
correlation volume, lookup coordinates and convex upsampling always stay float32. The published
code always autocasts the encoder and autocasts the update block when ``mixed_precision: True``
(the LINEMOD config), so ``mixed_precision=True`` for both reproduces it. On any other device the
flag has no effect: autocast is never entered on CPU, where results are plain float32.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

#: Resolution ratio between the input crop and the feature / flow grid.
FLOW_DOWNSAMPLING = 8


class CorrelationInputError(ValueError):
    """Feature maps or lookup coordinates with incompatible shapes."""


# --------------------------------------------------------------------------------------------
# Mixed precision


def autocast_enabled(device: torch.device | str, mixed_precision: bool) -> bool:
    """Whether fp16 autocast applies: only with ``mixed_precision`` and only on CUDA tensors."""
    return mixed_precision and torch.device(device).type == "cuda"


def autocast_context(device: torch.device | str, mixed_precision: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast('cuda', dtype=torch.float16)`` where :func:`autocast_enabled`, else a no-op."""
    if autocast_enabled(device, mixed_precision):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Feature encoder


def published_encoder_input(images: torch.Tensor) -> torch.Tensor:
    """Input transform of the published RNNPose wrapper: ``2·(x/255) − 1`` on images in [0, 1].

    The published code applies RAFT's [0, 255] normalisation to images that are already in
    [0, 1], so the encoder sees values in [−1, −0.99216] (docs/method.md §1.8). Released weights were
    trained with this; reproduce it whenever they are used.

    Args:
        images: (B, 3, H, W) float RGB in [0, 1].

    Returns:
        (B, 3, H, W) float in [−1, −253/255].
    """
    return 2.0 * (images / 255.0) - 1.0


def standard_encoder_input(images: torch.Tensor) -> torch.Tensor:
    """Consistent RAFT normalisation of [0, 1] images to [−1, 1] (for weights trained that way)."""
    return 2.0 * images - 1.0


def encoder_input(images: torch.Tensor, published_conventions: bool) -> torch.Tensor:
    """:func:`published_encoder_input` if ``published_conventions`` else :func:`standard_encoder_input`."""
    return published_encoder_input(images) if published_conventions else standard_encoder_input(images)


class ResidualBlock(nn.Module):
    """Two 3×3 conv + InstanceNorm + ReLU stages with a (strided 1×1 conv + IN) shortcut when strided.

    Keys: ``conv1``, ``conv2`` and, when ``stride > 1``, ``downsample.0`` (the norms own no parameters).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1)
        self.norm1 = nn.InstanceNorm2d(planes)
        self.norm2 = nn.InstanceNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride), nn.InstanceNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + y)


class BasicEncoder(nn.Module):
    """RAFT BasicEncoder with instance norm (no dropout): (B, 3, H, W) → (B, 256, ⌈H/8⌉, ⌈W/8⌉).

    Args:
        output_dim: channels of the final 1×1 conv (256 in RNNPose).
        input_dim: image channels.
    """

    def __init__(self, output_dim: int = 256, input_dim: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_dim, 64, kernel_size=7, stride=2, padding=3)
        self.norm1 = nn.InstanceNorm2d(64)
        self.layer1 = nn.Sequential(ResidualBlock(64, 64, stride=1), ResidualBlock(64, 64, stride=1))
        self.layer2 = nn.Sequential(ResidualBlock(64, 96, stride=2), ResidualBlock(96, 96, stride=1))
        self.layer3 = nn.Sequential(ResidualBlock(96, 128, stride=2), ResidualBlock(128, 128, stride=1))
        self.conv2 = nn.Conv2d(128, output_dim, kernel_size=1)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before ``conv2``: (B, 3, H, W) normalised image → (B, 128, H/8, W/8)."""
        x = F.relu(self.norm1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of an already normalised image (see :func:`encoder_input`)."""
        return self.conv2(self.trunk(x))


def encode_image_pair(
    encoder: BasicEncoder,
    rendered: torch.Tensor,
    observed: torch.Tensor,
    published_conventions: bool = True,
    mixed_precision: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the rendered and observed crops together, as the published wrapper does.

    Args:
        encoder: the feature encoder.
        rendered, observed: (B, 3, H, W) float32 RGB in [0, 1].
        published_conventions: apply :func:`published_encoder_input` (else the standard one).
        mixed_precision: fp16 autocast on CUDA (see module docstring).

    Returns:
        ``(f_rendered, f_observed)``, each (B, 256, H/8, W/8) float32.
    """
    if rendered.shape != observed.shape:
        raise ValueError(f"crop shapes differ: {tuple(rendered.shape)} vs {tuple(observed.shape)}")
    images = encoder_input(torch.cat([rendered, observed], dim=0), published_conventions)
    with autocast_context(images.device, mixed_precision):
        features = encoder(images)
    f_rendered, f_observed = features.float().split(rendered.shape[0], dim=0)
    return f_rendered, f_observed


# --------------------------------------------------------------------------------------------
# Correlation


def coords_grid(batch: int, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel coordinates (B, 2, H, W): channel 0 = x (column), channel 1 = y (row)."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack([xs, ys], dim=0).unsqueeze(0).repeat(batch, 1, 1, 1)


def bilinear_sample_pixels(images: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling at pixel coordinates, zero outside, pixel centres at integers.

    Args:
        images: (N, C, H, W).
        xy: (N, h, w, 2) pixel coordinates (x, y).

    Returns:
        (N, C, h, w). Uses ``grid_sample(align_corners=True)`` on 2·x/(W−1)−1, as RAFT does (this
        keeps published results bit for bit). A map with a size-1 axis has no such normalisation,
        so it uses the equivalent align_corners=False form (2·x+1)/W−1 instead.
    """
    height, width = images.shape[-2:]
    if height > 1 and width > 1:
        gx = 2 * xy[..., 0] / (width - 1) - 1
        gy = 2 * xy[..., 1] / (height - 1) - 1
        align_corners = True
    else:
        gx = (2 * xy[..., 0] + 1) / width - 1
        gy = (2 * xy[..., 1] + 1) / height - 1
        align_corners = False
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


@functools.lru_cache(maxsize=8)
def _window_offsets(radius: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        steps = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
        offset_x, offset_y = torch.meshgrid(steps, steps, indexing="ij")
        return torch.stack([offset_x, offset_y], dim=-1)


class CorrPyramid:
    """All-pairs correlation pyramid between two feature maps and its windowed lookup.

    Level 0 is C(p, q) = ⟨f1(p), f2(q)⟩/√C, stored as (B·H1·W1, 1, H2, W2) with row index
    b·H1·W1 + y1·W1 + x1; level l+1 is a 2×2 average pooling (floor) of level l over (H2, W2).
    Computed in float32 whatever the input dtype.

    Args:
        fmap1: (B, C, H1, W1) features of the reference (rendered) image.
        fmap2: (B, C, H2, W2) features of the observed image.
        num_levels: pyramid levels (4 in RNNPose).
        radius: lookup window radius r (window (2r+1)², 4 in RNNPose).
    """

    def __init__(
        self, fmap1: torch.Tensor, fmap2: torch.Tensor, num_levels: int = 4, radius: int = 4
    ) -> None:
        if fmap1.dim() != 4 or fmap2.dim() != 4 or fmap1.shape[:2] != fmap2.shape[:2]:
            raise CorrelationInputError(
                f"feature maps must be (B, C, H, W) with equal B and C, got {tuple(fmap1.shape)} "
                f"and {tuple(fmap2.shape)}"
            )
        self.num_levels = num_levels
        self.radius = radius
        self._layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[bool]] | None = None
        batch, channels, height1, width1 = fmap1.shape
        self.batch, self.height1, self.width1 = batch, height1, width1
        f1 = fmap1.float().flatten(2)  # (B, C, H1·W1)
        f2 = fmap2.float().flatten(2)  # (B, C, H2·W2)
        volume = torch.matmul(f1.transpose(1, 2), f2) / math.sqrt(channels)
        level = volume.reshape(batch * height1 * width1, 1, *fmap2.shape[-2:])
        self.levels: list[torch.Tensor] = [level]
        for _ in range(num_levels - 1):
            if min(level.shape[-2:]) < 2:
                raise CorrelationInputError(
                    f"a {tuple(fmap2.shape[-2:])} feature map is too small for {num_levels} pyramid levels"
                )
            level = F.avg_pool2d(level, kernel_size=2, stride=2)
            self.levels.append(level)

    def _grid_layout(
        self, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[bool]]:
        """Per-level constants of :meth:`lookup`'s grids (built once per pyramid): scale 2^l, shift s and
        denominator d as (L, 1, 1, 1, 2) float32 tensors, and each level's ``align_corners``."""
        if self._layout is None:
            scale, shift, denominator, align = [], [], [], []
            for index, level in enumerate(self.levels):
                height, width = level.shape[-2:]
                exact = height > 1 and width > 1  # as bilinear_sample_pixels decides
                scale.append([2.0**index] * 2)
                shift.append([0.0, 0.0] if exact else [1.0, 1.0])
                denominator.append([width - 1.0, height - 1.0] if exact else [float(width), float(height)])
                align.append(exact)
            as_tensor = [
                torch.tensor(values, dtype=torch.float32, device=device).reshape(-1, 1, 1, 1, 2)
                for values in (scale, shift, denominator)
            ]
            self._layout = (*as_tensor, align)
        return self._layout

    @property
    def out_channels(self) -> int:
        """Channels of :meth:`lookup`: levels · (2r+1)²."""
        return self.num_levels * (2 * self.radius + 1) ** 2

    def window_offsets(self, device=None) -> torch.Tensor:
        """(2r+1, 2r+1, 2) offsets (dx, dy); ``offsets[a, b] = (a − r, b − r)``.

        The first window index moves x: this reproduces RAFT's channel order, on which the
        published update block's first conv was trained. Shared per radius and device (read-only).
        """
        return _window_offsets(
            self.radius, torch.device(device) if device is not None else torch.device("cpu")
        )

    def lookup(self, coords: torch.Tensor) -> torch.Tensor:
        """Sample every level in a (2r+1)² window around ``coords / 2^l``.

        Args:
            coords: (B, 2, H1, W1) positions in the second map's pixels (channel 0 = x), float32.

        Returns:
            (B, levels·(2r+1)², H1, W1) float32; channel 81·l + 9·a + b samples level l at
            (x/2^l + a − r, y/2^l + b − r) (for r = 4). Zero outside the map.
        """
        expected = (self.batch, 2, self.height1, self.width1)
        if tuple(coords.shape) != expected:
            raise CorrelationInputError(f"coords must have shape {expected}, got {tuple(coords.shape)}")
        centres = coords.float().permute(0, 2, 3, 1).reshape(1, -1, 1, 1, 2)
        offsets = self.window_offsets(coords.device)  # (2r+1, 2r+1, 2)
        window = (2 * self.radius + 1) ** 2
        # All levels' sampling grids at once, with the arithmetic of bilinear_sample_pixels per level:
        # (2·(x/2^l + dx) + s)/d − 1, s = 0 and d = size − 1 (or s = 1, d = size for a size-1 axis).
        scale, shift, denominator, align = self._grid_layout(coords.device)
        grids = (2 * (centres / scale + offsets) + shift) / denominator - 1  # (L, N, 2r+1, 2r+1, 2)
        sampled = []
        for index, level in enumerate(self.levels):
            samples = F.grid_sample(
                level, grids[index], mode="bilinear", padding_mode="zeros", align_corners=align[index]
            )  # (N, 1, 2r+1, 2r+1)
            sampled.append(samples.reshape(self.batch, self.height1, self.width1, window))
        return torch.cat(sampled, dim=-1).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Update block


class BasicMotionEncoder(nn.Module):
    """Encodes correlation samples and the current coarse flow into 128 motion channels.

    Output = [ReLU(conv([corr feats (192), flow feats (64)])) (126), flow (2)].
    """

    def __init__(self, corr_channels: int) -> None:
        super().__init__()
        self.convc1 = nn.Conv2d(corr_channels, 256, kernel_size=1)
        self.convc2 = nn.Conv2d(256, 192, kernel_size=3, padding=1)
        self.convf1 = nn.Conv2d(2, 128, kernel_size=7, padding=3)
        self.convf2 = nn.Conv2d(128, 64, kernel_size=3, padding=1)
        self.conv = nn.Conv2d(192 + 64, 128 - 2, kernel_size=3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        """(B, 2, H, W) flow, (B, corr_channels, H, W) correlation → (B, 128, H, W)."""
        corr_features = F.relu(self.convc2(F.relu(self.convc1(corr))))
        flow_features = F.relu(self.convf2(F.relu(self.convf1(flow))))
        motion = F.relu(self.conv(torch.cat([corr_features, flow_features], dim=1)))
        return torch.cat([motion, flow], dim=1)


class SepConvGRU(nn.Module):
    """Convolutional GRU applied twice: with 1×5 kernels (horizontal), then 5×1 (vertical).

    Each pass: z = σ(Wz[h, x]), r = σ(Wr[h, x]), q = tanh(Wq[r·h, x]), h ← (1 − z)·h + z·q.
    """

    def __init__(self, hidden_dim: int = 128, input_dim: int = 256) -> None:
        super().__init__()
        channels = hidden_dim + input_dim
        horizontal = {"kernel_size": (1, 5), "padding": (0, 2)}
        vertical = {"kernel_size": (5, 1), "padding": (2, 0)}
        self.convz1 = nn.Conv2d(channels, hidden_dim, **horizontal)
        self.convr1 = nn.Conv2d(channels, hidden_dim, **horizontal)
        self.convq1 = nn.Conv2d(channels, hidden_dim, **horizontal)
        self.convz2 = nn.Conv2d(channels, hidden_dim, **vertical)
        self.convr2 = nn.Conv2d(channels, hidden_dim, **vertical)
        self.convq2 = nn.Conv2d(channels, hidden_dim, **vertical)

    @staticmethod
    def _gru_pass(h: torch.Tensor, x: torch.Tensor, conv_z: nn.Conv2d, conv_r: nn.Conv2d, conv_q: nn.Conv2d):
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(conv_z(hx))
        r = torch.sigmoid(conv_r(hx))
        q = torch.tanh(conv_q(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, hidden, H, W) state, (B, input, H, W) input → (B, hidden, H, W) new state."""
        h = self._gru_pass(h, x, self.convz1, self.convr1, self.convq1)
        return self._gru_pass(h, x, self.convz2, self.convr2, self.convq2)


class FlowHead(nn.Module):
    """3×3 conv → ReLU → 3×3 conv to a 2-channel flow increment."""

    def __init__(self, input_dim: int = 128, hidden_dim: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_dim, hidden_dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden_dim, 2, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


class UpdateOutput(NamedTuple):
    """One recurrent update, all (B, ·, H, W) on the coarse grid.

    ``net``: new hidden state (128 ch). ``up_mask``: convex-upsampling logits (9·8·8 ch, already
    ×0.25). ``delta_flow``: flow increment (2 ch, coarse pixels).
    """

    net: torch.Tensor
    up_mask: torch.Tensor
    delta_flow: torch.Tensor


class BasicUpdateBlock(nn.Module):
    """RAFT BasicUpdateBlock: motion encoder + SepConvGRU + flow head + upsampling-mask head.

    Args:
        corr_levels, corr_radius: correlation pyramid layout (input channels levels·(2r+1)²).
        hidden_dim: GRU state channels. input_dim: context channels.
        upsample_factor: convex upsampling factor of the mask head (8).
    """

    def __init__(
        self,
        corr_levels: int = 4,
        corr_radius: int = 4,
        hidden_dim: int = 128,
        input_dim: int = 128,
        upsample_factor: int = FLOW_DOWNSAMPLING,
    ) -> None:
        super().__init__()
        self.encoder = BasicMotionEncoder(corr_levels * (2 * corr_radius + 1) ** 2)
        self.gru = SepConvGRU(hidden_dim=hidden_dim, input_dim=input_dim + 128)
        self.flow_head = FlowHead(hidden_dim, hidden_dim=256)
        self.mask = nn.Sequential(
            nn.Conv2d(hidden_dim, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 9 * upsample_factor**2, kernel_size=1),
        )

    def forward(
        self, net: torch.Tensor, inp: torch.Tensor, corr: torch.Tensor, flow: torch.Tensor
    ) -> UpdateOutput:
        """One update.

        Args:
            net: (B, hidden, H, W) hidden state (tanh range).
            inp: (B, input, H, W) context features (ReLU range).
            corr: (B, levels·(2r+1)², H, W) correlation lookup.
            flow: (B, 2, H, W) current coarse flow (coarse pixels).
        """
        motion = self.encoder(flow, corr)
        net = self.gru(net, torch.cat([inp, motion], dim=1))
        delta_flow = self.flow_head(net)
        # The 0.25 scale balances gradients (RAFT); it is part of the published behaviour.
        up_mask = 0.25 * self.mask(net)
        return UpdateOutput(net, up_mask, delta_flow)


def run_update_block(
    block: BasicUpdateBlock,
    net: torch.Tensor,
    inp: torch.Tensor,
    corr: torch.Tensor,
    flow: torch.Tensor,
    mixed_precision: bool = False,
) -> UpdateOutput:
    """Call ``block`` under fp16 autocast on CUDA if ``mixed_precision``; outputs are float32."""
    with autocast_context(net.device, mixed_precision):
        out = block(net, inp, corr, flow)
    return UpdateOutput(*(t.float() for t in out))


# --------------------------------------------------------------------------------------------
# Convex upsampling


def convex_upsample(flow: torch.Tensor, mask: torch.Tensor, factor: int = FLOW_DOWNSAMPLING) -> torch.Tensor:
    """Upsample a coarse flow by ``factor`` with learned convex combinations of 3×3 neighbours.

    Each fine pixel (factor·y + i, factor·x + j) is Σ_k softmax_k(mask[k, i, j]) · factor·flow at
    the k-th neighbour (row-major 3×3, zero padded) of coarse pixel (y, x).

    Args:
        flow: (B, 2, H, W) coarse flow in coarse pixels.
        mask: (B, 9·factor², H, W) logits, channel index k·factor² + i·factor + j.

    Returns:
        (B, 2, factor·H, factor·W) flow in fine pixels, float32.
    """
    batch, channels, height, width = flow.shape
    if mask.shape != (batch, 9 * factor**2, height, width):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match flow {tuple(flow.shape)} and ×{factor}"
        )
    weights = torch.softmax(mask.float().view(batch, 1, 9, factor, factor, height, width), dim=2)
    neighbours = F.unfold(factor * flow.float(), kernel_size=3, padding=1)
    neighbours = neighbours.view(batch, channels, 9, 1, 1, height, width)
    fine = (weights * neighbours).sum(dim=2)  # (B, C, i, j, H, W)
    return fine.permute(0, 1, 4, 2, 5, 3).reshape(batch, channels, factor * height, factor * width)
