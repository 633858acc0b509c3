"""Classical backend: crop geometry, flow targets, the oracle (perfect correspondences) and a real run."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
import trimesh

from rnnpose_ros.core import metrics
from rnnpose_ros.core.backends.classical import (
    ClassicalBackend,
    ClassicalConfig,
    CropBatch,
    CropStage,
    _relight,
    _shading_basis,
)
from rnnpose_ros.core.objects import (
    ObjectModel,
    pybullet_mesh_available,
)
from rnnpose_ros.core.refiner import Instance, Refiner, RefineStatus
from rnnpose_ros.core.synth import SceneSpec, make_scene

pytestmark = pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")


class OracleBackend(ClassicalBackend):
    """Classical backend whose flow is the exact flow induced by the ground-truth poses.

    Everything else (crop windows, rendering, lifting of rendered pixels with rendered depth, the
    refiner's LM loop) is the production path.
    """

    ground_truth: np.ndarray  # (B, 4, 4)

    def flow_targets(
        self, crops: CropBatch, flow_input: str = "gray", relit_finest_scale: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        batch, height, width = crops.mask.shape
        targets = np.zeros((batch, height, width, 2), np.float32)
        weights = np.zeros((batch, height, width), np.float32)
        for b in range(batch):
            relative = self.ground_truth[b] @ np.linalg.inv(crops.poses[b])
            ys, xs = np.nonzero(crops.mask[b])
            z = crops.depth[b][ys, xs].astype(np.float64)
            K = crops.K[b]
            points = np.stack(((xs - K[0, 2]) / K[0, 0] * z, (ys - K[1, 2]) / K[1, 1] * z, z), 1)
            moved = points @ relative[:3, :3].T + relative[:3, 3]
            targets[b, ys, xs] = moved[:, :2] / moved[:, 2:] * np.diag(K)[:2] + K[:2, 2]
            weights[b, ys, xs] = 1.0
        return targets, weights


def test_oracle_recovers_ground_truth(duck_registry, renderer):
    """Perfect correspondences through the real lifting + LM path: < 1 mm and < 0.1° from 15°/1-1-5 cm."""
    # Full 6-DoF motion from the first iteration (the default schedule starts with median shifts).
    config = ClassicalConfig(stages=[CropStage(0, 160, 0.8), CropStage(4, 224, 0.4)])
    backend = OracleBackend(torch.device("cpu"), config, renderer)
    loop = replace(ClassicalBackend.default_loop(), outer_iterations=8, inner_steps=3)
    refiner = Refiner(duck_registry, backend=backend, config=loop)
    duck = duck_registry["duck"]
    scene = make_scene([duck, duck], 11, renderer)  # default noise 15°, 1/1/5 cm
    backend.ground_truth = np.stack([i.pose_gt for i in scene.instances])
    results = refiner.refine(scene.observation, [Instance("duck", i.pose_init) for i in scene.instances])
    for truth, result in zip(scene.instances, results, strict=True):
        assert result.status is RefineStatus.OK
        assert metrics.translation_error(truth.pose_init, truth.pose_gt) > 0.005  # a real start error
        assert metrics.translation_error(result.pose, truth.pose_gt) < 1e-3
        assert metrics.rotation_error_deg(result.pose, truth.pose_gt) < 0.1
        assert result.score > 0.9


def test_crop_intrinsics_match_the_crop(duck_registry, renderer):
    """A model vertex projects to the same crop pixel through K_crop as through the crop's affine map."""
    config = ClassicalConfig(stages=[CropStage(0, 64, 0.3)])
    backend = ClassicalBackend(torch.device("cpu"), config, renderer)
    scene = make_scene([duck_registry["duck"]], 2, renderer)
    models = [duck_registry["duck"]]
    backend.prepare_objects(models)
    frame = backend.prepare_frame(scene.observation, models, torch.zeros(1, 4, 4))
    pose = scene.instances[0].pose_gt
    x0, y0, side = backend.crop_windows(frame, pose[None], config.stages[0])[0]
    crops = backend.render_crops(frame, pose[None], config.stages[0])
    point = pose[:3, :3] @ duck_registry["duck"].vertices[0] + pose[:3, 3]
    in_image = point[:2] / point[2] * np.diag(scene.K)[:2] + scene.K[:2, 2]
    in_crop = point[:2] / point[2] * np.diag(crops.K[0])[:2] + crops.K[0][:2, 2]
    scale = 64 / side
    np.testing.assert_allclose(in_crop, scale * (in_image - (x0, y0)) - 0.5, atol=1e-9)
    assert crops.rendered.shape == (1, 64, 64, 3) and crops.rendered.dtype == np.uint8
    assert crops.mask.any()


def test_flow_targets_vanish_when_rendering_matches_the_image(renderer):
    """A yellow blob on a textured grey background, rendered exactly where it is: every flow input gives
    (nearly) zero flow, and only rendered pixels carry correspondences, with weights in [0, 1]."""
    backend = ClassicalBackend(torch.device("cpu"), ClassicalConfig(), renderer)
    rng = np.random.default_rng(0)
    size = 96
    grey = rng.integers(60, 140, (size, size), dtype=np.uint8)
    image = np.repeat(cv2.GaussianBlur(grey, (0, 0), 1.5)[..., None], 3, axis=2)
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (48, 50), (26, 18), 30, 0, 360, 1, -1)
    mask = mask.astype(bool)
    image[mask] = (230, 200, 40)
    image[40:46, 40:52][mask[40:46, 40:52]] = (230, 120, 20)  # some texture on the object
    depth = np.where(mask, 0.5, 0.0).astype(np.float32)
    crops = CropBatch(
        poses=np.eye(4)[None],
        K=np.array([[[300.0, 0.0, 48.0], [0.0, 300.0, 48.0], [0.0, 0.0, 1.0]]]),
        observed=image[None],
        rendered=image[None],
        depth=depth[None],
        mask=mask[None],
        normals=np.where(mask[..., None], np.float32([0.0, 0.0, -1.0]), np.float32(0.0))[None],
    )
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size)), -1)
    for flow_input in ("region", "relit", "gray"):
        targets, weights = backend.flow_targets(crops, flow_input)
        used = weights[0] > 0
        assert used.sum() > 0.5 * mask.sum(), flow_input
        assert not (used & ~mask).any(), flow_input
        assert weights.min() >= 0.0 and weights.max() <= 1.0
        error = np.linalg.norm(targets[0][used] - grid[used], axis=-1)
        assert np.median(error) < 0.1 and error.max() < 1.0, flow_input


