"""KPConv operator, blocks and the RNNPose 3D feature nets (docs/method.md §2.5, §2.7), pure PyTorch.

``KPConvFeatureNet`` is the published ``KPSuperpoint3Dv2`` encoder–decoder: its ``state_dict`` keys
equal the checkpoint keys below the prefixes ``hybrid_desc_net.corr_fea_extractor_3d.`` (descriptor
net, ``out_dim=32``, normalised) and ``ctx_fea_net.context_fea_extractor_3d.`` (context net,
``out_dim=256``, not normalised). Features are (N, C) float32, one row per point of a pyramid level.

Published behaviour reproduced on purpose (docs/method.md §1.8): the "batch norm" is InstanceNorm over all
points of the cloud, and KPConv divides by the number of neighbours whose feature *sum* is > 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kpconv_pyramid import PointPyramid, PyramidConfig, build_point_pyramid

__all__ = [
    "KPConv",
    "KPConvFeatureNet",
    "PointPyramid",
    "PyramidConfig",
    "build_point_pyramid",
]

NUM_KERNEL_POINTS = 15
KP_EXTENT = 2.0  # kernel extent in units of the grid cell (config ``KP_extent``)
LEAKY_SLOPE = 0.1
NORM_EPS = 1e-5
SHADOW_COORDINATE = 1e6  # padding neighbour, far from every kernel point → zero influence
# Upper bound on elements of one chunk's largest temporary (≈ 64 MiB of float32).
CHUNK_ELEMENTS = 1 << 24


def _chunks(num_rows: int, elements_per_row: int) -> list[slice]:
    """Row slices whose temporaries stay below ``CHUNK_ELEMENTS``."""
    step = max(1, CHUNK_ELEMENTS // max(1, elements_per_row))
    return [slice(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def _pad_shadow(features: torch.Tensor) -> torch.Tensor:
    """Append the shadow row (zeros) so the padding index N selects zero features."""
    return torch.cat([features, features.new_zeros(1, features.shape[1])], dim=0)


def _instance_norm(features: torch.Tensor) -> torch.Tensor:
    """Per-channel normalisation over all N points of the cloud (no affine): (N, C) → (N, C)."""
    # Same (1, C, N) view as the published module, so the reduction runs over the same layout.
    return F.instance_norm(features.unsqueeze(2).transpose(0, 2), eps=NORM_EPS).transpose(0, 2).squeeze(2)


def _initial_kernel_points(radius: float) -> torch.Tensor:
    """Placeholder rigid kernel for training from scratch: (15, 3) float32, normalised units.

    One centre point plus 14 points on a sphere of radius 0.66·r (Fibonacci directions) under a
    random rotation (global torch RNG). Published weights always bring their own kernel points
    (loaded with the state dict), which replace these.
    """
    count = NUM_KERNEL_POINTS - 1
    index = torch.arange(count, dtype=torch.float64) + 0.5
    polar = torch.acos(1 - 2 * index / count)
    azimuth = math.pi * (1 + math.sqrt(5)) * index
    directions = torch.stack([polar.sin() * azimuth.cos(), polar.sin() * azimuth.sin(), polar.cos()], dim=1)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    shell = 0.66 * radius * directions @ rotation.T
    return torch.cat([shell.new_zeros(1, 3), shell]).float()


class KPConv(nn.Module):
    """Rigid kernel-point convolution, linear influence, sum aggregation (docs/method.md §2.7).

    Parameters: ``weights`` (15, Cin, Cout); buffer ``kernel_points`` (15, 3) normalised units
    (loaded from the checkpoint; the constructor's value is only a training placeholder).
    """

    def __init__(self, in_channels: int, out_channels: int, radius: float) -> None:
        super().__init__()
        self.radius = radius
        self.extent = radius * KP_EXTENT / PyramidConfig().conv_radius
        self.weights = nn.Parameter(torch.empty(NUM_KERNEL_POINTS, in_channels, out_channels))
        nn.init.kaiming_uniform_(self.weights, a=math.sqrt(5))
        self.register_buffer("kernel_points", _initial_kernel_points(radius))

    def _influence(self, offsets: torch.Tensor) -> torch.Tensor:
        """Linear influence max(0, 1 − ‖y_j − k_m‖ / extent): offsets (n, H, 3) → (n, K, H).

        The squared distance is summed per coordinate, (dx² + dy²) + dz², which equals the
        published reduction over the coordinate axis bit for bit but avoids its slow 3-wide
        reduction and the (n, H, K, 3) temporary.
        """
        squared = None
        for axis in range(3):
            delta = offsets[..., axis].unsqueeze(1) - self.kernel_points[:, axis].unsqueeze(1)  # (n, K, H)
            delta.mul_(delta)
            squared = delta if squared is None else squared.add_(delta)
        return torch.rsub(squared.sqrt_().div_(self.extent), 1).clamp_(min=0.0)

    def forward(
        self,
        query_points: torch.Tensor,
        support_points: torch.Tensor,
        neighbors: torch.Tensor,
        features: torch.Tensor,
    ) -> torch.Tensor:
        """Convolve support features at the query points.

        Args:
            query_points: (Nq, 3) float32; support_points: (Ns, 3) float32.
            neighbors: (Nq, H) int64 indices into the supports, padded with Ns.
            features: (Ns, Cin) float32 support features.

        Returns:
            (Nq, Cout) float32.
        """
        num_kernel, in_channels, out_channels = self.weights.shape
        supports = torch.cat([support_points, support_points.new_full((1, 3), SHADOW_COORDINATE)])
        padded = _pad_shadow(features)
        width = neighbors.shape[1]
        # Largest per-row temporaries: influence terms (K·H, two alive), gathered features (H·Cin),
        # per-kernel products (K·Cin, K·Cout).
        per_row = max(
            2 * num_kernel * width, width * in_channels, num_kernel * max(in_channels, out_channels)
        )
        outputs = []
        for rows in _chunks(len(neighbors), per_row):
            index = neighbors[rows]
            offsets = supports[index] - query_points[rows].unsqueeze(1)  # (n, H, 3)
            influence = self._influence(offsets)  # (n, K, H)
            neighbor_features = padded[index]  # (n, H, Cin)
            gathered = torch.matmul(influence, neighbor_features).permute(1, 0, 2)  # (K, n, Cin)
            # One product per kernel point, then the sum over kernel points: the published
            # summation order, which keeps the result bit-equal to the original on CPU.
            output = torch.matmul(gathered, self.weights).sum(dim=0)
            # Published normalisation: count neighbours whose feature sum is positive.
            count = (neighbor_features.sum(dim=-1) > 0).sum(dim=-1).clamp(min=1)
            outputs.append(output / count.unsqueeze(1))
        return torch.cat(outputs) if outputs else features.new_zeros(0, out_channels)


class UnaryBlock(nn.Module):
    """Linear (no bias) → InstanceNorm over points → optional LeakyReLU(0.1). Key: ``mlp.weight``."""

    def __init__(self, in_channels: int, out_channels: int, activation: bool = True) -> None:
        super().__init__()
        self.mlp = nn.Linear(in_channels, out_channels, bias=False)
        self.activation = activation

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = _instance_norm(self.mlp(features))
        return F.leaky_relu(features, LEAKY_SLOPE) if self.activation else features


class LastUnaryBlock(nn.Module):
    """Final Linear (no bias, no norm, no activation). Key: ``mlp.weight``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mlp = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class SimpleBlock(nn.Module):
    """KPConv → InstanceNorm → LeakyReLU(0.1) on one level."""

    def __init__(self, in_channels: int, out_channels: int, radius: float, level: int) -> None:
        super().__init__()
        self.level = level
        self.KPConv = KPConv(in_channels, out_channels, radius)

    def forward(self, features: torch.Tensor, pyramid: PointPyramid) -> torch.Tensor:
        points = pyramid.points[self.level]
        features = self.KPConv(points, points, pyramid.neighbors[self.level], features)
        return F.leaky_relu(_instance_norm(features), LEAKY_SLOPE)


def _max_pool(features: torch.Tensor, pools: torch.Tensor) -> torch.Tensor:
    """Max over each coarse point's fine neighbours (shadow rows count as zeros): (Nc, C)."""
    padded = _pad_shadow(features)
    pooled = [
        padded[pools[rows]].max(dim=1).values
        for rows in _chunks(len(pools), pools.shape[1] * features.shape[1])
    ]
    return torch.cat(pooled) if pooled else features.new_zeros(0, features.shape[1])


class ResnetBottleneckBlock(nn.Module):
    """unary1 → KPConv → norm → LeakyReLU → unary2, plus (max-pooled if strided) shortcut.

    ``level`` is the support level; a strided block writes to level + 1 through ``pools[level]``.
    """

    def __init__(self, in_channels: int, out_channels: int, radius: float, level: int, strided: bool) -> None:
        super().__init__()
        self.level = level
        self.strided = strided
        bottleneck = out_channels // 4
        self.unary1 = UnaryBlock(in_channels, bottleneck) if in_channels != bottleneck else nn.Identity()
        self.KPConv = KPConv(bottleneck, bottleneck, radius)
        self.unary2 = UnaryBlock(bottleneck, out_channels, activation=False)
        self.unary_shortcut = (
            UnaryBlock(in_channels, out_channels, activation=False)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, features: torch.Tensor, pyramid: PointPyramid) -> torch.Tensor:
        supports = pyramid.points[self.level]
        if self.strided:
            queries = pyramid.points[self.level + 1]
            neighbors = pyramid.pools[self.level]
            shortcut = _max_pool(features, neighbors)
        else:
            queries = supports
            neighbors = pyramid.neighbors[self.level]
            shortcut = features
        x = self.KPConv(queries, supports, neighbors, self.unary1(features))
        x = self.unary2(F.leaky_relu(_instance_norm(x), LEAKY_SLOPE))
        return F.leaky_relu(x + self.unary_shortcut(shortcut), LEAKY_SLOPE)


class NearestUpsampleBlock(nn.Module):
    """Each level-l point copies the features of its nearest level-(l+1) point (zeros if none)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def forward(self, features: torch.Tensor, pyramid: PointPyramid) -> torch.Tensor:
        return _pad_shadow(features)[pyramid.upsamples[self.level][:, 0]]


class KPConvFeatureNet(nn.Module):
    """RNNPose 3D feature net (``KPSuperpoint3Dv2``, docs/method.md §2.5) on a 4-level :class:`PointPyramid`.

    Args:
        out_dim: output channels per point: 32 (descriptor net) or 256 (context net). The last
            layer has ``out_dim + 2`` channels as published; the 2 extra channels are dropped.
        normalize: L2-normalise each output row (descriptor net).
    """

    first_feats_dim = 128
    gnn_feats_dim = 128
    num_layers = 4
    skip_blocks = (1, 4, 7)  # encoder outputs concatenated in the decoder (levels 0, 1, 2)

    def __init__(self, out_dim: int, normalize: bool) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.normalize = normalize
        config = PyramidConfig()
        width = self.first_feats_dim
        blocks: list[nn.Module] = [SimpleBlock(1, width // 2, config.radius(0), 0)]
        channels = width // 2
        for level in range(self.num_layers):
            radius = config.radius(level)
            if level > 0:
                blocks.append(
                    ResnetBottleneckBlock(channels, channels, config.radius(level - 1), level - 1, True)
                )
            for _ in range(2 if level > 0 else 1):
                blocks.append(ResnetBottleneckBlock(channels, width, radius, level, False))
                channels = width
            width *= 2
        self.encoder_blocks = nn.ModuleList(blocks)
        # Learned scalar of the published model; not used by the forward pass (kept for the key).
        self.epsilon = nn.Parameter(torch.tensor(-5.0))
        self.bottle = nn.Conv1d(channels, self.gnn_feats_dim, kernel_size=1)
        self.proj_gnn = nn.Conv1d(self.gnn_feats_dim, self.gnn_feats_dim, kernel_size=1)
        skip_channels = [self.first_feats_dim * 2**level for level in range(self.num_layers - 1)]
        decoder: list[nn.Module] = []
        channels = self.gnn_feats_dim
        for level in reversed(range(self.num_layers - 1)):
            decoder.append(NearestUpsampleBlock(level))
            merged = channels + skip_channels[level]
            if level > 0:
                channels //= 2
                decoder.append(UnaryBlock(merged, channels))
            else:
                decoder.append(LastUnaryBlock(merged, out_dim + 2))
        self.decoder_blocks = nn.ModuleList(decoder)

    def forward(
        self,
        pyramid: PointPyramid,
        features: torch.Tensor | None = None,
        intermediates: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-point features of the level-0 cloud.

        Args:
            pyramid: the object's pyramid (same device as the net).
            features: (N0, 1) float32 input features; default ones (published input).
            intermediates: if given, filled with ``encoder_block_i`` (N_l, C), ``bottle_out`` and
                ``proj_gnn_out`` (1, 128, N3) and ``decoder_block_i`` (N_l, C) for parity checks.

        Returns:
            (N0, out_dim) float32; unit rows when ``normalize``.
        """
        points = pyramid.points[0]
        if features is None:
            features = points.new_ones(len(points), 1)
        record = intermediates if intermediates is not None else {}
        skips = []
        x = features
        for index, block in enumerate(self.encoder_blocks):
            x = block(x, pyramid)
            record[f"encoder_block_{index}"] = x
            if index in self.skip_blocks:
                skips.append(x)
        coarse = self.bottle(x.transpose(0, 1).unsqueeze(0))
        record["bottle_out"] = coarse
        coarse = self.proj_gnn(coarse)
        record["proj_gnn_out"] = coarse
        x = coarse.squeeze(0).transpose(0, 1)
        for index, block in enumerate(self.decoder_blocks):
            if isinstance(block, NearestUpsampleBlock):
                x = block(x, pyramid)
            else:
                x = block(torch.cat([x, skips.pop()], dim=1))
            record[f"decoder_block_{index}"] = x
        x = x[:, : self.out_dim]
        return F.normalize(x, p=2, dim=1) if self.normalize else x
