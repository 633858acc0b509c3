"""The learned RNNPose backend inside the Refiner: batching, weights groups, caches, bad weights.

Weights are random (seeded) — the published checkpoints are not redistributable — so these tests
check the machinery (shapes, batching, finiteness, strict loading), not accuracy. A reduced crop
size and schedule keep them fast on two CPU cores; the published sizes run in the benchmark.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnpose_ros.core.backends import BackendError
from rnnpose_ros.core.backends.learned import LearnedBackend, LearnedConfig
from rnnpose_ros.core.checkpoint import save_checkpoint
from rnnpose_ros.core.model import RNNPoseNet
from rnnpose_ros.core.objects import ObjectRegistry, load_pybullet_object, pybullet_mesh_available
from rnnpose_ros.core.refiner import Instance, Refiner, RefineStatus
from rnnpose_ros.core.synth import make_scene

pytestmark = pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")

SMALL = LearnedConfig(first_crop_size=160, zoom_crop_size=120)
SHORT = replace(LearnedBackend.default_loop(), outer_iterations=2, inner_steps=2)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    """Two different random weight files (one per class)."""
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for seed, class_id in enumerate(("duck", "sphere")):
        torch.manual_seed(seed)
        files[class_id] = folder / f"{class_id}.pt"
        save_checkpoint(files[class_id], RNNPoseNet())
    return files


@pytest.fixture(scope="module")
def registry() -> ObjectRegistry:
    duck = load_pybullet_object("duck")
    sphere = load_pybullet_object("textured_sphere", class_id="sphere")
    return ObjectRegistry(models={"duck": duck, "sphere": sphere})


@pytest.fixture(scope="module")
def scene(registry, renderer):
    return make_scene([registry["duck"], registry["sphere"], registry["duck"]], 11, renderer)


def refiner(registry, renderer, weight_files, **changes) -> Refiner:
    config = replace(SMALL, weights=dict(weight_files), **changes)
    return Refiner(registry, backend="rnnpose", config=SHORT, backend_config=config, renderer=renderer)


def test_batched_equals_one_by_one(registry, renderer, weight_files, scene) -> None:
    """3 instances of 2 classes with different weights: one call == three calls (float tolerance)."""
    torch.set_num_threads(2)
    instances = [Instance(i.class_id, i.pose_init, i.instance_id) for i in scene.instances]
    engine = refiner(registry, renderer, weight_files)
    together = engine.refine(scene.observation, instances)
    alone = [engine.refine(scene.observation, [inst])[0] for inst in instances]
    for a, b in zip(together, alone, strict=True):
        assert a.status is RefineStatus.OK, a.message
        assert a.instance_id == b.instance_id
        np.testing.assert_allclose(a.pose, b.pose, atol=2e-5)
        assert a.score == pytest.approx(b.score, abs=1e-4)
    # Same class, different initial poses: the two ducks share one network pass but differ.
    assert not np.allclose(together[0].pose, together[2].pose)


def test_random_weights_give_finite_results(registry, renderer, weight_files, scene) -> None:
    engine = refiner(registry, renderer, weight_files)
    results = engine.refine(scene.observation, [Instance("sphere", scene.instances[1].pose_init)])
    result = results[0]
    assert result.status is RefineStatus.OK
    assert np.isfinite(result.pose).all()
    assert 0.0 <= result.score <= 1.0
    assert len(result.trace) == SHORT.outer_iterations * SHORT.inner_steps
    rotation = result.pose[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-4)


def test_object_features_are_cached_per_object(registry, weight_files) -> None:
    backend = LearnedBackend(torch.device("cpu"), replace(SMALL, weights=dict(weight_files)))
    backend.prepare_objects([registry["duck"], registry["duck"]])
    first = backend._objects[registry["duck"]]
    backend.prepare_objects([registry["duck"]])
    assert backend._objects[registry["duck"]] is first
    n = len(registry["duck"].vertices)
    assert first.attributes.shape == (n, 288)
    norms = torch.linalg.vector_norm(first.attributes[:, 256:], dim=1)
    torch.testing.assert_close(norms, torch.ones(n), atol=1e-5, rtol=0)


def test_big_mesh_decouples_feature_cloud(registry, weight_files) -> None:
    """A mesh above the cloud limit: features come from a subsample and are blended to every vertex."""
    config = replace(SMALL, weights=dict(weight_files), max_cloud_points=300)
    backend = LearnedBackend(torch.device("cpu"), config)
    duck = registry["duck"]
    features = backend.object_features(duck)
    assert features.attributes.shape == (len(duck.vertices), 288)
    assert torch.isfinite(features.attributes).all()
    norms = torch.linalg.vector_norm(features.attributes[:, 256:], dim=1)
    torch.testing.assert_close(norms, torch.ones(len(duck.vertices)), atol=1e-5, rtol=0)


def test_missing_weights_are_a_clear_error(registry) -> None:
    backend = LearnedBackend(torch.device("cpu"), SMALL)
    with pytest.raises(BackendError, match="has no weights"):
        backend.prepare_objects([registry["duck"]])


def test_truncated_weights_are_a_clear_error(registry, tmp_path: Path, weight_files) -> None:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(weight_files["duck"].read_bytes()[:1000])
    backend = LearnedBackend(torch.device("cpu"), replace(SMALL, weights={"duck": cut}))
    with pytest.raises(BackendError, match="truncated"):
        backend.prepare_objects([registry["duck"]])
