"""Parity of the learned path on an accelerator against the golden fixtures, with looser tolerances.

Usage::

    python -m rnnpose_ros.tools.cuda_parity GOLDEN_DIR [--device cuda] [--json OUT]

``check_parity`` holds the CPU to the published float32 results bit for bit or nearly; a GPU computes
the same networks with other kernels (cuDNN, TF32, reduced precision), so its results differ by
more than rounding. This tool runs on ``--device``, in each numeric variant below, the recurrent render
iteration of ``refine_core.pt`` (RAFT encoder, correlation, 4 GRU steps, confidence, LM solves) and
the 2D descriptor net of ``desc2d.pt``, and compares them with the fixtures under :data:`DEVICE_TOL`:

- ``fp32``: float32 everywhere (TF32 matmuls off);
- ``fp16``: the product's mixed precision (``LearnedConfig.mixed_precision``: fp16 autocast of the
  RAFT encoder and update block; correlation coordinates, confidence and the LM solve in float32/64);
- ``bf16-cl``: bf16 autocast and channels-last memory format for the 2D descriptor net alone (a
  candidate, not used by the product; this check tells whether it may be on the target GPU).

One line per compared tensor and variant, then a summary; exit status 1 if the ``fp32`` or ``fp16``
variant fails (the product's), 0 otherwise. With ``--device cpu`` it is a dry run of the same code
(autocast variants then run in float32), useful to check the tool itself without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from rnnpose_ros.core.loop import run_render_iteration
from rnnpose_ros.core.nets.desc2d import Desc2DNet
from rnnpose_ros.core.recurrent import (
    RenderedReference,
    predict_correspondences,
    solver_depth,
    start_render_iteration,
)
from rnnpose_ros.core.solver import LMConfig
from rnnpose_ros.tools.parity_common import Comparison, compare, float_state_dict, load_fixture
from rnnpose_ros.tools.parity_refine import load_referenced_weights, reference_from_fixture

#: Tolerances on a device (absolute, relative), looser than the CPU's (``shared/golden/README.md``):
#: fp16 keeps ~3 decimal digits, which the 4 recurrent steps carry into flows of ~0.05 px and pose
#: increments of ~1e-4 (m or rad).
DEVICE_TOL = {
    "flow": (0.05, 1e-2),
    "weight": (5e-3, 1e-2),
    "gru_net": (5e-3, 1e-2),
    "Tij_out": (2e-4, 0.0),
    "descriptors": (1e-2, 0.0),
}
VARIANTS = ("fp32", "fp16", "bf16-cl")
PRODUCT_VARIANTS = ("fp32", "fp16")


def _reference_on(reference: RenderedReference, device: torch.device) -> RenderedReference:
    return RenderedReference(
        **{name: None if value is None else value.to(device) for name, value in vars(reference).items()}
    )


def check_refine_core(fixture_dir: Path, device: torch.device, variant: str) -> list[Comparison]:
    """One render iteration of the fixture on ``device``: per-step flows, weights, GRU state, poses."""
    fixture = load_fixture(fixture_dir / "refine_core.pt")
    net = load_referenced_weights(fixture, fixture_dir).to(device)
    inputs = fixture["inputs"]
    reference = _reference_on(reference_from_fixture(inputs), device)
    mixed = variant == "fp16" and device.type == "cuda"
    with torch.no_grad():
        state = start_render_iteration(net, reference, mixed_precision=mixed)
        trace = list(
            run_render_iteration(
                lambda Tij, _: predict_correspondences(net, state, Tij, mixed_precision=mixed),
                solver_depth(reference.depth),
                reference.K,
                inputs["Tij0"][:, 0].to(device),
                fixture["per_step"]["Tij_in"].shape[0],
                LMConfig(),
            )
        )
    expected = fixture["per_step"]
    actual = {
        "flow": [s.correspondences.flow for s in trace],
        "weight": [s.correspondences.weight for s in trace],
        "gru_net": [s.correspondences.hidden for s in trace],
        "Tij_out": [s.solve.pose for s in trace],
    }
    results = []
    for name, values in actual.items():
        atol, rtol = DEVICE_TOL[name]
        value = torch.stack(values).cpu().reshape(expected[name].shape)
        results.append(compare(f"{variant} refine_core.{name}", value, expected[name], atol=atol, rtol=rtol))
    return results


def check_desc2d(fixture_dir: Path, device: torch.device, variant: str) -> list[Comparison]:
    """The 2D descriptor net on ``device`` (bf16-cl: bf16 autocast, channels-last)."""
    fixture = load_fixture(fixture_dir / "desc2d.pt")
    state = float_state_dict(fixture["state_dict"])
    net = Desc2DNet(descriptor_dim=state["convDb.weight"].shape[0]).eval()
    net.load_state_dict(state)
    net = net.to(device)
    image = fixture["input_image"].to(device)
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
    if variant == "bf16-cl":
        net = net.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
        if device.type == "cuda":
            autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        descriptors = net(image).descriptors.float().cpu()
    atol, rtol = DEVICE_TOL["descriptors"]
    return [
        compare(f"{variant} desc2d.descriptors", descriptors, fixture["descriptors"], atol=atol, rtol=rtol)
    ]


def run(fixture_dir: Path, device: torch.device) -> dict[str, list[Comparison]]:
    """All checks per variant; TF32 is off so that ``fp32`` means float32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return {
        variant: (check_refine_core(fixture_dir, device, variant) if variant in PRODUCT_VARIANTS else [])
        + check_desc2d(fixture_dir, device, variant)
        for variant in VARIANTS
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "golden", type=Path, help="folder of the golden fixtures (refine_core.pt, desc2d.pt, ...)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="write {variant: {tensor: passed}} here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    print(f"device: {name}")
    results = run(args.golden, device)
    summary = {}
    for variant, comparisons in results.items():
        for c in comparisons:
            print(
                f"{'PASS' if c.passed else 'FAIL'}  {c.name:<32} max_abs={c.max_abs:.3e} "
                f"max_rel={c.max_rel:.3e}  (atol={c.atol:g}, rtol={c.rtol:g})"
            )
        passed = all(c.passed for c in comparisons)
        summary[variant] = passed
        print(f"{'PASS' if passed else 'FAIL'}  variant {variant}")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"device": name, "variants": summary, "tolerances": DEVICE_TOL}, indent=2) + "\n"
        )
    return 0 if all(summary[v] for v in PRODUCT_VARIANTS) else 1


if __name__ == "__main__":
    sys.exit(main())
