"""Both backends resample the observed depth into each instance's crop like the image (nearest), so
that it is registered to the rendering; and a depth frame refines to millimetres."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from rnnpose_ros.core.backends.classical import ClassicalBackend
from rnnpose_ros.core.backends.learned import LearnedBackend, LearnedConfig
from rnnpose_ros.core.checkpoint import save_checkpoint
from rnnpose_ros.core.depth_sensor import DepthSensorModel
from rnnpose_ros.core.model import RNNPoseNet
from rnnpose_ros.core.refiner import Instance, Refiner, RefineStatus
from rnnpose_ros.core.synth import SceneSpec, make_scene

EXACT = DepthSensorModel(sigma_2=0.0, edge_hole_prob=0.0, flying_prob=0.0, dropout_prob=0.0)


@pytest.fixture(scope="module")
def scene(renderer, duck_registry):
    return make_scene([duck_registry["duck"]], 7, renderer, SceneSpec(depth=EXACT))


def check_registered(view, source: np.ndarray) -> None:
    """The cropped observation's depth equals the rendering's where both see the object."""
    rendered, observed = view.depth[0].numpy(), view.observed_depth[0].numpy()
    both = (rendered > 0.02) & (observed > 0)
    assert both.sum() > 0.8 * (rendered > 0.02).sum()
    assert np.median(np.abs(observed[both] - rendered[both])) < 0.002
    # Nearest resampling: every observed value is one of the image's values (no blend across edges).
    assert np.isin(observed[observed > 0], np.unique(source)).all()


def test_classical_backend_crops_the_depth(renderer, duck_registry, scene):
    backend = ClassicalBackend("cpu", renderer=renderer)
    models = [duck_registry["duck"]]
    backend.prepare_objects(models)
    poses = torch.from_numpy(scene.instances[0].pose_gt[None])
    frame = backend.prepare_frame(scene.observation.validated(), models, poses)
    for iteration in (0, 11):  # the wide and the tight crop
        check_registered(backend.prepare_render(frame, poses, iteration), scene.depth)
    rgb_only = backend.prepare_frame(replace(scene.observation, depth=None).validated(), models, poses)
    assert backend.prepare_render(rgb_only, poses, 0).observed_depth is None


def test_learned_backend_crops_the_depth(renderer, duck_registry, scene, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "duck.pt"
    save_checkpoint(weights, RNNPoseNet())
    config = LearnedConfig(first_crop_size=160, zoom_crop_size=120, weights={"duck": weights})
    backend = LearnedBackend("cpu", config, renderer=renderer)
    models = [duck_registry["duck"]]
    backend.prepare_objects(models)
    poses = torch.from_numpy(scene.instances[0].pose_gt[None])
    frame = backend.prepare_frame(scene.observation.validated(), models, poses)
    check_registered(backend.prepare_render(frame, poses, 0), scene.depth)


def test_depth_frame_refines_to_millimetres(renderer, duck_registry):
    scene = make_scene([duck_registry["duck"]], 2, renderer, SceneSpec(occluders=2, depth=DepthSensorModel()))
    refiner = Refiner(duck_registry, renderer=renderer)
    truth = scene.instances[0]
    result = refiner.refine(scene.observation, [Instance("duck", truth.pose_init)])[0]
    assert result.status is RefineStatus.OK
    assert np.linalg.norm(result.pose[:3, 3] - truth.pose_gt[:3, 3]) < 0.004
    assert 0.6 <= result.score <= 1.0
