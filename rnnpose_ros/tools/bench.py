"""Refinement latency benchmark (``make bench``): per-instance time of each backend at several batch
sizes on synthetic duck scenes, the tensor operations and host synchronisations of one refinement,
plus the per-module network timings of :mod:`bench_nets`.

Usage::

    python -m rnnpose_ros.tools.bench [--device cpu|cuda] [--batch 1 4 8] [--repeats 2]
                                      [--backends classical rnnpose] [--skip-nets] [--json OUT]

Figures, per backend:

- seconds per instance at each batch size: the backend's schedule without restarts, early stop as
  configured by the backend, and where the backend restarts weak results, its worst case (every
  instance refined again from the rotation hypotheses);
- ATen ops per refinement (B = 1, the whole schedule, no restarts): a device-independent proxy for
  launch overhead, counted with :class:`~rnnpose_ros.tools.op_counter.OpCounter` (all ops, and those
  that are not views);
- host synchronisations per render iteration: the difference between refinements of 2 and 1 render
  iterations, in total and outside the host rasteriser;
- on CUDA, the ratio of the measured time to the FLOP floor (FLOPs of one refinement counted by
  ``torch.utils.flop_counter`` over the device's measured dense fp16 matmul throughput).

The learned backend runs with random weights (the published checkpoints are not redistributed):
timings do not depend on the weight values, and random weights never converge early, so its times
are those of the full schedule. Figures are printed with the machine, threads and load they were
measured under, and as ratios within this one run (batch speed-up, learned vs classical), which is
what may be compared across machines. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from rnnpose_ros.core.backends import BACKENDS, backend_help
from rnnpose_ros.core.checkpoint import save_checkpoint
from rnnpose_ros.core.model import RNNPoseNet
from rnnpose_ros.core.objects import ObjectRegistry
from rnnpose_ros.core.refiner import Instance, Refiner
from rnnpose_ros.core.render import Renderer
from rnnpose_ros.core.synth import make_scene
from rnnpose_ros.core.threads import configure_threads, prefer_passive_waiting
from rnnpose_ros.package_files import default_objects_file
from rnnpose_ros.tools import bench_nets
from rnnpose_ros.tools.op_counter import OpCounter, UncountedRenderer

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
    instances = scene_instances(scene, batch)
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


def scene_instances(scene, batch: int) -> list[Instance]:
    """``batch`` instances cycling over the scene's objects, at their noisy initial poses."""
    base = scene.instances
    return [Instance(base[i % len(base)].class_id, base[i % len(base)].pose_init) for i in range(batch)]


def count_refinement(refiner: Refiner, scene, renderer: UncountedRenderer) -> dict[str, float]:
    """Ops of one B = 1 refinement and host syncs per render iteration (2 minus 1 render iterations)."""
    instances = scene_instances(scene, 1)
    schedule = refiner.config
    counts = {}
    try:
        refiner.refine(scene.observation, instances)  # caches and lazy initialisation out of the count
        with OpCounter() as counter:
            refiner.refine(scene.observation, instances)
        counts["ops"], counts["kernel_ops"] = counter.total_ops, counter.kernel_ops
        syncs = {}
        for outer in (1, 2):
            refiner.config = replace(schedule, outer_iterations=outer, convergence=None)
            with OpCounter() as total:
                refiner.refine(scene.observation, instances)
            with OpCounter() as outside:
                renderer.counter = outside
                refiner.refine(scene.observation, instances)
            renderer.counter = None
            syncs[outer] = (total.syncs, outside.syncs)
        counts["syncs_per_render_iteration"] = syncs[2][0] - syncs[1][0]
        counts["syncs_per_render_iteration_outside_renderer"] = syncs[2][1] - syncs[1][1]
    finally:
        refiner.config = schedule
        renderer.counter = None
    return counts


