"""Loss curves of a training run from its ``log.jsonl``.

    python -m rnnpose_ros.tools.plot_training runs/duck/log.jsonl --out runs/duck/curves.png [--smooth 10]

Four panels against the step: total loss, circle loss, the motion terms (alignment and flow summed
over the iterations) and the last iteration's flow end-point error; thin lines are the logged values,
thick lines their running mean over ``--smooth`` records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PANELS = (
    ("loss/total", "total loss"),
    ("loss/circle", "circle loss"),
    ("loss/align", "alignment loss (Σ iterations, m)"),
    ("metric/epe_last", "flow EPE, last iteration (px)"),
)


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at every index (fewer at the start); NaNs ignored."""
    out = np.empty_like(values)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out[i] = np.nanmean(chunk) if np.isfinite(chunk).any() else np.nan
    return out


def plot_log(log: Path, out: Path, smooth: int = 10) -> None:
    """Write the four-panel PNG of ``log`` to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{log} holds no records")
    steps = np.array([r["step"] for r in records])
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        values = np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=float)
        ax.plot(steps, values, lw=0.6, alpha=0.5)
        ax.plot(steps, running_mean(values, smooth), lw=2)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rnnpose_ros.tools.plot_training", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("log", type=Path, help="log.jsonl of a run")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--smooth", type=int, default=10, help="running-mean window, records (default 10)")
    args = parser.parse_args(argv)
    if not args.log.is_file():
        print(f"error: {args.log} does not exist", file=sys.stderr)
        return 2
    try:
        plot_log(args.log, args.out, max(args.smooth, 1))
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
