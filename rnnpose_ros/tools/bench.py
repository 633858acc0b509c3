"""Refinement latency benchmark (``make bench``): per-instance time of each backend at several batch
sizes on synthetic duck scenes, plus the per-module network timings of :mod:`bench_nets`.

Usage::

    python -m rnnpose_ros.tools.bench [--device cpu|cuda] [--batch 1 4] [--repeats 2]
                                      [--backends classical rnnpose] [--skip-nets]

The learned backend runs with random weights (the published checkpoints are not redistributed):
timings do not depend on the weight values. Figures are printed with the machine they were
measured on, and as ratios within this one run (batch speed-up, learned vs classical), which is
what may be compared across machines. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from rnnpose_ros.core.backends import BACKENDS, backend_help
from rnnpose_ros.core.checkpoint import save_checkpoint
from rnnpose_ros.core.model import RNNPoseNet
from rnnpose_ros.core.objects import ObjectRegistry
from rnnpose_ros.core.refiner import Instance, Refiner
from rnnpose_ros.core.render import Renderer
from rnnpose_ros.core.synth import make_scene
from rnnpose_ros.package_files import default_objects_file
from rnnpose_ros.tools import bench_nets

DEFAULT_OBJECTS = default_objects_file()


def machine_name(device: torch.device) -> str:
    """CPU model and core count, or the CUDA device name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def time_refine(refiner: Refiner, scene, batch: int, repeats: int, device: torch.device) -> list[float]:
    """Wall time (s) of refining ``batch`` instances of ``scene`` in one call, after a warm-up call.

    Raises:
        RuntimeError: if an instance was not refined (a short-cut would make the timing meaningless).
    """
    base = scene.instances
    instances = [Instance(base[i % len(base)].class_id, base[i % len(base)].pose_init) for i in range(batch)]
    failed = [r for r in refiner.refine(scene.observation, instances) if r.status.value != "ok"]
    if failed:
        raise RuntimeError(
            f"benchmark scene instance not refined: {failed[0].status.value}: {failed[0].message}"
        )
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        refiner.refine(scene.observation, instances)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def bench_refiners(
    objects: Path, device: torch.device, batches: Sequence[int], repeats: int, backends: Sequence[str]
) -> dict[tuple[str, int], float]:
    """Median seconds per instance for every (backend, batch)."""
    registry = ObjectRegistry.from_yaml(objects)
    renderer = Renderer()
    models = list(registry)
    scene = make_scene([models[i % len(models)] for i in range(max(batches))], 0, renderer)
    per_instance: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "random.pt"
        torch.manual_seed(0)
        save_checkpoint(weights, RNNPoseNet())
        for backend in backends:
            info = BACKENDS[backend]
            backend_config = None
            if info.needs_weights:
                backend_config = info.config_class()(
                    weights={class_id: weights for class_id in registry.class_ids}
                )
            loop = info.default_loop()
            # The schedule alone, and where the backend restarts weak results, its worst case: every
            # instance refined again from the rotation hypotheses (the evaluate tool reports the mean).
            variants = {backend: replace(loop, restart_below_score=None)}
            if loop.restart_below_score is not None:
                variants[f"{backend}+restarts"] = replace(loop, restart_below_score=2.0)
            for label, variant in variants.items():
                refiner = Refiner(
                    registry,
                    backend=backend,
                    device=device,
                    config=variant,
                    backend_config=backend_config,
                    renderer=renderer,
                )
                for batch in batches:
                    seconds = statistics.median(time_refine(refiner, scene, batch, repeats, device)) / batch
                    per_instance[(label, batch)] = seconds
                    print(f"{label:<19} B={batch:<3} {1e3 * seconds:10.1f} ms per instance", flush=True)
    return per_instance


def print_ratios(per_instance: dict[tuple[str, int], float], batches: Sequence[int]) -> None:
    print("\nratios (same run):")
    backends = sorted({b for b, _ in per_instance})
    smallest, largest = min(batches), max(batches)
    for backend in backends:
        if largest != smallest:
            gain = per_instance[(backend, smallest)] / per_instance[(backend, largest)]
            print(f"  {backend}: per-instance time B={smallest} / B={largest} = {gain:.2f}x")
    if {"classical", "rnnpose"} <= set(backends):
        for batch in batches:
            ratio = per_instance[("rnnpose", batch)] / per_instance[("classical", batch)]
            print(f"  B={batch}: rnnpose / classical per-instance time = {ratio:.2f}x")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=Path, default=DEFAULT_OBJECTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS), help=backend_help()
    )
    parser.add_argument("--skip-nets", action="store_true", help="skip the per-module network timings")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"machine: {machine_name(device)}\n")
    per_instance = bench_refiners(args.objects, device, args.batch, args.repeats, args.backends)
    print_ratios(per_instance, args.batch)
    if not args.skip_nets:
        print("\nper-module network timings:")
        bench_nets.main(["--device", args.device, "--repeats", str(args.repeats)])


if __name__ == "__main__":
    main()
