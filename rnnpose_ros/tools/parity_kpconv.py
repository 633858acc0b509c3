"""Parity checks of the KPConv point pyramid and 3D feature nets against the golden fixtures.

Fixture kinds: ``kpconv_pyramid`` (pyramid built from ``raw_points``), ``desc3d`` and ``ctx3d``
(nets fed the *fixture's own* pyramid, read from the sibling file named by the fixture's ``inputs``
entry, default ``kpconv_pyramid.pt``). Every check has the signature
``check(fixture: dict, fixture_dir: Path | None = None) -> list[Comparison]``; ``fixture_dir`` is the
folder holding the fixture (default ``$RNNPOSE_GOLDEN_DIR`` or ``<repo>/../shared/golden``).

Comparison of a pyramid (golden README): level 0 in input order; levels ≥ 1 as point sets through a
permutation (the original's order is a hash-map order); index matrices remapped through the
permutations and compared row by row as sequences, rows with equal-distance neighbours as sets.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from rnnpose_ros.core.nets.kpconv import KPConvFeatureNet
from rnnpose_ros.core.nets.kpconv_pyramid import (
    PointPyramid,
    PyramidConfig,
    build_point_pyramid,
    neighbor_counts,
    radius_neighbors,
)
from rnnpose_ros.tools.parity_common import Comparison, FixtureCheck, compare, float_state_dict, load_fixture

POINT_TOL = {"atol": 1e-6, "rtol": 0.0}
NET_TOL = {"atol": 1e-5, "rtol": 1e-5}
EXACT = {"atol": 0.0, "rtol": 0.0}
DEFAULT_PYRAMID_FILE = "kpconv_pyramid.pt"
PARITY_THREADS = 2  # the fixtures were made with 2 threads


def default_fixture_dir() -> Path:
    """``$RNNPOSE_GOLDEN_DIR`` or ``<repo root>/../shared/golden``."""
    repo_root = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("RNNPOSE_GOLDEN_DIR", repo_root.parent / "shared" / "golden"))


def _matching(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray | None:
    """For each fixture point, the index of our nearest point; ``None`` unless a bijection."""
    if ours.shape != theirs.shape or len(ours) == 0:
        return None
    _, index = cKDTree(ours).query(theirs)
    return index if len(np.unique(index)) == len(ours) else None


def _support_map(ours_of_theirs: np.ndarray) -> np.ndarray:
    """Map our support index (and the padding index N) to the fixture's: (N + 1,) int64."""
    mapping = np.empty(len(ours_of_theirs) + 1, dtype=np.int64)
    mapping[ours_of_theirs] = np.arange(len(ours_of_theirs))
    mapping[-1] = len(ours_of_theirs)
    return mapping


def _canonical_ties(
    matrix: np.ndarray, reference: np.ndarray, queries: np.ndarray, supports: np.ndarray, tie_distance: float
):
    """Sort each run of equal-distance neighbours (by index) in both matrices.

    Runs are taken from the *reference* row (sorted by distance, fixture points). Two neighbours
    tie when their float32 squared distances are equal (the original's test), or when their
    distances differ by at most ``tie_distance``: where our points agree with the fixture only to
    rounding, exact ties of the original (e.g. a coarse point at the midpoint of two fine points)
    may be broken either way. Rows without ties are returned unchanged, so they still compare as
    sequences.

    Returns:
        ``(matrix', reference', number of rows with ties)``.
    """
    padded = np.concatenate([supports, np.full((1, 3), np.nan, np.float32)])
    diff = queries[:, None, :] - padded[reference]
    dist_sq = (diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1]) + diff[..., 2] * diff[..., 2]
    distance = np.sqrt(dist_sq.astype(np.float64))
    tied = (dist_sq[:, 1:] == dist_sq[:, :-1]) | (np.abs(distance[:, 1:] - distance[:, :-1]) <= tie_distance)
    out_matrix, out_reference = matrix.copy(), reference.copy()
    rows = np.flatnonzero(tied.any(axis=1))
    for row in rows:
        # Run labels: a new run starts wherever two neighbours do not tie.
        run = np.concatenate([[0], np.cumsum(~tied[row])])
        for target in (out_matrix, out_reference):
            target[row] = target[row][np.lexsort((target[row], run))]
    return out_matrix, out_reference, len(rows)


