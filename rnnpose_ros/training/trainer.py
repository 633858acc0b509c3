"""The training loop: optimiser, one-cycle schedule, checkpoints, exact resume, logs, data parallelism.

Published optimisation (docs/method.md §4.3): Adam with β = (β1 cycled, 0.99) and decoupled weight
decay 1e-4 (p ← p·(1 − lr·wd), i.e. AdamW), a one-cycle schedule (cosine warm-up from lr_max/10 to
lr_max over the first 1 % of the steps, cosine annealing to lr_max/10/1e4; β1 cycled 0.95 → 0.85 →
0.95), gradient clipping at global norm 10, batch 1 per process. Mixed precision only on CUDA (fp16
autocast inside the RAFT parts, with a gradient scaler).

A run folder holds::

    config.yaml              the resolved configuration of the run
    log.jsonl                one JSON record per logged step (losses, metrics, learning rate)
    tensorboard/             TensorBoard events: the same scalars, flow and weight-map images
    state/step-XXXXXXXX.pt   training state: weights, optimiser, schedule, RNG, step (resume)
    weights/<class>.pt       our checkpoint format (weights + per-object neighbour limits + mesh
                             fingerprint), what ``evaluate --backend rnnpose`` and the node load
    weights/<class>.tckpt    the same weights in the published ``.tckpt`` layout

Exact resume: every sample and every random draw of a step derives from (seed, global sample index),
so a run resumed from a state file computes bit-identical steps on the same hardware and thread
count (the state also carries the torch RNG state for anything that draws from it).

Data parallelism: under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains on its own samples
(index = step·world + rank), and the gradients are averaged over processes (all-reduce) before
clipping and the optimiser step: the same arithmetic as DistributedDataParallel, without its
requirement that the loss be computed by the wrapped module's ``forward``. ``gloo`` on CPU,
``nccl`` on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from rnnpose_ros.core.backends.learned import MAX_CLOUD_POINTS
from rnnpose_ros.core.checkpoint import ObjectMetadata, load_checkpoint, mesh_fingerprint, save_checkpoint
from rnnpose_ros.core.losses import CircleConfig, LossInputError, LossWeights
from rnnpose_ros.core.model import RNNPoseNet, ours_to_published
from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.training.step import (
    ObjectPyramids,
    StepConfig,
    StepLosses,
    TrainingSampleError,
    training_pass,
)

STATE_FORMAT = "rnnpose_ros.train_state"
STATE_VERSION = 1
#: Samples skipped in a row before the run stops (a source that never yields a usable sample).
MAX_SKIPPED_IN_A_ROW = 50


class TrainingError(RuntimeError):
    """The run cannot start or continue (bad configuration, unusable data, unreadable state)."""


@dataclass
class OptimConfig:
    """Published optimiser and schedule (docs/method.md §4.3)."""

    lr_max: float = 1e-4
    div_factor: float = 10.0
    final_div_factor: float = 1e4
    pct_start: float = 0.01
    momentum_max: float = 0.95
    momentum_min: float = 0.85
    beta2: float = 0.99
    weight_decay: float = 1e-4
    grad_clip: float = 10.0


@dataclass
class DataConfig:
    """Where samples come from.

    Attributes:
        kind: "synthetic" (rendered on the fly over photographs) or "bop" (a BOP dataset on disk).
        bop_root, split: the BOP dataset folder and split (kind "bop").
        image_size: (H, W) of synthetic images, pixels.
        occluders: occluder patches per synthetic image.
        rot_sigma_deg, trans_sigma, max_angle_deg: initial-pose noise (published 15°, 1/1/5 cm, 45°).
        augment: the published photometric augmentation.
    """

    kind: str = "synthetic"
    bop_root: str | None = None
    split: str = "train"
    image_size: tuple[int, int] = (480, 640)
    occluders: int = 2
    rot_sigma_deg: float = 15.0
    trans_sigma: tuple[float, float, float] = (0.01, 0.01, 0.05)
    max_angle_deg: float = 45.0
    augment: bool = True


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        steps: optimiser steps (published 200,000).
        seed: seed of the samples and of every random draw.
        device: torch device ("cpu", "cuda", "cuda:1"; under torchrun each rank uses its local GPU).
        checkpoint_every: steps between training states and exported weights.
        log_every: steps between log records.
        init_weights: published ``.tckpt`` or our checkpoint to fine-tune from (None: from scratch).
        step: schedule, crops and losses of a pass; optim: optimiser and schedule; data: samples.
    """

    steps: int = 200_000
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 10_000
    log_every: int = 10
    init_weights: str | None = None
    step: StepConfig = field(default_factory=StepConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def optimizer_and_schedule(
    net: torch.nn.Module, config: OptimConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW (decoupled decay) + one-cycle learning rate and β1, as published."""
    optimizer = torch.optim.AdamW(
        net.parameters(),
        lr=config.lr_max / config.div_factor,
        betas=(config.momentum_max, config.beta2),
        weight_decay=config.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr_max,
        total_steps=steps + 1,  # the last step must not run past the schedule
        pct_start=config.pct_start,
        anneal_strategy="cos",
        cycle_momentum=True,
        base_momentum=config.momentum_min,
        max_momentum=config.momentum_max,
        div_factor=config.div_factor,
        final_div_factor=config.final_div_factor,
    )
    return optimizer, schedule


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Within the block, torch uses deterministic algorithms (kernels without a deterministic variant only
    warn); on exit the process's previous setting is restored.

    Exact resume needs bitwise-reproducible gradients: with several threads, the accumulating gathers'
    backward otherwise sums in a varying order (a resumed run then differs in the last bits of the
    weights). Scoped to the training steps so that the rest of the process (e.g. a node or a test
    session sharing it) keeps torch's faster default kernels.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def export_published(path: Path, net: RNNPoseNet, step: int) -> None:
    """Write the weights as a published ``.tckpt`` (flat state_dict, published keys, global_step)."""
    state = {ours_to_published(k): v.detach().cpu() for k, v in net.state_dict().items()}
    state["global_step"] = torch.tensor(step, dtype=torch.int64)
    torch.save(state, path)


@dataclass
class DistributedContext:
    """This process's place in a data-parallel run (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> DistributedContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Trainer:
    """Trains one :class:`RNNPoseNet` on the objects of a source.

    Args:
        config: the run; run_dir: its folder (created; an existing state there is not read unless
            :meth:`resume` is called).
        models: the objects (one network for all of them; the published code trains one per object).
        source: ``source.sample(index, seed) -> TrainingSample`` (see ``training/sources.py``).
        renderer: the process's renderer.
        distributed: rank and world size (default: from the environment).
        progress: show a tqdm bar on the main process.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        models: list[ObjectModel],
        source,
        renderer,
        distributed: DistributedContext | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.models = models
        self.source = source
        self.renderer = renderer
        self.dist = distributed or DistributedContext.from_environment()
        self.progress = progress
        self.device = self._device()
        torch.manual_seed(config.seed)
        self.net = RNNPoseNet()
        if config.init_weights:
            load_checkpoint(config.init_weights, self.net)
        self.net.to(self.device).train()
        self.optimizer, self.schedule = optimizer_and_schedule(self.net, config.optim, config.steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self._amp)
        self.pyramids = ObjectPyramids()
        self.step = 0
        self._writer = None
        self._skip_reason = ""
        if self.dist.world > 1:
            self._init_distributed()

    @property
    def _amp(self) -> bool:
        return self.config.step.mixed_precision and self.device.type == "cuda"

    def _device(self) -> torch.device:
        device = torch.device(self.config.device)
        if device.type == "cuda" and self.dist.world > 1:
            device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(device)
        return device

    def _init_distributed(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        for tensor in self.net.state_dict().values():
            dist.broadcast(tensor, src=0)

    # --- state -------------------------------------------------------------------------------------

    def state_path(self, step: int) -> Path:
        return self.run_dir / "state" / f"step-{step:08d}.pt"

    def save_state(self) -> Path:
        """Write the training state of the current step (main process only)."""
        path = self.state_path(self.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "step": self.step,
                "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "config": self.config.to_dict(),
            },
            path,
        )
        return path

    def resume(self, path: Path | None = None) -> int:
        """Load a training state (default: the latest in the run folder); returns its step."""
        if path is None:
            states = sorted((self.run_dir / "state").glob("step-*.pt"))
            if not states:
                raise TrainingError(f"no training state to resume from in {self.run_dir / 'state'}")
            path = states[-1]
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TrainingError(f"{path} is not a training state of this tool")
        if state.get("version") != STATE_VERSION:
            raise TrainingError(
                f"{path} has state version {state.get('version')!r}; expected {STATE_VERSION}"
            )
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        return self.step

    def object_metadata(self) -> dict[str, ObjectMetadata]:
        """Per-object neighbour limits and mesh fingerprints, stored with the weights."""
        metadata = {}
        for model in self.models:
            cloud, pyramid = self.pyramids.get(model, MAX_CLOUD_POINTS)
            metadata[model.class_id] = ObjectMetadata(
                neighbor_limits=tuple(pyramid.neighbor_limits),
                mesh_sha256=mesh_fingerprint(cloud, np.asarray(model.faces, np.int64)),
                num_vertices=len(cloud),
            )
        return metadata

    def export_weights(self) -> list[Path]:
        """Our checkpoint (per object class, same weights) and the published layout."""
        folder = self.run_dir / "weights"
        folder.mkdir(parents=True, exist_ok=True)
        metadata = self.object_metadata()
        written = []
        config = {"trained_steps": self.step, **self.config.to_dict()}
        for class_id in metadata:
            path = folder / f"{class_id}.pt"
            save_checkpoint(path, self.net, {class_id: metadata[class_id]}, config)
            tckpt = folder / f"{class_id}.tckpt"
            export_published(tckpt, self.net, self.step)
            written += [path, tckpt]
        return written

    # --- training ----------------------------------------------------------------------------------

    def sample_rng(self, index: int) -> np.random.RandomState:
        """The legacy generator of the circle loss's draws for sample ``index`` (reproducible)."""
        return np.random.RandomState(
            np.random.SeedSequence([self.config.seed, index, 1]).generate_state(1)[0]
        )

    @deterministic_algorithms()
    def train_step(self) -> StepLosses | None:
        """One optimiser step on this process's sample; None when the sample was skipped."""
        index = self.step * self.dist.world + self.dist.rank
        model_losses = None
        try:
            sample = self.source.sample(index, self.config.seed)
            _, pyramid = self.pyramids.get(sample.model, MAX_CLOUD_POINTS)
            model_losses = training_pass(
                self.net, self.renderer, sample, pyramid, self.sample_rng(index), self.config.step
            )
        except (TrainingSampleError, LossInputError) as exc:
            self._skip_reason = str(exc)
        skipped = model_losses is None
        if self.dist.world > 1:
            skipped = self._any_skipped(skipped)
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            return None
        self.scaler.scale(model_losses.total).backward()
        if self.dist.world > 1:
            self._average_gradients()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        return model_losses

    def _any_skipped(self, skipped: bool) -> bool:
        """All processes skip a step together when one of them has no usable sample."""
        import torch.distributed as dist

        flag = torch.tensor([1.0 if skipped else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _average_gradients(self) -> None:
        import torch.distributed as dist

        for parameter in self.net.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
            parameter.grad /= self.dist.world

    def _check_in_sync(self) -> None:
        """Raise if the processes' weights differ (they must after every averaged step)."""
        import torch.distributed as dist

        fingerprint = torch.stack([p.detach().double().sum() for p in self.net.parameters()]).sum()
        high, low = fingerprint.clone().to(self.device), fingerprint.clone().to(self.device)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if not torch.equal(high, low):
            raise TrainingError(f"data-parallel processes out of sync at step {self.step}: {low} != {high}")

    def run(self, on_step: Callable[[int, StepLosses], None] | None = None) -> None:
        """Train until ``config.steps``, logging, checkpointing and exporting on the main process."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.config.steps, initial=self.step, unit="step", dynamic_ncols=True)
        skipped_in_a_row = 0
        started = time.perf_counter()
        while self.step < self.config.steps:
            losses = self.train_step()
            if losses is None:
                skipped_in_a_row += 1
                if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise TrainingError(
                        f"{skipped_in_a_row} samples in a row were unusable (last: {self._skip_reason})"
                    )
                # The step counter still advances so that the next step draws a new sample.
                self.step += 1
                continue
            skipped_in_a_row = 0
            self.step += 1
            if on_step is not None:
                on_step(self.step, losses)
            if self.dist.is_main:
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{float(losses.total):.3f}", epe=f"{losses.per_iteration[-1]['epe']:.2f}"
                    )
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    self.log(losses, time.perf_counter() - started)
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                if self.dist.world > 1:
                    self._check_in_sync()
                if self.dist.is_main:
                    self.save_state()
                    self.export_weights()
        if bar is not None:
            bar.close()
        if self._writer is not None:
            self._writer.close()

    def log(self, losses: StepLosses, elapsed: float) -> None:
        """Append one JSON record and mirror it to TensorBoard (with the diagnostic images)."""
        record = {
            "step": self.step,
            "lr": self.schedule.get_last_lr()[0],
            "seconds": elapsed,
            **losses.scalars(),
        }
        record = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
        }
        with (self.run_dir / "log.jsonl").open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        for key, value in record.items():
            if key != "step" and value is not None:
                writer.add_scalar(key, value, self.step)
        for name, image in losses.images.items():
            scaled = image / max(float(image.max()), 1e-6)
            writer.add_image(f"image/{name}", scaled[None], self.step)
        writer.flush()

    def _tensorboard(self):
        if self._writer is None:
            # Imported on first use: tensorboard takes about a second to import, and only training logs.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer


def load_config(path: Path | None, overrides: dict | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (missing keys keep their defaults) and overrides.

    Raises:
        TrainingError: unknown keys or values of the wrong type.
    """
    data = yaml.safe_load(Path(path).read_text()) if path is not None else {}
    data = data or {}
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: the configuration must be a mapping")
    for key, value in (overrides or {}).items():
        if value is not None:
            section, _, name = key.rpartition(".")
            target = data.setdefault(section, {}) if section else data
            target[name] = value
    try:
        step = dict(data.pop("step", None) or {})
        optim = dict(data.pop("optim", None) or {})
        data_config = dict(data.pop("data", None) or {})
        for name in ("image_size", "trans_sigma"):
            if name in data_config:
                data_config[name] = tuple(data_config[name])
        if "weights" in step:
            step["weights"] = LossWeights(**step["weights"])
        if "circle" in step:
            step["circle"] = CircleConfig(**step["circle"])
        config = TrainConfig(
            **data, step=StepConfig(**step), optim=OptimConfig(**optim), data=DataConfig(**data_config)
        )
    except TypeError as exc:
        raise TrainingError(f"bad training configuration {path or ''}: {exc}") from exc
    if config.data.kind not in ("synthetic", "bop"):
        raise TrainingError(f"data.kind must be 'synthetic' or 'bop', got {config.data.kind!r}")
    if config.data.kind == "bop" and not config.data.bop_root:
        raise TrainingError("data.kind 'bop' needs data.bop_root")
    if config.steps < 1:
        raise TrainingError("steps must be at least 1")
    for size in (config.step.first_crop_size, config.step.zoom_crop_size):
        if size < 64 or size % 8:
            raise TrainingError(f"crop sizes must be multiples of 8 and at least 64, got {size}")
    return config
