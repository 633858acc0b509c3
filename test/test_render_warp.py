"""Warp renderer against the OpenGL renderer on real meshes; device selection; CUDA without host syncs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from rnnpose_ros.core.objects import ObjectModel, load_pybullet_object, pybullet_mesh_available
from rnnpose_ros.core.render import Lighting, Renderer, RenderError
from rnnpose_ros.core.renderers import default_renderer_kind, make_renderer
from rnnpose_ros.core.synth import sample_object_pose

SIZE = (96, 112)
K = np.array([[260.0, 0.0, 55.5], [0.0, 250.0, 47.5], [0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def warp_renderer():
    from rnnpose_ros.core.render_warp import WarpRenderer

    try:
        return WarpRenderer()
    except RenderError as exc:
        pytest.skip(f"NVIDIA Warp cannot initialise here: {exc}")


@pytest.fixture(scope="module")
def meshes() -> list[ObjectModel]:
    """Two real textured meshes (pybullet's duck and torus) and an untextured box."""
    if not pybullet_mesh_available():
        pytest.skip("pybullet_data meshes not installed")
    box = trimesh.creation.box(extents=(0.1, 0.08, 0.06))
    return [
        load_pybullet_object("duck"),
        load_pybullet_object("torus"),
        ObjectModel.from_arrays("box", box.vertices, box.faces),
    ]


@pytest.fixture(scope="module")
def views(meshes):
    """Six instances, two per model, at random poses (seeded), mixed in one batch."""
    rng = np.random.default_rng(7)
    models = [meshes[i % len(meshes)] for i in range(6)]
    poses = np.stack([sample_object_pose(m, rng, K, SIZE, distance=(0.3, 0.7)) for m in models])
    return models, poses


def test_warp_agrees_with_opengl_on_real_meshes(renderer, warp_renderer, views):
    models, poses = views
    lighting = Lighting(shininess=4.0, light_position=(0.3, -0.8, -0.5))  # a specular lobe is exercised
    gl = renderer.render(models, poses, K, SIZE, lighting=lighting)
    warp = warp_renderer.render(models, poses, K, SIZE, lighting=lighting)

    union, both = gl.mask | warp.mask, gl.mask & warp.mask
    for b in range(len(models)):
        assert both[b].sum() > 300, f"instance {b} barely visible: the comparison would be empty"
    assert (gl.mask == warp.mask)[union].mean() >= 0.999
    same_face = both & (gl.face_index == warp.face_index)
    assert same_face.sum() >= 0.998 * both.sum()
    assert np.abs(gl.barycentric - warp.barycentric)[same_face].max() <= 1e-3
    # Where the two pick different faces (a pixel centre on an edge, within round-off) the depth may
    # jump across a self-occlusion: exact agreement is required where they pick the same face.
    depth_error = np.abs(gl.depth - warp.depth)
    assert depth_error[same_face].max() <= 10e-6
    assert np.quantile(depth_error[both], 0.999) <= 10e-6
    colour_error = np.abs(gl.rgb - warp.rgb).max(-1)
    assert colour_error[same_face].max() <= 2e-3
    assert np.quantile(colour_error[both], 0.999) <= 2e-3
    assert (warp.rgb[~warp.mask] == 0).all() and (warp.depth[~warp.mask] == 0).all()
    assert (warp.face_index[~warp.mask] == -1).all() and (warp.barycentric[~warp.mask] == 0).all()

    normals_gl = renderer.surface_normals(models, poses, gl)
    normals_warp = warp_renderer.surface_normals(models, poses, gl)
    assert np.abs(normals_gl - normals_warp).max() <= 1e-5


def test_batch_equals_single_views(warp_renderer, views):
    models, poses = views
    batch = warp_renderer.render(models, poses, K, SIZE)
    for b in (0, 1, 2):
        single = warp_renderer.render([models[b]], poses[b], K, SIZE)
        for field in ("rgb", "depth", "mask", "face_index", "barycentric"):
            np.testing.assert_array_equal(getattr(batch, field)[b], getattr(single, field)[0], err_msg=field)


def test_render_tensors_stay_on_the_poses_device(warp_renderer, views):
    models, poses = views
    poses_t = torch.from_numpy(poses)
    out = warp_renderer.render_tensors(models[:2], poses_t[:2].float(), torch.from_numpy(K).float(), SIZE)
    batch = (2, *SIZE)
    assert out.face_index.shape == batch and out.face_index.dtype == torch.int64
    assert out.barycentric.shape == (*batch, 3) and out.barycentric.dtype == torch.float32
    assert out.depth.shape == batch and out.depth.dtype == torch.float32
    assert out.rgb.shape == (*batch, 3) and out.mask.dtype == torch.bool
    sums = out.barycentric.sum(-1)[out.mask]
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


@pytest.mark.parametrize("t", [(0.0, 0.0, -0.5), (0.0, 0.0, -0.05), (5.0, 0.0, 0.5), (0.0, -3.0, 0.5)])
def test_degenerate_poses_give_empty_render(warp_renderer, meshes, t):
    T = np.eye(4)
    T[:3, 3] = t
    out = warp_renderer.render([meshes[2]], T, K, SIZE)
    assert not out.mask.any() and (out.depth == 0).all() and (out.rgb == 0).all()
    assert not warp_renderer.render([meshes[2]], np.full((4, 4), np.nan), K, SIZE).mask.any()
    singular = np.diag([250.0, 0.0, 1.0])
    assert not warp_renderer.render(
        [meshes[2]], np.eye(4) + np.diag([0, 0, 0.5, 0]), singular, SIZE
    ).mask.any()


def test_camera_inside_object_sees_the_inside_as_opengl_does(renderer, warp_renderer, meshes):
    T = np.eye(4)  # camera at the box centre: every pixel sees an inner face beyond the near plane
    gl = renderer.render([meshes[2]], T, K, SIZE)
    warp = warp_renderer.render([meshes[2]], T, K, SIZE)
    assert warp.mask.all() and gl.mask.all()
    assert np.abs(gl.depth - warp.depth).max() <= 10e-6


def test_bad_inputs_raise(warp_renderer, meshes):
    with pytest.raises(ValueError, match="poses must have shape"):
        warp_renderer.render([meshes[2]], np.eye(3), K, SIZE)
    with pytest.raises(ValueError, match="must match"):
        warp_renderer.render(meshes[:2], np.stack([np.eye(4)] * 3), K, SIZE)
    with pytest.raises(ValueError, match="image size"):
        warp_renderer.render([meshes[2]], np.eye(4), K, (0, 10))


def test_renderer_choice_by_device(warp_renderer):
    from rnnpose_ros.core.render_warp import WarpRenderer

    assert default_renderer_kind("cpu") == "opengl" and default_renderer_kind("cuda:0") == "warp"
    assert isinstance(make_renderer("cpu", "warp"), WarpRenderer)
    chosen = make_renderer("cpu")
    assert isinstance(chosen, Renderer)
    chosen.close()
    with pytest.raises(ValueError, match="unknown renderer"):
        make_renderer("cpu", "vulkan")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_render_matches_cpu_without_host_synchronisation(warp_renderer, views):
    from rnnpose_ros.core.render_warp import WarpRenderer

    models, poses = views
    cuda = WarpRenderer(device="cuda")
    poses_t, K_t = torch.from_numpy(poses).cuda(), torch.from_numpy(K).cuda()
    for combination in (models, models[1:3]):  # uploads the meshes and packs each combination once
        cuda.render_tensors(combination, poses_t[: len(combination)], K_t, SIZE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda.render_tensors(models[1:3], poses_t[:2], K_t, SIZE)
        out = cuda.render_tensors(models, poses_t, K_t, SIZE)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.face_index.device.type == "cuda"
    cpu = warp_renderer.render(models, poses, K, SIZE)
    both = cpu.mask & out.mask.cpu().numpy()
    assert (cpu.mask == out.mask.cpu().numpy()).mean() >= 0.999
    assert np.abs(cpu.depth - out.depth.cpu().numpy())[both].max() <= 10e-6


def test_learned_refinement_is_the_same_with_either_renderer(renderer, warp_renderer, meshes, tmp_path):
    """The learned backend takes ``render_tensors`` from either renderer: one refinement (random
    weights, small crops, a short schedule) ends at the same pose."""
    from dataclasses import replace

    from rnnpose_ros.core.backends.learned import LearnedBackend, LearnedConfig
    from rnnpose_ros.core.checkpoint import save_checkpoint
    from rnnpose_ros.core.model import RNNPoseNet
    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.refiner import Instance, Refiner, RefineStatus
    from rnnpose_ros.core.synth import make_scene

    class Switch:
        """Forwards every renderer call to ``target``: one refiner (its object features computed
        once) renders with each renderer in turn."""

        target = renderer

        def __getattr__(self, name):
            return getattr(self.target, name)

    duck = meshes[0]
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "duck.pt", RNNPoseNet())
    config = LearnedConfig(first_crop_size=96, zoom_crop_size=64, weights={"duck": tmp_path / "duck.pt"})
    loop = replace(LearnedBackend.default_loop(), outer_iterations=2, inner_steps=1, restart_below_score=None)
    switch = Switch()
    refiner = Refiner(
        ObjectRegistry(models={"duck": duck}),
        backend="rnnpose",
        config=loop,
        backend_config=config,
        renderer=switch,
    )
    scene = make_scene([duck], 3, renderer)
    start = scene.instances[0].pose_init
    results = []
    for target in (renderer, warp_renderer):
        switch.target = target
        results.append(refiner.refine(scene.observation, [Instance("duck", start)])[0])
    assert all(r.status is RefineStatus.OK for r in results)
    assert not np.allclose(results[0].pose, start)
    np.testing.assert_allclose(results[0].pose, results[1].pose, atol=1e-5)
