"""Synthetic scenes: determinism, pose-noise statistics, ground truth consistent with the image."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.synth import (
    DEFAULT_K,
    SceneSpec,
    make_scene,
    perturb_pose,
    rotation_angle_deg,
    supersampled_intrinsics,
)

SIZE = (120, 160)
K_SMALL = np.array([[143.0, 0, 79.5], [0, 143.0, 59.5], [0, 0, 1]])
SMALL = SceneSpec(size=SIZE, K=K_SMALL)


def coloured_box(extents=(0.08, 0.06, 0.05), class_id="box") -> ObjectModel:
    mesh = trimesh.creation.box(extents=extents)
    colours = (np.abs(mesh.vertices) / np.abs(mesh.vertices).max() * 255).astype(np.uint8)
    return ObjectModel.from_arrays(class_id, mesh.vertices, mesh.faces, vertex_colors=colours)


@pytest.fixture(scope="module")
def box():
    return coloured_box()


def test_perturbation_statistics():
    rng = np.random.default_rng(0)
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("xyz", [10, 70, -30], degrees=True).as_matrix()
    T[:3, 3] = [0.05, -0.02, 0.6]
    draws = [perturb_pose(T, rng) for _ in range(2000)]
    angles = np.array([rotation_angle_deg(D[:3, :3] @ T[:3, :3].T) for D in draws])
    assert angles.max() <= 45.0 + 1e-9
    # the capped distribution of 3 x N(0, 15 deg): mean angle about 22-23 deg, and not all tiny
    assert 19.0 < angles.mean() < 26.0 and (angles > 35).mean() > 0.05
    euler = np.array(
        [Rotation.from_matrix(D[:3, :3] @ T[:3, :3].T).as_euler("xyz", degrees=True) for D in draws]
    )
    assert np.all(np.abs(euler.std(0) - 14.0) < 2.5)  # ~15 deg per axis, slightly shrunk by the cap
    trans = np.array([D[:3, 3] - T[:3, 3] for D in draws])
    np.testing.assert_allclose(trans.std(0), [0.01, 0.01, 0.05], rtol=0.08)
    np.testing.assert_allclose(trans.mean(0), 0.0, atol=0.004)
    for D in draws[:10]:  # still a rigid transform
        np.testing.assert_allclose(D[:3, :3] @ D[:3, :3].T, np.eye(3), atol=1e-12)


def test_perturbation_cap_and_zero_noise():
    rng = np.random.default_rng(3)
    wide = [perturb_pose(np.eye(4), rng, rot_sigma_deg=20.0, max_angle_deg=15.0) for _ in range(200)]
    assert max(rotation_angle_deg(D[:3, :3]) for D in wide) <= 15.0 + 1e-9
    same = perturb_pose(np.eye(4), rng, rot_sigma_deg=0.0, trans_sigma=(0, 0, 0))
    np.testing.assert_allclose(same, np.eye(4), atol=1e-12)


def test_scene_is_deterministic(renderer, box):
    spec = replace(SMALL, occluders=1)
    a = make_scene([box], 42, renderer, spec)
    b = make_scene([box], 42, renderer, spec)
    c = make_scene([box], 43, renderer, spec)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.instances[0].pose_gt, b.instances[0].pose_gt)
    np.testing.assert_array_equal(a.instances[0].pose_init, b.instances[0].pose_init)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.uint8 and a.image.shape == (*SIZE, 3)
    assert a.seed == 42 and a.K.shape == (3, 3)


def test_equivalent_specs_give_identical_scenes(renderer, box):
    """A spec, the same spec spelled out field by field, and overrides of a base spec: one scene."""
    reference = make_scene([box], 42, renderer, replace(SMALL, occluders=1))
    spelled_out = SceneSpec(
        size=SIZE,
        K=K_SMALL.copy(),
        distance=(0.3, 1.0),
        min_in_view=0.9,
        min_visible=0.5,
        occluders=1,
        max_occlusion=0.4,
        noise_std=0.02,
        blur_sigma=1.0,
        rot_sigma_deg=15.0,
        trans_sigma=(0.01, 0.01, 0.05),
        max_angle_deg=45.0,
        supersample=2,
        max_tries=20,
    )
    for scene in (
        make_scene([box], 42, renderer, spelled_out),
        make_scene([box], np.random.default_rng(42), renderer, replace(SMALL, occluders=1)),
    ):
        np.testing.assert_array_equal(scene.image, reference.image)
        np.testing.assert_array_equal(scene.instances[0].pose_init, reference.instances[0].pose_init)
        np.testing.assert_array_equal(scene.instances[0].mask, reference.instances[0].mask)


def test_default_spec_centres_the_default_camera_on_the_image():
    K = SceneSpec(size=SIZE).intrinsics()
    np.testing.assert_allclose(K, [[572.0, 0.0, 79.5], [0.0, 572.0, 59.5], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(SceneSpec().intrinsics(), DEFAULT_K)
    np.testing.assert_array_equal(SMALL.intrinsics(), K_SMALL)


def test_ground_truth_projects_into_image(renderer, box):
    rng = np.random.default_rng(7)
    for _ in range(3):
        scene = make_scene([box, box], rng, renderer, replace(SMALL, noise_std=0.0, blur_sigma=0.0))
        assert [inst.instance_id for inst in scene.instances] == ["box_0", "box_1"]
        for inst in scene.instances:
            T = inst.pose_gt
            depth = T[2, 3] + T[2, :3] @ box.center
            assert 0.3 - box.bounding_radius <= depth <= 1.0 + box.bounding_radius
            centre = K_SMALL @ (T[:3, :3] @ box.center + T[:3, 3])
            u, v = centre[:2] / centre[2]
            assert -0.5 <= u <= SIZE[1] - 0.5 and -0.5 <= v <= SIZE[0] - 0.5
            assert inst.visible_fraction >= 0.5 and inst.mask.sum() > 0
            # the visible mask lies where the renderer draws the object at the GT pose
            alone = renderer.render([box], T, K_SMALL, SIZE).mask[0]
            assert (inst.mask & ~alone).sum() <= 0.1 * inst.mask.sum()
            assert rotation_angle_deg(inst.pose_init[:3, :3] @ T[:3, :3].T) <= 45.0 + 1e-9


def test_occluders_reported(renderer, box):
    fractions = []
    for seed in range(6):
        scene = make_scene([box], seed, renderer, replace(SMALL, occluders=2, max_occlusion=0.4))
        fractions.append(scene.instances[0].visible_fraction)
    assert all(0.6 - 1e-9 <= f <= 1.0 for f in fractions)
    assert min(fractions) < 1.0  # some occluder did land on the object


def test_supersampled_intrinsics_align_with_native(renderer, box):
    T = np.eye(4)
    T[:3, 3] = [0.01, 0.0, 0.5]
    native = renderer.render([box], T, K_SMALL, SIZE).mask[0]
    high = renderer.render([box], T, supersampled_intrinsics(K_SMALL, 2), (SIZE[0] * 2, SIZE[1] * 2)).mask[0]
    coverage = high.reshape(SIZE[0], 2, SIZE[1], 2).mean(axis=(1, 3))
    ys, xs = np.nonzero(native)
    yc, xc = np.nonzero(coverage > 0)
    w = coverage[yc, xc]
    assert abs((xc * w).sum() / w.sum() - xs.mean()) < 0.1 and abs((yc * w).sum() / w.sum() - ys.mean()) < 0.1


def test_default_camera():
    assert DEFAULT_K[0, 0] == pytest.approx(572.0) and DEFAULT_K[0, 2] == pytest.approx(319.5)


def test_duck_scene_default_camera(renderer, duck_registry):
    duck = duck_registry["duck"]
    scene = make_scene([duck], 5, renderer)
    assert scene.image.shape == (480, 640, 3) and scene.background
    np.testing.assert_allclose(scene.K, [[572, 0, 319.5], [0, 572, 239.5], [0, 0, 1]])
    inst = scene.instances[0]
    assert inst.class_id == "duck" and inst.mask.sum() > 100
    # the duck's pixels differ from the bare background photo: it is really drawn there
    ys, xs = np.nonzero(inst.mask)
    assert scene.image[ys, xs].astype(float).std() > 5