@dataclass(frozen=True)
class _LevelMatch:
    """One pyramid level matched to the fixture's: ``ours_of_theirs[i]`` is our index of fixture point i."""

    ours_of_theirs: np.ndarray
    fixture_points: np.ndarray
    max_deviation: float  # max |our − fixture| coordinate after matching


def _compare_index_matrix(
    name: str, ours: np.ndarray, theirs: np.ndarray, queries: _LevelMatch, supports: _LevelMatch
):
    """Remap our (queries × supports) index matrix into the fixture's numbering and compare it.

    Returns the per-row count comparison and the row comparison (sequences; tie runs as sets).
    """
    num_supports = len(supports.ours_of_theirs)
    remapped = _support_map(supports.ours_of_theirs)[ours[queries.ours_of_theirs]]
    counts = compare(
        f"{name}.counts",
        torch.from_numpy(neighbor_counts(remapped, num_supports)),
        torch.from_numpy(neighbor_counts(theirs, num_supports)),
        **EXACT,
    )
    if remapped.shape != theirs.shape:
        return [counts, compare(name, torch.from_numpy(remapped), torch.from_numpy(theirs), **EXACT)]
    # Both points may be off by max_deviation per coordinate: distances by up to √3 times their sum.
    tie_distance = 2.0 * math.sqrt(3.0) * (queries.max_deviation + supports.max_deviation)
    remapped, reference, num_tied = _canonical_ties(
        remapped, theirs, queries.fixture_points, supports.fixture_points, tie_distance
    )
    rows = compare(name, torch.from_numpy(remapped), torch.from_numpy(reference), **EXACT)
    detail = rows.detail or f"{num_tied} rows with distance ties compared as sets"
    return [counts, replace(rows, detail=detail)]


def check_kpconv_pyramid(fixture: dict, fixture_dir: Path | None = None) -> list[Comparison]:
    """Build the pyramid from ``raw_points`` (limits calibrated on the cloud) and compare all of it.

    Args:
        fixture: the loaded ``kpconv_pyramid*.pt`` dict (any cloud size).
        fixture_dir: unused (the file is self-contained).
    """
    del fixture_dir
    settings = fixture.get("config", {})
    config = PyramidConfig(
        first_subsampling_dl=float(settings.get("first_subsampling_dl", 0.025)),
        conv_radius=float(settings.get("conv_radius", 2.5)),
        num_layers=int(settings.get("num_layers", 4)),
        keep_ratio=float(settings.get("keep_ratio", 0.8)),
        calibration_hist_cap=int(settings.get("calibration_hist_cap", 905)),
    )
    pyramid = build_point_pyramid(fixture["raw_points"], config=config)
    results = [
        compare(
            "normalization_mean",
            torch.from_numpy(pyramid.normalization_mean),
            fixture["normalization_mean"],
            **POINT_TOL,
        ),
        compare(
            "normalization_scale",
            torch.tensor(pyramid.normalization_scale),
            torch.tensor(float(fixture["normalization_scale"])),
            **POINT_TOL,
        ),
        compare("normalized_points", pyramid.points[0], fixture["normalized_points"], **POINT_TOL),
        compare(
            "neighbor_limits",
            torch.tensor(pyramid.neighbor_limits),
            torch.tensor([int(v) for v in fixture["neighbor_limits"]]),
            **EXACT,
        ),
    ]
    levels: list[_LevelMatch] = []
    for level in range(config.num_layers):
        ours, theirs = pyramid.points[level], fixture["points"][level]
        # Level 0 keeps the input order; coarser levels are matched as point sets.
        match = np.arange(len(ours)) if level == 0 else _matching(ours.numpy(), theirs.numpy())
        if match is None or len(match) != len(theirs):
            results.append(compare(f"points.{level}", ours, theirs, **POINT_TOL))
            results.append(
                replace(results[-1], name=f"points.{level}.matching", passed=False, detail="no bijection")
            )
            return results
        results.append(compare(f"points.{level}", ours[match], theirs, **POINT_TOL))
        deviation = float((ours[match] - theirs).abs().max()) if len(theirs) else 0.0
        levels.append(_LevelMatch(match, theirs.numpy(), deviation))

    for level, match in enumerate(levels):
        if "neighbors_untruncated" in fixture:  # debug aid of the fixture: counts before truncation
            points = pyramid.points[level].numpy()
            untruncated = radius_neighbors(points, points, config.radius(level))
            expected = fixture["neighbors_untruncated"][level].numpy()
            results += _compare_index_matrix(
                f"neighbors_untruncated.{level}", untruncated, expected, match, match
            )
        expected = fixture["neighbors"][level].numpy()
        results += _compare_index_matrix(
            f"neighbors.{level}", pyramid.neighbors[level].numpy(), expected, match, match
        )
        if level + 1 < config.num_layers:
            coarse = levels[level + 1]
            expected = fixture["pools"][level].numpy()
            results += _compare_index_matrix(
                f"pools.{level}", pyramid.pools[level].numpy(), expected, coarse, match
            )
            expected = fixture["upsamples"][level].numpy()
            results += _compare_index_matrix(
                f"upsamples.{level}", pyramid.upsamples[level].numpy(), expected, match, coarse
            )
    return results


