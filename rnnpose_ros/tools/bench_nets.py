"""Per-module timings of the networks at the published resolutions (random weights).

Usage::

    python -m rnnpose_ros.tools.bench_nets [--repeats 3] [--threads 2] [--device cpu|cuda]
                                          [--mixed-precision] [--points 2500 6000]

Modules: 2D descriptor net on 1×3×320² (with and without the score head), RAFT encoder on the
2×3×240² crop pair, correlation pyramid build and lookup at 30², one update-block step plus convex
upsampling, the confidence weight at 240², and — when ``rnnpose_ros.core.nets.kpconv`` exists — the
KPConv point pyramid and both 3D nets on synthetic clouds. Each module runs once to warm up, then
``--repeats`` times; the median and the minimum wall time are printed. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rnnpose_ros.core.nets.confidence import descriptor_confidence
from rnnpose_ros.core.nets.desc2d import Desc2DNet
from rnnpose_ros.core.nets.raft import (
    BasicEncoder,
    BasicUpdateBlock,
    CorrPyramid,
    convex_upsample,
    coords_grid,
    encode_image_pair,
    run_update_block,
)

DESC2D_SIZE = 320
CROP_SIZE = 240
FEATURE_SIZE = CROP_SIZE // 8


def time_call(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall times (s) of ``repeats`` calls after one warm-up call, synchronising CUDA around each."""

    def run_once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    run_once()
    return [run_once() for _ in range(repeats)]


def report(name: str, times: Sequence[float]) -> None:
    print(f"{name:<44} median {1e3 * statistics.median(times):9.1f} ms   min {1e3 * min(times):9.1f} ms")


def synthetic_cloud(num_points: int, seed: int = 0) -> np.ndarray:
    """(N, 3) float32 metres: a bumpy closed surface about 10×7×6 cm (Fibonacci directions)."""
    rng = np.random.default_rng(seed)
    index = np.arange(num_points) + 0.5
    polar = np.arccos(1 - 2 * index / num_points)
    azimuth = np.pi * (1 + 5**0.5) * index
    directions = np.stack(
        [np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], axis=1
    )
    radius = 1 + 0.15 * np.sin(3 * polar) * np.cos(2 * azimuth) + 0.01 * rng.standard_normal(num_points)
    return (directions * radius[:, None] * np.array([0.05, 0.035, 0.03]) + 0.2).astype(np.float32)


def bench_2d(device: torch.device, repeats: int, mixed_precision: bool) -> None:
    desc2d = Desc2DNet().to(device).eval()
    image = torch.rand(1, 3, DESC2D_SIZE, DESC2D_SIZE, device=device)
    report(f"desc2d descriptors 1x3x{DESC2D_SIZE}^2", time_call(lambda: desc2d(image), repeats, device))
    report(
        f"desc2d + score head 1x3x{DESC2D_SIZE}^2",
        time_call(lambda: desc2d(image, with_scores=True), repeats, device),
    )

    encoder = BasicEncoder().to(device).eval()
    rendered = torch.rand(1, 3, CROP_SIZE, CROP_SIZE, device=device)
    observed = torch.rand(1, 3, CROP_SIZE, CROP_SIZE, device=device)
    report(
        f"raft encoder 2x3x{CROP_SIZE}^2",
        time_call(
            lambda: encode_image_pair(encoder, rendered, observed, True, mixed_precision), repeats, device
        ),
    )

    fmap1, fmap2 = encode_image_pair(encoder, rendered, observed, True, mixed_precision)
    report(
        f"corr pyramid build {FEATURE_SIZE}^2", time_call(lambda: CorrPyramid(fmap1, fmap2), repeats, device)
    )
    pyramid = CorrPyramid(fmap1, fmap2)
    coords = coords_grid(1, FEATURE_SIZE, FEATURE_SIZE, device=device) + torch.randn(
        1, 2, FEATURE_SIZE, FEATURE_SIZE, device=device
    )
    report(
        f"corr lookup {FEATURE_SIZE}^2 (324 ch)", time_call(lambda: pyramid.lookup(coords), repeats, device)
    )

    block = BasicUpdateBlock().to(device).eval()
    corr = pyramid.lookup(coords)
    net = torch.tanh(torch.randn(1, 128, FEATURE_SIZE, FEATURE_SIZE, device=device))
    inp = torch.relu(torch.randn(1, 128, FEATURE_SIZE, FEATURE_SIZE, device=device))
    flow = coords - coords_grid(1, FEATURE_SIZE, FEATURE_SIZE, device=device)

    def update_step() -> torch.Tensor:
        out = run_update_block(block, net, inp, corr, flow, mixed_precision)
        return convex_upsample(flow + out.delta_flow, out.up_mask)

    report(f"update step + convex upsample {FEATURE_SIZE}^2", time_call(update_step, repeats, device))

    descriptors = torch.nn.functional.normalize(
        torch.randn(2, 32, CROP_SIZE, CROP_SIZE, device=device), dim=1
    )
    crop_flow = torch.randn(1, 2, CROP_SIZE, CROP_SIZE, device=device)
    depth = torch.ones(1, CROP_SIZE, CROP_SIZE, device=device)
    report(
        f"confidence weight {CROP_SIZE}^2",
        time_call(
            lambda: descriptor_confidence(descriptors[:1], descriptors[1:], crop_flow, depth, 0.75),
            repeats,
            device,
        ),
    )


def bench_kpconv(device: torch.device, repeats: int, point_counts: Sequence[int]) -> None:
    try:
        kpconv = importlib.import_module("rnnpose_ros.core.nets.kpconv")
        pyramid_module = importlib.import_module("rnnpose_ros.core.nets.kpconv_pyramid")
    except ModuleNotFoundError as exc:
        print(f"note: KPConv nets skipped ({exc.name} not available)")
        return
    descriptor_net = kpconv.KPConvFeatureNet(out_dim=32, normalize=True).to(device).eval()
    context_net = kpconv.KPConvFeatureNet(out_dim=256, normalize=False).to(device).eval()
    for count in point_counts:
        cloud = synthetic_cloud(count)
        report(
            f"kpconv pyramid build {count} pts (CPU)",
            time_call(
                lambda cloud=cloud: pyramid_module.build_point_pyramid(cloud), repeats, torch.device("cpu")
            ),
        )
        pyramid = pyramid_module.build_point_pyramid(cloud).to(device)
        sizes = "/".join(str(len(p)) for p in pyramid.points)
        report(
            f"kpconv descriptor net {sizes}",
            time_call(lambda pyramid=pyramid: descriptor_net(pyramid), repeats, device),
        )
        report(
            f"kpconv context net {sizes}",
            time_call(lambda pyramid=pyramid: context_net(pyramid), repeats, device),
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_nets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", action="store_true", help="fp16 autocast (CUDA only)")
    parser.add_argument("--points", type=int, nargs="+", default=[2500, 6000], help="KPConv cloud sizes")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(
        f"device={device} threads={torch.get_num_threads()} mixed_precision={args.mixed_precision} "
        f"torch={torch.__version__} repeats={args.repeats}"
    )
    with torch.inference_mode():
        bench_2d(device, args.repeats, args.mixed_precision)
        bench_kpconv(device, args.repeats, args.points)


if __name__ == "__main__":
    main()