def matmul_flops_per_second(
    device: torch.device, dtype: torch.dtype = torch.float16, size: int = 8192
) -> float:
    """Measured dense matmul throughput of ``device`` (FLOP/s), best of 5."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def refinement_flops(refiner: Refiner, scene, batch: int) -> int:
    """FLOPs of one refinement of ``batch`` instances (matmuls and convolutions, as counted by torch)."""
    with FlopCounterMode(display=False) as flops:
        refiner.refine(scene.observation, scene_instances(scene, batch))
    return flops.get_total_flops()


def bench_refiners(
    objects: Path, device: torch.device, batches: Sequence[int], repeats: int, backends: Sequence[str]
) -> dict:
    """All figures of the module docstring, as the ``--json`` dict (batch sizes as string keys)."""
    registry = ObjectRegistry.from_yaml(objects)
    renderer = UncountedRenderer(Renderer())
    models = list(registry)
    scene = make_scene([models[i % len(models)] for i in range(max(batches))], 0, renderer.renderer)
    results: dict = {"seconds_per_instance": {}, "ops_per_refinement": {}, "kernel_ops_per_refinement": {}}
    results["host_syncs_per_render_iteration"] = {}
    peak = matmul_flops_per_second(device) if device.type == "cuda" else None
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
                if label == backend:
                    counts = count_refinement(refiner, scene, renderer)
                    results["ops_per_refinement"][backend] = counts["ops"]
                    results["kernel_ops_per_refinement"][backend] = counts["kernel_ops"]
                    results["host_syncs_per_render_iteration"][backend] = {
                        "total": counts["syncs_per_render_iteration"],
                        "outside_renderer": counts["syncs_per_render_iteration_outside_renderer"],
                    }
                    print(
                        f"{label:<19} {counts['ops']} ATen ops per refinement "
                        f"({counts['kernel_ops']} not views), "
                        f"{counts['syncs_per_render_iteration']} host syncs per render iteration "
                        f"({counts['syncs_per_render_iteration_outside_renderer']} outside the renderer)",
                        flush=True,
                    )
                per_batch = results["seconds_per_instance"].setdefault(label, {})
                for batch in batches:
                    seconds = statistics.median(time_refine(refiner, scene, batch, repeats, device)) / batch
                    per_batch[str(batch)] = seconds
                    line = f"{label:<19} B={batch:<3} {1e3 * seconds:10.1f} ms per instance"
                    if peak is not None and label == backend:
                        floor = refinement_flops(refiner, scene, batch) / peak / batch
                        results.setdefault("flop_floor_ratio", {}).setdefault(backend, {})[str(batch)] = (
                            seconds / floor
                        )
                        line += f"   FLOP floor {1e3 * floor:.2f} ms, ratio {seconds / floor:.1f}"
                    print(line, flush=True)
    return results


def print_ratios(per_instance: dict[str, dict[str, float]], batches: Sequence[int]) -> None:
    print("\nratios (same run):")
    smallest, largest = str(min(batches)), str(max(batches))
    for backend, times in sorted(per_instance.items()):
        if largest != smallest:
            gain = times[smallest] / times[largest]
            print(f"  {backend}: per-instance time B={smallest} / B={largest} = {gain:.2f}x")
    if {"classical", "rnnpose"} <= set(per_instance):
        for batch in map(str, batches):
            ratio = per_instance["rnnpose"][batch] / per_instance["classical"][batch]
            print(f"  B={batch}: rnnpose / classical per-instance time = {ratio:.2f}x")


def run_conditions(device: torch.device) -> dict:
    """What the figures depend on besides the code: machine, threads, load."""
    return {
        "device": machine_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_average_1min_at_start": os.getloadavg()[0],
        "torch": torch.__version__,
    }


def main(argv: Sequence[str] | None = None) -> None:
    prefer_passive_waiting()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=Path, default=DEFAULT_OBJECTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = available cores)")
    parser.add_argument(
        "--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS), help=backend_help()
    )
    parser.add_argument("--skip-nets", action="store_true", help="skip the per-module network timings")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    configure_threads(args.threads)
    conditions = run_conditions(device)
    print(
        f"machine: {conditions['device']}; OMP_WAIT_POLICY={conditions['omp_wait_policy']}; "
        f"load average at start {conditions['load_average_1min_at_start']:.2f}\n"
    )
    results = bench_refiners(args.objects, device, args.batch, args.repeats, args.backends)
    conditions["load_average_1min_at_end"] = os.getloadavg()[0]
    print_ratios(results["seconds_per_instance"], args.batch)
    if args.json is not None:
        args.json.write_text(json.dumps(conditions | results, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    if not args.skip_nets:
        print("\nper-module network timings:")
        bench_nets.main(
            [
                "--device",
                args.device,
                "--repeats",
                str(args.repeats),
                "--threads",
                str(torch.get_num_threads()),
            ]
        )


if __name__ == "__main__":
    main()