# Milder initial-pose noise than the default 15° / 1, 1, 5 cm.
MILD = SceneSpec(rot_sigma_deg=8.0, trans_sigma=(0.008, 0.008, 0.03))


def test_real_refinement_improves_add(duck_registry, renderer):
    """DIS-based refinement on synthetic duck scenes (mild noise) lowers ADD on average."""
    refiner = Refiner(duck_registry, renderer=renderer)
    model = duck_registry["duck"]
    before, after = [], []
    for seed in (21, 22, 23):
        scene = make_scene([model], seed, renderer, MILD)
        truth = scene.instances[0]
        result = refiner.refine(scene.observation, [Instance("duck", truth.pose_init)])[0]
        assert result.status in (RefineStatus.OK, RefineStatus.DIVERGED, RefineStatus.TOO_FEW_CORRESPONDENCES)
        before.append(metrics.add(model.eval_points, truth.pose_init, truth.pose_gt))
        after.append(metrics.add(model.eval_points, result.pose, truth.pose_gt))
    assert np.mean(after) < np.mean(before)


def test_region_and_relit_flows_alternate_over_inner_steps(duck_registry, renderer):
    config = ClassicalConfig(stages=[CropStage(0, 96, 0.4, flow_input="region+relit")])
    backend = ClassicalBackend(torch.device("cpu"), config, renderer)
    scene = make_scene([duck_registry["duck"]], 4, renderer, SceneSpec(rot_sigma_deg=5.0))
    models = [duck_registry["duck"]]
    backend.prepare_objects(models)
    poses = torch.as_tensor(scene.instances[0].pose_init[None])
    frame = backend.prepare_frame(scene.observation, models, poses)
    view = backend.prepare_render(frame, poses, 0)
    relative = torch.eye(4, dtype=torch.float64)[None]
    steps = [backend.correspondences(frame, view, relative, k) for k in range(3)]
    assert steps[0].target is view.target and steps[2].target is view.target
    assert steps[1].target is view.alternates[0][0]
    assert not torch.equal(steps[0].target, steps[1].target)
    assert view.depth.shape == (1, 96, 96) and view.K.shape == (1, 3, 3)


def test_relight_recovers_gain_and_spherical_harmonic_shading(renderer):
    """An observed object shaded by per-channel gain and order-2 spherical-harmonic lighting is
    reproduced by re-shading the albedo rendering, rim included."""
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.05)
    sphere = ObjectModel.from_arrays("ball", mesh.vertices, mesh.faces)
    T = np.eye(4)
    T[2, 3] = 0.4
    K = np.array([[400.0, 0.0, 47.5], [0.0, 400.0, 47.5], [0.0, 0.0, 1.0]])
    out = renderer.render([sphere], T, K, (96, 96))
    mask = out.mask[0]
    normals = renderer.surface_normals([sphere], T[None], out)[0]
    rng = np.random.default_rng(1)
    albedo = np.where(mask[..., None], rng.uniform(0.4, 0.8, (96, 96, 3)), 0.0).astype(np.float32)
    gain, light = np.array([0.5, 0.45, 0.4]), np.array([0.1, -0.15, -0.3, 0.02, 0.03, -0.02, 0.04, -0.05])
    shading = gain + (_shading_basis(normals) @ light)[..., None]
    background = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    to_u8 = lambda x: np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)  # noqa: E731
    observed = np.where(mask[..., None], to_u8(albedo * shading), background)
    rendered = np.where(mask[..., None], to_u8(albedo), background)
    relit = _relight(rendered, observed, mask, normals)
    error = np.abs(relit.astype(int) - observed.astype(int))
    assert error[mask].max() <= 3  # albedo quantisation only
    assert (relit[~mask] == background[~mask]).all()


def test_object_cache_rebuilds_replaced_models_and_drops_released_ones() -> None:
    import gc

    from rnnpose_ros.core.backends.base import ObjectCache
    from rnnpose_ros.core.objects import ObjectModel

    box = trimesh.creation.box(extents=(0.1, 0.06, 0.04))
    built: list[str] = []

    def model(class_id: str) -> ObjectModel:
        return ObjectModel.from_arrays(class_id, np.asarray(box.vertices), np.asarray(box.faces))

    def build(m: ObjectModel) -> str:
        built.append(m.class_id)
        return f"{m.class_id}#{len(built)}"

    cache = ObjectCache(build)
    first, other = model("box"), model("crate")
    cache.prepare([first, other])
    cache.prepare([first])
    assert built == ["box", "crate"] and cache[first] == "box#1"
    replacement = model("box")  # the same class id registered again (replaced at run time)
    cache.prepare([replacement])
    assert cache[replacement] == "box#3"
    with pytest.raises(KeyError, match="not prepared"):
        cache[first]
    del other  # removed at run time: nothing refers to the model any more
    gc.collect()
    cache.prepare([replacement])
    assert len(cache) == 1 and built == ["box", "crate", "box"]
