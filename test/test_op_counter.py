"""The op / host-sync counter (tools/op_counter.py), and the launch budget of the learned refinement:
a bounded number of ATen ops per refinement and no host synchronisation inside a render iteration
(outside the host rasteriser, whose readback is its documented synchronisation point)."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from rnnpose_ros.core.backends.learned import LearnedBackend, LearnedConfig
from rnnpose_ros.core.checkpoint import save_checkpoint
from rnnpose_ros.core.model import RNNPoseNet
from rnnpose_ros.core.objects import ObjectRegistry, load_pybullet_object, pybullet_mesh_available
from rnnpose_ros.core.refiner import Instance, Refiner, RefineStatus
from rnnpose_ros.core.synth import make_scene
from rnnpose_ros.tools.op_counter import OpCounter, UncountedRenderer

#: ATen ops of one B = 1 refinement of the learned backend at the published 3 × 4 schedule (all ops,
#: views included; the op count does not depend on the crop size). Measured: see the README's bench.
LEARNED_OPS_BOUND = 6300


def test_counter_counts_ops_views_and_syncs() -> None:
    x = torch.arange(12.0).reshape(3, 4)
    with OpCounter() as counter:
        y = (x * 2).t()
        total = y.sum()
        with counter.paused():
            total.item()
        assert bool(total > 0)
        torch.nonzero(x)
        x.cpu()
    assert counter.ops["mul"] == 1 and counter.ops["sum"] == 1 and counter.view_ops["t"] == 1
    assert counter.kernel_ops == counter.total_ops - sum(counter.view_ops.values())
    assert dict(counter.sync_calls) == {"bool": 1, "nonzero": 1, "cpu": 1}
    assert "host syncs" in counter.summary()


@contextlib.contextmanager
def _cuda_sync_errors(enabled: bool):
    """Any host synchronisation on CUDA raises inside (``torch.cuda.set_sync_debug_mode``)."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _RenderOutsideSyncCheck(UncountedRenderer):
    """The host rasteriser may synchronise: not counted, and CUDA's sync check is off inside."""

    def render(self, *args, **kwargs):
        if torch.cuda.is_available():
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("default")
            try:
                return super().render(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        return super().render(*args, **kwargs)


@pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_learned_refinement_launch_budget(device, renderer, tmp_path) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CPU case counts the same synchronisations through the op counter")
    registry = ObjectRegistry(models={"duck": load_pybullet_object("duck")})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "duck.pt", RNNPoseNet())
    config = LearnedConfig(first_crop_size=160, zoom_crop_size=120, weights={"duck": tmp_path / "duck.pt"})
    loop = replace(LearnedBackend.default_loop(), restart_below_score=None, convergence=None)
    wrapped = _RenderOutsideSyncCheck(renderer)
    refiner = Refiner(
        registry, "rnnpose", device=device, config=loop, backend_config=config, renderer=wrapped
    )
    scene = make_scene([registry["duck"]], 3, renderer)
    instances = [Instance("duck", scene.instances[0].pose_init)]
    assert refiner.refine(scene.observation, instances)[0].status is RefineStatus.OK  # warm-up

    # The backend's render-iteration stages run with CUDA's sync check on (the LM solve is covered by
    # the counter below, which sees every stage).
    backend = refiner.backend
    for name in ("prepare_render", "correspondences"):
        stage = getattr(backend, name)

        def checked(*args, _stage=stage, **kwargs):
            with _cuda_sync_errors(device == "cuda"):
                return _stage(*args, **kwargs)

        setattr(backend, name, checked)

    syncs = {}
    for outer in (1, 2, 3):
        refiner.config = replace(loop, outer_iterations=outer)
        with OpCounter() as counter:
            wrapped.counter = counter
            refiner.refine(scene.observation, instances)
        wrapped.counter = None
        syncs[outer] = counter.syncs
    assert syncs[2] - syncs[1] == 0 and syncs[3] - syncs[2] == 0, syncs
    assert counter.total_ops <= LEARNED_OPS_BOUND, counter.summary(20)
