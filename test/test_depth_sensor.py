"""The depth-camera model and the synthetic scenes' depth images."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from rnnpose_ros.core.depth_sensor import DepthSensorModel, simulate_depth
from rnnpose_ros.core.synth import SceneSpec, make_scene

K = np.array([[300.0, 0.0, 79.5], [0.0, 300.0, 59.5], [0.0, 0.0, 1.0]])
SIZE = (120, 160)
#: Only the axial noise: no holes, no quantisation, no dropouts.
NOISE_ONLY = DepthSensorModel(quantum_m=0.0, edge_hole_prob=0.0, flying_prob=0.0, dropout_prob=0.0)


def plane(z: float) -> np.ndarray:
    return np.full(SIZE, z)


def test_axial_noise_grows_with_the_square_of_the_distance():
    rng = np.random.default_rng(0)
    for z in (0.5, 1.0, 2.0):
        noisy = simulate_depth(plane(z), K, rng, NOISE_ONLY)
        assert np.std(noisy - z) == pytest.approx(0.0036 * z * z, rel=0.05)
        assert abs(np.mean(noisy - z)) < 0.1 * 0.0036 * z * z
    kinect = DepthSensorModel.kinect_v1()
    assert kinect.sigma(0.4) == pytest.approx(0.0012) and kinect.sigma(1.4) == pytest.approx(0.0031)


def test_quantisation_dropouts_range_and_shift():
    rng = np.random.default_rng(1)
    model = DepthSensorModel(dropout_prob=0.1)
    depth = simulate_depth(plane(0.7), K, rng, model)
    assert depth.dtype == np.float32 and depth.shape == SIZE
    valid = depth > 0
    np.testing.assert_allclose(depth[valid] * 1000, np.round(depth[valid] * 1000), atol=1e-3)
    assert 0.07 < 1 - valid.mean() < 0.13  # dropouts at the border are holes of the edge band too
    assert not simulate_depth(plane(20.0), K, rng, model).any()  # beyond the working range
    ramp = np.tile(np.linspace(0.5, 0.6, SIZE[1]), (SIZE[0], 1))
    exact = simulate_depth(ramp, K, rng, replace(NOISE_ONLY, sigma_2=0.0))
    shifted = simulate_depth(ramp, K, rng, replace(NOISE_ONLY, sigma_2=0.0, shift_px=(2, -1)))
    np.testing.assert_array_equal(shifted[:-1, 2:], exact[1:, :-2])
    assert not shifted[:, :2].any() and not shifted[-1].any()


def test_depth_edges_get_holes_and_flying_pixels():
    step = plane(0.5)
    step[:, 80:] = 0.9
    rng = np.random.default_rng(2)
    model = replace(NOISE_ONLY, sigma_2=0.0, edge_hole_prob=0.5, flying_prob=0.5)
    depth = simulate_depth(step, K, rng, model)
    band = depth[:, 79:81]
    assert 0.3 < (band == 0).mean() < 0.7
    flying = (band > 0.51) & (band < 0.89)
    assert flying.any()
    np.testing.assert_array_equal(depth[:, :79], step[:, :79].astype(np.float32))
    np.testing.assert_array_equal(depth[:, 81:], step[:, 81:].astype(np.float32))


def test_grazing_surfaces_return_nothing():
    u = np.arange(SIZE[1], dtype=np.float64)
    # A plane seen at ≈ 84° from its normal: z grows by 10 × the lateral step.
    x_over_z = (u - K[0, 2]) / K[0, 0]
    steep = np.tile(0.6 / (1.0 - 10.0 * x_over_z.clip(-0.09, 0.09)), (SIZE[0], 1))
    model = replace(NOISE_ONLY, sigma_2=0.0, edge_jump_m=1.0)
    depth = simulate_depth(steep, K, np.random.default_rng(3), model)
    centre = depth[5:-5, 60:100]
    assert (centre == 0).mean() > 0.95
    assert (simulate_depth(plane(0.6), K, np.random.default_rng(3), model)[5:-5, 5:-5] > 0).all()


def test_scene_depth_is_registered_and_leaves_the_rgb_scene_unchanged(renderer, duck_registry):
    duck = duck_registry["duck"]
    spec = SceneSpec(occluders=2)
    for seed in (5, 6):
        rgb = make_scene([duck], seed, renderer, spec)
        rgbd = make_scene([duck], seed, renderer, replace(spec, depth=DepthSensorModel()))
        assert rgb.depth is None and rgb.observation.depth is None
        np.testing.assert_array_equal(rgb.image, rgbd.image)
        np.testing.assert_array_equal(rgb.instances[0].pose_init, rgbd.instances[0].pose_init)
        np.testing.assert_array_equal(rgb.instances[0].mask, rgbd.instances[0].mask)
        depth = rgbd.observation.validated().depth
        assert depth.dtype == np.float32 and depth.shape == rgb.image.shape[:2]
        truth = renderer.render([duck], rgbd.instances[0].pose_gt, rgbd.K, rgb.image.shape[:2]).depth[0]
        visible = rgbd.instances[0].mask & (truth > 0) & (depth > 0)
        error = depth[visible] - truth[visible]
        # Object pixels: the rendered depth within the sensor noise (and a few flying pixels).
        assert np.median(np.abs(error)) < 0.004
        assert (np.abs(error) < 0.02).mean() > 0.9
        # Occluded object pixels read nearer, and everything off the object lies behind it.
        hidden = (truth > 0) & ~rgbd.instances[0].mask & (depth > 0)
        if hidden.any():
            assert np.median(depth[hidden] - truth[hidden]) < -0.015
        background = (truth == 0) & (depth > 0)
        assert np.median(depth[background]) > np.median(truth[truth > 0])
