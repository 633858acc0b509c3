"""Multi-level point pyramid for the KPConv nets (docs/method.md §1.1, §2.6, §2.8), pure NumPy/SciPy.

Replaces the published C++ extensions (grid subsampling, radius neighbours) and the neighbour-limit
calibration. All coordinates are in *normalised model units*: the object's vertices centred on
their mean and divided by the largest bounding-box side. Arithmetic is float32 where the original
ran in float32, so index lists equal the original ones (up to the order of the subsampled points,
which in the original is the iteration order of a hash map and is therefore implementation
defined; every KPConv operation is permutation-equivariant).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial import cKDTree


class PointPyramidError(ValueError):
    """Raised for an input cloud or configuration the pyramid cannot be built from."""


@dataclass(frozen=True)
class PyramidConfig:
    """Pyramid geometry (LINEMOD config of the published model, normalised units).

    Conv radius of level l is ``first_subsampling_dl · conv_radius · 2^l``; the grid used to build
    level l+1 has cell size ``2 · r_l / conv_radius``. Neighbour limits keep ``keep_ratio`` of the
    conv-neighbour counts; ``calibration_hist_cap`` is the original's histogram length
    ceil(4/3·π·(deform_radius + 1)³) = 905, counts at or above it are left out of the histogram.
    """

    first_subsampling_dl: float = 0.025
    conv_radius: float = 2.5
    num_layers: int = 4
    keep_ratio: float = 0.8
    calibration_hist_cap: int = 905

    def radius(self, level: int) -> float:
        """Conv radius of ``level`` (normalised units), computed as the original does (doubling)."""
        radius = self.first_subsampling_dl * self.conv_radius
        for _ in range(level):
            radius *= 2
        return radius


@dataclass
class PointPyramid:
    """Point levels and index lists consumed by :class:`KPConvFeatureNet` (one cloud).

    Index matrices hold int64 row indices into the *support* level; missing entries are padded
    with the number of support points (the "shadow" point). Rows are sorted by distance.

    Attributes:
        points: ``num_layers`` tensors (N_l, 3) float32, normalised units; level 0 is the
            normalised input cloud in input order.
        neighbors: ``num_layers`` tensors (N_l, limit_l): conv neighbours of level l in level l.
        pools: ``num_layers − 1`` tensors (N_{l+1}, limit_l): level-l neighbours of level l+1 points.
        upsamples: ``num_layers − 1`` tensors (N_l, limit_l): level-(l+1) neighbours of level l
            points (radius 2·r_l); column 0 is the nearest coarser point.
        neighbor_limits: per-level truncation widths.
        normalization_mean: (3,) float32 metres subtracted from the raw vertices.
        normalization_scale: metres per normalised unit (largest bounding-box side).
    """

    points: list[torch.Tensor]
    neighbors: list[torch.Tensor]
    pools: list[torch.Tensor]
    upsamples: list[torch.Tensor]
    neighbor_limits: list[int]
    normalization_mean: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    normalization_scale: float = 1.0

    @property
    def num_layers(self) -> int:
        return len(self.points)

    def to(self, device: torch.device | str) -> PointPyramid:
        """Copy of the pyramid with every tensor on ``device``."""

        def move(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.to(device) for t in tensors]

        return PointPyramid(
            points=move(self.points),
            neighbors=move(self.neighbors),
            pools=move(self.pools),
            upsamples=move(self.upsamples),
            neighbor_limits=list(self.neighbor_limits),
            normalization_mean=self.normalization_mean.copy(),
            normalization_scale=self.normalization_scale,
        )


def normalize_cloud(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre on the mean and scale the largest bounding-box side to 1, in float32.

    Args:
        vertices: (N, 3) metres (converted to float32 first, as the original does).

    Returns:
        ``(normalised (N, 3) float32, mean (3,) float32 metres, scale float metres)``.
    """
    points = np.asarray(vertices, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise PointPyramidError(f"expected a non-empty (N, 3) cloud, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise PointPyramidError("cloud contains non-finite coordinates")
    mean = points.mean(axis=0)
    centred = points - mean
    scale = np.max(centred.max(axis=0) - centred.min(axis=0))
    if not scale > 0:
        raise PointPyramidError("cloud has zero extent")
    return centred / scale, mean, float(scale)


def grid_subsample(points: np.ndarray, cell_size: float) -> np.ndarray:
    """Voxel-grid subsampling: one barycentre per occupied cell.

    Mirrors the original float32 arithmetic: origin = floor(min·(1/dl))·dl, cell index =
    floor((p − origin)/dl); coordinates of a cell are summed in float32 in input order and
    multiplied by float32(1/count). Output order: cells sorted by their linear index.

    Args:
        points: (N, 3) float32.
        cell_size: voxel side dl (normalised units; used as float32).

    Returns:
        (M, 3) float32 barycentres.
    """
    points = np.asarray(points, dtype=np.float32)
    dl = np.float32(cell_size)
    origin = np.floor(points.min(axis=0) * (np.float32(1) / dl)) * dl
    cells = np.floor((points - origin) / dl).astype(np.int64)
    extent = cells.max(axis=0) + 1
    keys = cells[:, 0] + extent[0] * (cells[:, 1] + extent[1] * cells[:, 2])
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    # Sequential float32 accumulation in input order (np.add.at is unbuffered and ordered).
    sums = np.zeros((len(counts), 3), dtype=np.float32)
    np.add.at(sums, inverse, points)
    return sums * (1.0 / counts).astype(np.float32)[:, None]


def radius_neighbors(queries: np.ndarray, supports: np.ndarray, radius: float) -> np.ndarray:
    """All supports with squared distance strictly below radius² (float32), sorted by distance.

    Args:
        queries: (Nq, 3) float32; supports: (Ns, 3) float32; radius: normalised units.

    Returns:
        (Nq, max_count) int64 support indices, padded with Ns (at least one column). Ties in
        distance keep increasing support index.
    """
    queries = np.asarray(queries, dtype=np.float32)
    supports = np.asarray(supports, dtype=np.float32)
    num_supports = len(supports)
    if len(queries) == 0 or num_supports == 0:
        return np.full((len(queries), 1), num_supports, dtype=np.int64)
    radius32 = np.float32(radius)
    radius_sq = radius32 * radius32
    # Candidates from a float64 search with a margin (rows in order, columns ascending), then
    # the exact float32 test.
    candidates = cKDTree(supports).query_ball_point(queries, float(radius32) * (1 + 1e-5), return_sorted=True)
    lengths = np.fromiter((len(c) for c in candidates), dtype=np.int64, count=len(candidates))
    rows = np.repeat(np.arange(len(queries)), lengths)
    cols = np.fromiter((j for c in candidates for j in c), dtype=np.int64, count=int(lengths.sum()))
    diff = queries[rows] - supports[cols]
    dist_sq = (diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1]) + diff[:, 2] * diff[:, 2]
    inside = dist_sq < radius_sq
    rows, cols, dist_sq = rows[inside], cols[inside], dist_sq[inside]
    # Non-negative float32 values order like their bit patterns: one exact int64 key (row, d²);
    # the stable sort keeps ties in increasing support index.
    key = (rows << 32) | dist_sq.view(np.int32).astype(np.int64)
    order = np.argsort(key, kind="stable")
    rows, cols = rows[order], cols[order]
    counts = np.bincount(rows, minlength=len(queries))
    starts = np.cumsum(counts) - counts
    slots = np.arange(len(rows)) - starts[rows]
    result = np.full((len(queries), max(1, int(counts.max()))), num_supports, dtype=np.int64)
    result[rows, slots] = cols
    return result


def neighbor_counts(neighbors: np.ndarray, num_supports: int) -> np.ndarray:
    """(N,) int64 number of valid (non-padding) entries per row of an index matrix."""
    return (neighbors < num_supports).sum(axis=1)


def calibrate_neighbor_limit(counts: np.ndarray, keep_ratio: float = 0.8, hist_cap: int = 905) -> int:
    """Neighbour limit of one level from its untruncated conv-neighbour counts (docs/method.md §2.8).

    The published rule, applied to one object's cloud: histogram the counts (length ``hist_cap``,
    counts ≥ ``hist_cap`` dropped), then the limit is the number of count values whose cumulative
    histogram stays below ``keep_ratio`` of the total, i.e. the smallest count c such that at
    least ``keep_ratio`` of the points have ≤ c neighbours.
    """
    counts = np.minimum(np.asarray(counts, dtype=np.int64), hist_cap)
    histogram = np.bincount(counts, minlength=hist_cap)[:hist_cap]
    cumulative = np.cumsum(histogram)
    return int(np.sum(cumulative < keep_ratio * cumulative[-1]))


def build_point_pyramid(
    vertices: np.ndarray | torch.Tensor,
    neighbor_limits: Sequence[int] | None = None,
    config: PyramidConfig | None = None,
) -> PointPyramid:
    """Normalise a vertex cloud and build the KPConv pyramid of one object.

    Args:
        vertices: (N, 3) model vertices, metres (any float dtype; used as float32).
        neighbor_limits: per-level truncation widths; ``None`` calibrates them on this cloud
            (:func:`calibrate_neighbor_limit`) — store them with the object for reuse.
        config: pyramid geometry; default is the published LINEMOD configuration.

    Returns:
        The :class:`PointPyramid` (CPU tensors).
    """
    config = config or PyramidConfig()
    if isinstance(vertices, torch.Tensor):
        vertices = vertices.detach().cpu().numpy()
    points, mean, scale = normalize_cloud(vertices)
    if neighbor_limits is not None and len(neighbor_limits) != config.num_layers:
        raise PointPyramidError(f"need {config.num_layers} neighbour limits, got {len(neighbor_limits)}")

    levels = [points]
    conv_lists: list[np.ndarray] = []
    pool_lists: list[np.ndarray] = []
    upsample_lists: list[np.ndarray] = []
    for level in range(config.num_layers):
        radius = config.radius(level)
        conv_lists.append(radius_neighbors(levels[level], levels[level], radius))
        if level + 1 < config.num_layers:
            coarse = grid_subsample(levels[level], 2 * radius / config.conv_radius)
            pool_lists.append(radius_neighbors(coarse, levels[level], radius))
            upsample_lists.append(radius_neighbors(levels[level], coarse, 2 * radius))
            levels.append(coarse)

    if neighbor_limits is None:
        neighbor_limits = [
            calibrate_neighbor_limit(
                neighbor_counts(conv, len(pts)), config.keep_ratio, config.calibration_hist_cap
            )
            for conv, pts in zip(conv_lists, levels, strict=True)
        ]
    limits = [int(limit) for limit in neighbor_limits]
    if min(limits) < 1:
        raise PointPyramidError(f"neighbour limits must be ≥ 1, got {limits}")

    def truncate(lists: list[np.ndarray]) -> list[torch.Tensor]:
        return [
            torch.from_numpy(np.ascontiguousarray(m[:, :limit]))
            for m, limit in zip(lists, limits[: len(lists)], strict=True)
        ]

    return PointPyramid(
        points=[torch.from_numpy(p) for p in levels],
        neighbors=truncate(conv_lists),
        pools=truncate(pool_lists),
        upsamples=truncate(upsample_lists),
        neighbor_limits=limits,
        normalization_mean=mean,
        normalization_scale=scale,
    )
