"""Shared pieces of the parity checks against fixtures of the published implementation.

A fixture file (format of ``shared/golden``) is a ``torch.load(weights_only=True)`` dict of
tensors, lists, dicts, numbers and strings. Each fixture kind has one check function
``check(fixture: dict) -> list[Comparison]`` registered under the file-name stem prefix that
identifies its kind (``desc2d.pt``, ``desc2d_seed3.pt`` → ``desc2d``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing one computed tensor with its stored reference."""

    name: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    detail: str = ""


FixtureCheck = Callable[[dict], list[Comparison]]


def compare(name: str, actual, expected, atol: float, rtol: float) -> Comparison:
    """Compare ``actual`` with ``expected`` as ``torch.testing.assert_close`` would.

    Passes where every element satisfies |a − e| ≤ atol + rtol·|e| and shapes match.
    Integer tensors compare exactly whatever the tolerances.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    if actual.shape != expected.shape:
        return Comparison(
            name,
            float("inf"),
            float("inf"),
            atol,
            rtol,
            False,
            f"shape {tuple(actual.shape)} != {tuple(expected.shape)}",
        )
    if not expected.is_floating_point():
        equal = bool(torch.equal(actual.to(expected.dtype), expected))
        mismatches = int((actual.to(expected.dtype) != expected).sum())
        return Comparison(
            name, float(mismatches), 0.0, 0.0, 0.0, equal, "" if equal else f"{mismatches} differ"
        )
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.numel() == 0:
        return Comparison(name, 0.0, 0.0, atol, rtol, True)
    diff = (a - e).abs()
    nan_mismatch = bool((torch.isnan(a) != torch.isnan(e)).any())
    diff = torch.where(torch.isnan(a) & torch.isnan(e), torch.zeros_like(diff), diff)
    max_abs = float(diff.max())
    max_rel = float((diff / e.abs().clamp_min(1e-12)).max())
    passed = not nan_mismatch and bool((diff <= atol + rtol * e.abs()).all())
    return Comparison(
        name, max_abs, max_rel, atol, rtol, passed, "NaN pattern differs" if nan_mismatch else ""
    )


def load_fixture(path: Path) -> dict:
    """Load one fixture file safely (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def float_state_dict(state_dict: dict) -> dict:
    """Fixture weights are stored as float16 copies of fp16-exact values: widen them losslessly."""
    return {
        k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in state_dict.items()
    }
