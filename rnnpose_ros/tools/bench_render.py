"""Renderer benchmark: time per render of the OpenGL and the Warp renderer at several batch sizes, and
how closely Warp agrees with OpenGL.

Usage::

    python -m rnnpose_ros.tools.bench_render [--device cpu|cuda] [--batch 1 4 8] [--size 128]
                                             [--threads 1] [--repeats 7] [--json OUT]

One render is what a render iteration of the learned backend asks for: ``render_tensors`` of B duck
instances (random poses, seed 0) into a square crop, results as torch tensors on ``--device`` (for
OpenGL on CUDA: read back, rasterised on the host, uploaded). Thread pools are pinned before anything
starts them: torch and OpenMP to ``--threads``, llvmpipe (Mesa's software rasteriser) to
``--threads`` as well (``LP_NUM_THREADS``); Warp's CPU kernels are single-threaded. Figures are
medians over ``--repeats`` renders after a warm-up render (which compiles the Warp kernel and uploads
the mesh), wall time and process CPU time (all threads; the one to trust on a shared machine). This
is a benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--size", type=int, default=128, help="crop side in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch, OpenMP and llvmpipe threads")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--object", default="duck", help="pybullet mesh name")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if min(args.batch) < 1 or args.size < 8 or args.threads < 1 or args.repeats < 1:
        parser.error("batch sizes and repeats must be >= 1, size >= 8, threads >= 1")
    # Before torch or Mesa start their pools.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LP_NUM_THREADS"):
        os.environ[variable] = str(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    figures = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\nwrote {args.json}")


def run(args: argparse.Namespace) -> dict:
    """Time every renderer at every batch size; returns the figures written by ``--json``."""
    import numpy as np
    import torch

    from rnnpose_ros.core.objects import load_pybullet_object
    from rnnpose_ros.core.render import RenderError
    from rnnpose_ros.core.renderers import make_renderer
    from rnnpose_ros.core.synth import sample_object_pose
    from rnnpose_ros.tools.bench import machine_name

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_pybullet_object(args.object)
    size = (args.size, args.size)
    focal = 0.55 * args.size / model.bounding_radius  # the object fills about the crop at 0.5 m
    centre = (args.size - 1) / 2
    K = np.array([[focal, 0.0, centre], [0.0, focal, centre], [0.0, 0.0, 1.0]])
    rng = np.random.default_rng(0)
    largest = max(args.batch)
    poses = np.stack([sample_object_pose(model, rng, K, size, distance=(0.4, 0.6)) for _ in range(largest)])
    poses_t = torch.from_numpy(poses).to(device)
    K_t = torch.from_numpy(K).to(device).expand(largest, 3, 3)

    print(f"machine: {machine_name(device)}")
    print(f"render: {args.object}, {args.size}x{args.size} crop, threads {args.threads}, ", end="")
    print(f"median of {args.repeats}\n")
    figures: dict = {
        "device": machine_name(device),
        "threads": args.threads,
        "size": args.size,
        "seconds_per_render": {},
        "cpu_seconds_per_render": {},
    }
    renderers = {}
    for kind in ("opengl", "warp"):
        try:
            renderers[kind] = make_renderer(device, kind)
        except RenderError as exc:
            print(f"{kind:<7} unavailable: {exc}")
    for batch in args.batch:
        # Renders of the two kinds alternate, so that a change in machine load hits both alike.
        times = _time_renders(renderers, model, poses_t[:batch], K_t[:batch], size, args.repeats, device)
        for kind, (seconds, cpu_seconds) in times.items():
            figures["seconds_per_render"].setdefault(kind, {})[str(batch)] = seconds
            figures["cpu_seconds_per_render"].setdefault(kind, {})[str(batch)] = cpu_seconds
            per_view = 1e3 * seconds / batch
            print(
                f"{kind:<7} B={batch:<3} {1e3 * seconds:8.2f} ms per render ({per_view:7.2f} per view),"
                f" process CPU time {1e3 * cpu_seconds:8.2f} ms",
                flush=True,
            )
    outputs = {
        kind: renderer.render_tensors([model], poses_t, K_t, size) for kind, renderer in renderers.items()
    }
    for renderer in renderers.values():
        renderer.close()
    if len(outputs) == 2:
        figures["agreement"] = _agreement(outputs["opengl"], outputs["warp"])
        print("\nwarp vs opengl: " + ", ".join(f"{k} {v:.3g}" for k, v in figures["agreement"].items()))
    return figures


def _time_renders(
    renderers: dict, model, poses, K, size: tuple[int, int], repeats: int, device
) -> dict[str, tuple[float, float]]:
    """Median wall and process CPU seconds (all threads) of one ``render_tensors`` call per renderer,
    after a warm-up call of each. CPU time is the figure to trust on a machine shared with other work."""
    import torch

    for renderer in renderers.values():
        renderer.render_tensors([model], poses, K, size)
    times: dict[str, list[tuple[float, float]]] = {kind: [] for kind in renderers}
    for _ in range(repeats):
        for kind, renderer in renderers.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            renderer.render_tensors([model], poses, K, size)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[kind].append((time.perf_counter() - start, time.process_time() - cpu_start))
    return {
        kind: (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
        for kind, values in times.items()
    }


def _agreement(reference, other) -> dict[str, float]:
    """Foreground agreement and the largest errors where both renderers picked the same face."""
    ref_mask, mask = reference.mask.cpu(), other.mask.cpu()
    union = ref_mask | mask
    same = ref_mask & mask & (reference.face_index.cpu() == other.face_index.cpu())

    def worst(name: str) -> float:
        error = (getattr(reference, name).cpu() - getattr(other, name).cpu()).abs()
        return float(error[same].max())

    return {
        "foreground_agreement": float((ref_mask == mask)[union].float().mean()),
        "same_face_fraction": float(same.sum() / (ref_mask & mask).sum()),
        "barycentric_max_error": worst("barycentric"),
        "depth_max_error_m": worst("depth"),
        "rgb_max_error": worst("rgb"),
    }


if __name__ == "__main__":
    main()