def fixture_pyramid(fixture: dict) -> PointPyramid:
    """The pyramid stored in a ``kpconv_pyramid*.pt`` fixture, as a :class:`PointPyramid`."""
    num_layers = len(fixture["points"])
    return PointPyramid(
        points=list(fixture["points"]),
        neighbors=list(fixture["neighbors"]),
        pools=list(fixture["pools"][: num_layers - 1]),
        upsamples=list(fixture["upsamples"][: num_layers - 1]),
        neighbor_limits=[int(v) for v in fixture["neighbor_limits"]],
        normalization_mean=fixture["normalization_mean"].numpy(),
        normalization_scale=float(fixture["normalization_scale"]),
    )


def _check_feature_net(
    fixture: dict, fixture_dir: Path | None, output_key: str, normalize: bool
) -> list[Comparison]:
    """Run :class:`KPConvFeatureNet` on the fixture's own pyramid; compare output and intermediates."""
    fixture_dir = Path(fixture_dir) if fixture_dir is not None else default_fixture_dir()
    pyramid_fixture = load_fixture(fixture_dir / str(fixture.get("inputs", DEFAULT_PYRAMID_FILE)).split()[0])
    expected = fixture[output_key]
    net = KPConvFeatureNet(out_dim=expected.shape[1], normalize=normalize)
    net.load_state_dict(float_state_dict(fixture["state_dict"]), strict=True)
    net.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(PARITY_THREADS)
    try:
        intermediates: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            output = net(fixture_pyramid(pyramid_fixture), pyramid_fixture["features"], intermediates)
    finally:
        torch.set_num_threads(threads)
    results = [compare(output_key, output, expected, **NET_TOL)]
    for name, reference in fixture.get("intermediate", {}).items():
        results.append(compare(f"intermediate.{name}", intermediates[name], reference, **NET_TOL))
    return results


def check_desc3d(fixture: dict, fixture_dir: Path | None = None) -> list[Comparison]:
    """Descriptor net (out_dim from the fixture, L2-normalised) on the sibling pyramid fixture."""
    return _check_feature_net(fixture, fixture_dir, "descriptors", normalize=True)


def check_ctx3d(fixture: dict, fixture_dir: Path | None = None) -> list[Comparison]:
    """Context net (out_dim from the fixture, not normalised) on the sibling pyramid fixture."""
    return _check_feature_net(fixture, fixture_dir, "context", normalize=False)


CHECKS: dict[str, FixtureCheck] = {
    "kpconv_pyramid": check_kpconv_pyramid,
    "desc3d": check_desc3d,
    "ctx3d": check_ctx3d,
}
