"""KPConv point pyramid and 3D feature nets: golden parity and generic properties."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnpose_ros.core.nets import kpconv
from rnnpose_ros.core.nets.kpconv import KPConv, KPConvFeatureNet
from rnnpose_ros.core.nets.kpconv_pyramid import (
    PointPyramid,
    PointPyramidError,
    build_point_pyramid,
    calibrate_neighbor_limit,
    grid_subsample,
    radius_neighbors,
)
from rnnpose_ros.tools.bench_nets import synthetic_cloud
from rnnpose_ros.tools.parity_common import load_fixture
from rnnpose_ros.tools.parity_kpconv import CHECKS

STATE_DICT_SPEC = Path(__file__).resolve().parents[1].parent / "shared" / "design" / "rnnpose_state_dict.json"
NET_PREFIXES = {
    (32, True): "hybrid_desc_net.corr_fea_extractor_3d.",
    (256, False): "ctx_fea_net.context_fea_extractor_3d.",
}


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_golden_parity(golden: Path, kind: str) -> None:
    path = golden / f"{kind}.pt"
    if not path.is_file():
        pytest.skip(f"golden fixture {path} not found")
    comparisons = CHECKS[kind](load_fixture(path), golden)
    assert comparisons
    failed = [c for c in comparisons if not c.passed]
    assert not failed, "\n".join(
        f"{c.name}: abs {c.max_abs:.3g} rel {c.max_rel:.3g} {c.detail}" for c in failed
    )


def test_radius_neighbors_match_brute_force() -> None:
    generator = torch.Generator().manual_seed(1)
    supports = torch.rand(400, 3, generator=generator)
    queries = torch.rand(150, 3, generator=generator)
    radius = 0.2
    result = radius_neighbors(queries.numpy(), supports.numpy(), radius)
    distances = torch.cdist(queries, supports, compute_mode="donot_use_mm_for_euclid_dist")
    assert not torch.isclose(distances, torch.tensor(radius), atol=1e-6).any()  # no borderline pairs
    within = distances < radius
    assert result.shape == (150, int(within.sum(1).max()))
    for row, indices in enumerate(result):
        valid = indices[indices < len(supports)]
        assert set(valid.tolist()) == set(torch.nonzero(within[row]).flatten().tolist())
        assert (indices[len(valid) :] == len(supports)).all()  # padding only after the valid entries
        assert torch.all(torch.diff(distances[row, valid]) >= 0)  # sorted by distance


def test_grid_subsample_gives_voxel_barycentres() -> None:
    points = synthetic_cloud(1500) * 10
    cell = 0.05
    subsampled = grid_subsample(points, cell)
    origin = np.floor(points.min(0) / cell) * cell
    voxels = np.floor((points - origin) / cell).astype(np.int64)
    unique, inverse = np.unique(voxels, axis=0, return_inverse=True)
    means = np.stack([points[inverse.ravel() == v].mean(0) for v in range(len(unique))])
    assert subsampled.shape == means.shape and subsampled.dtype == np.float32
    order = np.lexsort(means.T[::-1])
    np.testing.assert_allclose(subsampled[np.lexsort(subsampled.T[::-1])], means[order], atol=1e-6)


def test_neighbor_limit_is_the_keep_ratio_quantile() -> None:
    assert calibrate_neighbor_limit(np.array([1, 2, 3, 4, 5])) == 4
    assert calibrate_neighbor_limit(np.full(10, 7)) == 7
    # Counts at or above the histogram cap are left out, as in the published calibration.
    assert calibrate_neighbor_limit(np.array([2, 2, 2, 2, 2000, 2000, 2000])) == 2


def test_pyramid_shapes_and_padding() -> None:
    pyramid = build_point_pyramid(synthetic_cloud(1200))
    sizes = [len(p) for p in pyramid.points]
    assert sizes[0] == 1200 and all(a > b > 0 for a, b in itertools.pairwise(sizes))
    assert len(pyramid.pools) == len(pyramid.upsamples) == pyramid.num_layers - 1
    for level, limit in enumerate(pyramid.neighbor_limits):
        neighbors = pyramid.neighbors[level]
        assert neighbors.shape[0] == sizes[level] and neighbors.shape[1] <= limit
        assert torch.equal(neighbors[:, 0], torch.arange(sizes[level]))  # each point is its own nearest
        assert int(neighbors.max()) <= sizes[level]
        if level + 1 < pyramid.num_layers:
            assert pyramid.pools[level].shape[0] == sizes[level + 1]
            assert int(pyramid.pools[level].max()) <= sizes[level]
            assert pyramid.upsamples[level].shape[0] == sizes[level]
            assert int(pyramid.upsamples[level][:, 0].max()) < sizes[level + 1]  # coarse point within 2r
    moved = pyramid.to("cpu")
    assert all(torch.equal(a, b) for a, b in zip(moved.neighbors, pyramid.neighbors, strict=True))


def test_pyramid_rejects_bad_clouds() -> None:
    with pytest.raises(PointPyramidError):
        build_point_pyramid(np.zeros((10, 2), np.float32))
    with pytest.raises(PointPyramidError):
        build_point_pyramid(np.zeros((10, 3), np.float32))


def _net(out_dim: int, normalize: bool) -> KPConvFeatureNet:
    torch.manual_seed(0)
    return KPConvFeatureNet(out_dim, normalize).eval()


@pytest.mark.parametrize(("out_dim", "normalize"), [(32, True), (256, False)])
def test_nets_are_permutation_equivariant(out_dim: int, normalize: bool) -> None:
    cloud = synthetic_cloud(600, seed=2)
    permutation = np.random.default_rng(3).permutation(len(cloud))
    pyramid = build_point_pyramid(cloud)
    permuted = build_point_pyramid(cloud[permutation], pyramid.neighbor_limits)
    net = _net(out_dim, normalize)
    with torch.no_grad():
        output = net(pyramid)
        output_permuted = net(permuted)
    assert output.shape == (600, out_dim)
    assert torch.isfinite(output).all()
    if normalize:
        torch.testing.assert_close(output.norm(dim=1), torch.ones(600), atol=1e-5, rtol=0)
    torch.testing.assert_close(output_permuted, output[permutation], atol=1e-4, rtol=1e-4)


def test_state_dict_layout_matches_checkpoint() -> None:
    if not STATE_DICT_SPEC.is_file():
        pytest.skip(f"state-dict key list {STATE_DICT_SPEC} not found")
    spec = {key: tuple(shape) for key, shape in json.loads(STATE_DICT_SPEC.read_text())}
    for (out_dim, normalize), prefix in NET_PREFIXES.items():
        expected = {key[len(prefix) :]: shape for key, shape in spec.items() if key.startswith(prefix)}
        actual = {
            key: tuple(value.shape)
            for key, value in KPConvFeatureNet(out_dim, normalize).state_dict().items()
        }
        assert actual == expected


def test_pyramid_point_type() -> None:
    pyramid = build_point_pyramid(torch.from_numpy(synthetic_cloud(300)))
    assert isinstance(pyramid, PointPyramid)
    assert all(p.dtype == torch.float32 for p in pyramid.points)
    assert all(n.dtype == torch.int64 for n in pyramid.neighbors)
    np.testing.assert_allclose(pyramid.points[0].numpy().mean(0), 0, atol=1e-6)
    extent = pyramid.points[0].max(0).values - pyramid.points[0].min(0).values
    assert float(extent.max()) == pytest.approx(1.0, abs=1e-6)


def test_kpconv_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    pyramid = build_point_pyramid(synthetic_cloud(400, seed=4))
    torch.manual_seed(5)
    conv = KPConv(4, 8, radius=0.0625)
    features = torch.randn(400, 4)
    points, neighbors = pyramid.points[0], pyramid.neighbors[0]
    with torch.no_grad():
        whole = conv(points, points, neighbors, features)
        monkeypatch.setattr(kpconv, "CHUNK_ELEMENTS", 1000)
        chunked = conv(points, points, neighbors, features)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
