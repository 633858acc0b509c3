"""Training: the whole differentiable path overfits one sample, exact resume, the schedule, the run
folder (config, log, states, weights in both formats), and trained weights in ``evaluate``.

Small crops (64 px) and a short schedule (1 render iteration) keep the suite fast; the published
sizes only change the cost.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnnpose_ros.core.checkpoint import load_checkpoint
from rnnpose_ros.core.model import RNNPoseNet
from rnnpose_ros.core.objects import load_pybullet_object, pybullet_mesh_available
from rnnpose_ros.core.synth import SceneSpec
from rnnpose_ros.tools import evaluate, train
from rnnpose_ros.training.sources import Augmentation, SyntheticSource, augment
from rnnpose_ros.training.step import StepConfig, TrainingSampleError, training_pass
from rnnpose_ros.training.trainer import (
    OptimConfig,
    TrainConfig,
    Trainer,
    TrainingError,
    load_config,
    optimizer_and_schedule,
)

pytestmark = pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")

TINY = {
    "steps": 3,
    "checkpoint_every": 2,
    "log_every": 1,
    "step": {"first_crop_size": 64, "zoom_crop_size": 64, "outer_iterations": 1, "inner_steps": 1},
    "data": {"image_size": [240, 320], "occluders": 1},
}


OVERFIT_STEPS = 60


def _log(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """Three steps of the train CLI on synthetic duck scenes (states at steps 2 and 3)."""
    folder = tmp_path_factory.mktemp("train")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = folder / "run"
    assert (
        train.main(["--run-dir", str(run), "--config", str(config), "--classes", "duck", "--no-progress"])
        == 0
    )
    return run


def test_run_folder_holds_config_log_states_and_weights(tiny_run: Path) -> None:
    stored = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert stored["step"]["first_crop_size"] == 64 and stored["optim"]["lr_max"] == 1e-4
    log = _log(tiny_run)
    assert sorted(log) == [1, 2, 3]
    assert all(np.isfinite(r["loss/total"]) and r["loss/circle"] > 0 for r in log.values())
    assert sorted(p.name for p in (tiny_run / "state").iterdir()) == ["step-00000002.pt", "step-00000003.pt"]
    events = EventAccumulator(str(tiny_run / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("loss/total")] == pytest.approx(
        [log[s]["loss/total"] for s in (1, 2, 3)]
    )
    assert {"image/flow_magnitude", "image/weight"} <= set(events.Tags()["images"])
    ours, published = RNNPoseNet(), RNNPoseNet()
    info = load_checkpoint(tiny_run / "weights" / "duck.pt", ours)
    assert info.format == "rnnpose_ros.checkpoint" and info.config["trained_steps"] == 3
    duck = load_pybullet_object("duck")
    assert info.objects["duck"].num_vertices == len(duck.vertices)
    assert load_checkpoint(tiny_run / "weights" / "duck.tckpt", published).format == "published"
    for (key, a), b in zip(ours.state_dict().items(), published.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    # Fine-tuning starts from the published layout as well.
    config = TrainConfig(steps=1, init_weights=str(tiny_run / "weights" / "duck.tckpt"))
    tuned = Trainer(config, tiny_run.parent / "tune", [duck], None, None, progress=False).net
    for (key, a), b in zip(tuned.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_resume_reproduces_the_next_step_exactly(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    (run / "state").mkdir(parents=True)
    shutil.copy(tiny_run / "state" / "step-00000002.pt", run / "state")
    argv = ["--run-dir", str(run), "--config", str(tiny_run / "config.yaml"), "--classes", "duck"]
    assert train.main([*argv, "--resume", "--no-progress"]) == 0
    assert _log(run)[3]["loss/total"] == _log(tiny_run)[3]["loss/total"]
    resumed, straight = RNNPoseNet(), RNNPoseNet()
    load_checkpoint(run / "weights" / "duck.pt", resumed)
    load_checkpoint(tiny_run / "weights" / "duck.pt", straight)
    for (key, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_trained_weights_refine_in_evaluate(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    argv = [
        "--backend",
        "rnnpose",
        "--weights",
        f"duck={tiny_run / 'weights' / 'duck.pt'}",
        "--crop-sizes",
        "64,64",
    ]
    argv += ["--num-scenes", "1", "--outer-iterations", "1", "--no-progress", "--json", str(out)]
    assert evaluate.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "rnnpose" and result["num_instances"] == 1


def test_overfitting_one_sample_drives_flow_error_and_alignment_down(renderer, tmp_path: Path) -> None:
    """The whole differentiable path (2D/3D nets, render, RAFT, confidence, LM, losses) learns one
    fixed sample: flow end-point error and alignment loss of the last iteration fall by ≥ 90 %.

    A textured sphere (995 vertices: cheap KPConv) at the published initial-pose noise; the first crop
    is 64 px (cheap 2D net), the zoom crop 128 px (sub-pixel flow is centimetres of depth at 64 px)
    and one render iteration of 4 recurrent steps. Few vertices fall within the correspondence radius
    of a pixel at this size, so the sample is kept whatever its match count.
    """
    torch.manual_seed(0)
    sphere = load_pybullet_object("textured_sphere")
    spec = SceneSpec(size=(240, 320), distance=(0.4, 0.6))
    sample = SyntheticSource([sphere], renderer, spec, Augmentation(enabled=False)).sample(0, 0)

    class Fixed:
        def sample(self, index: int, seed: int):
            return sample

    step = StepConfig(
        first_crop_size=64, zoom_crop_size=128, outer_iterations=1, inner_steps=4, min_correspondences=1
    )
    config = TrainConfig(steps=OVERFIT_STEPS, log_every=10**9, checkpoint_every=10**9, step=step)
    config.optim = OptimConfig(lr_max=3e-3, pct_start=0.1)
    trainer = Trainer(config, tmp_path, [sphere], Fixed(), renderer, progress=False)
    first = []
    trainer.run(on_step=lambda n, losses: first.append(losses.per_iteration[-1]) if n == 1 else None)
    with torch.no_grad():
        _, pyramid = trainer.pyramids.get(sphere, 20000)
        final = training_pass(
            trainer.net, renderer, sample, pyramid, trainer.sample_rng(0), step
        ).per_iteration[-1]
    assert final["epe"] <= 0.1 * first[0]["epe"], (first, final)
    assert final["align"] <= 0.1 * first[0]["align"], (first, final)


def _determinism() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def test_deterministic_algorithms_only_during_the_training_steps(tmp_path: Path) -> None:
    """The steps run with deterministic algorithms (exact resume); afterwards the process has its own
    setting back, whichever it was."""
    during = []

    class Unusable:
        def sample(self, index: int, seed: int):
            during.append(_determinism())
            raise TrainingSampleError("no usable sample")

    before = _determinism()
    trainer = Trainer(TrainConfig(steps=2), tmp_path, [], Unusable(), None, progress=False)
    try:
        for setting in (False, True):
            torch.use_deterministic_algorithms(setting)
            trainer.step = 0
            trainer.run()
            assert _determinism() == (setting, False)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert during == [(True, True)] * 4


def test_one_cycle_schedule_as_published() -> None:
    net = torch.nn.Linear(2, 2)
    optimizer, schedule = optimizer_and_schedule(net, OptimConfig(), 1000)
    lrs, betas = [], []
    for _ in range(1000):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-5) and max(lrs) == pytest.approx(1e-4, rel=1e-3)
    assert int(np.argmax(lrs)) == 10 and lrs[-1] < 1e-7
    assert betas[0] == pytest.approx(0.95) and betas[10] == pytest.approx(0.85) and betas[-1] > 0.949
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4


def test_config_errors_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(TrainingError, match="stepz"):
        load_config(path)
    with pytest.raises(TrainingError, match="multiples of 8"):
        load_config(None, {"step.zoom_crop_size": 60})
    with pytest.raises(TrainingError, match="bop_root"):
        load_config(None, {"data.kind": "bop"})


def test_augmentation_is_deterministic_and_photometric_only() -> None:
    image = (np.random.default_rng(0).random((32, 40, 3)) * 255).astype(np.uint8)
    a = augment(image, np.random.default_rng([1, 2]))
    b = augment(image, np.random.default_rng([1, 2]))
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, image)
    assert np.array_equal(augment(image, np.random.default_rng(0), Augmentation(enabled=False)), image)


def test_data_parallel_run_with_two_gloo_processes(tmp_path: Path) -> None:
    """torchrun, 2 CPU processes (gloo): each trains on its own sample, the averaged gradients keep
    the weights identical (checked by the trainer at every checkpoint), rank 0 writes the run."""
    import os
    import socket
    import subprocess
    import sys

    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({**TINY, "steps": 1, "checkpoint_every": 1}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
    ]
    command += [
        "--master_port",
        str(port),
        "-m",
        "rnnpose_ros.tools.train",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    command += ["--config", str(config), "--classes", "duck", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(_log(tmp_path / "run")) == [1]
    assert (tmp_path / "run" / "weights" / "duck.pt").is_file()


def test_loss_curves_are_drawn_from_the_log(tiny_run: Path, tmp_path: Path) -> None:
    from rnnpose_ros.tools import plot_training

    out = tmp_path / "curves.png"
    assert plot_training.main([str(tiny_run / "log.jsonl"), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert plot_training.main([str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
