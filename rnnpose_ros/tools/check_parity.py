"""Compare our modules with golden fixtures of the published implementation.

Usage::

    python -m rnnpose_ros.tools.check_parity DIR [--only KIND ...] [--native-kernels]

Every ``*.pt`` file in DIR is matched to a registered check by the longest registered kind that
prefixes its file stem (``desc2d_seed3.pt`` → ``desc2d``). Checks come from the ``CHECKS`` dicts
of the modules in :data:`PARITY_MODULES`; a module that does not exist yet is skipped with a note.
One line is printed per compared tensor (max abs / max rel error, PASS/FAIL) and per fixture; the
exit status is 1 if any comparison fails or a check cannot run, 2 on a usage error.

Numerics: torch runs with 2 threads, and oneDNN is limited to AVX2 kernels unless
``--native-kernels``. The fixtures were reproduced bit for bit with AVX2 oneDNN kernels; AVX-512
kernels round differently, and the InstanceNorm layers of the 2D nets amplify that (the desc2d
decoder differs by ~3e-5 there, as much as the fixture itself differs from a float64 evaluation).
The ISA limit only takes effect before the process's first oneDNN primitive, i.e. when this tool
runs as its own process.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from rnnpose_ros.tools.parity_common import Comparison, FixtureCheck, load_fixture

#: Modules that register checks, imported in this order. Listed explicitly: never discovered by glob.
PARITY_MODULES = (
    "rnnpose_ros.tools.parity_nets2d",
    "rnnpose_ros.tools.parity_kpconv",
    "rnnpose_ros.tools.parity_geometry",
    "rnnpose_ros.tools.parity_refine",
    "rnnpose_ros.tools.parity_losses",
)
PARITY_THREADS = 2
REFERENCE_ONEDNN_ISA = "AVX2"


class ParityRegistryError(RuntimeError):
    """Two modules register the same fixture kind."""


def collect_checks(module_names: Sequence[str] = PARITY_MODULES) -> tuple[dict[str, FixtureCheck], list[str]]:
    """Import each parity module that exists and merge their ``CHECKS``.

    Returns:
        ``(checks, import_errors)``: kind → check, and one message per module that exists but
        failed to import. Absent modules are announced on stdout and skipped.
    """
    checks: dict[str, FixtureCheck] = {}
    errors: list[str] = []
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                print(f"note: {name} not found, its checks are skipped")
                continue
            errors.append(f"{name} failed to import: {exc}")
            continue
        except Exception as exc:
            errors.append(f"{name} failed to import: {type(exc).__name__}: {exc}")
            continue
        for kind, check in getattr(module, "CHECKS", {}).items():
            if kind in checks:
                raise ParityRegistryError(f"fixture kind {kind!r} registered twice (again by {name})")
            checks[kind] = check
    return checks, errors


def resolve_kind(stem: str, kinds: Sequence[str]) -> str | None:
    """The longest kind that prefixes ``stem``, or ``None``."""
    matches = [kind for kind in kinds if stem.startswith(kind)]
    return max(matches, key=len) if matches else None


def run_check(check: FixtureCheck, path: Path) -> list[Comparison]:
    """Load ``path`` and run ``check`` on it (passing ``fixture_dir`` where the check accepts it).

    An exception becomes one failing comparison named ``error`` so a broken check never hides.
    """
    try:
        fixture = load_fixture(path)
        if "fixture_dir" in inspect.signature(check).parameters:
            return check(fixture, fixture_dir=path.parent)
        return check(fixture)
    except Exception as exc:
        return [
            Comparison("error", float("nan"), float("nan"), 0.0, 0.0, False, f"{type(exc).__name__}: {exc}")
        ]


def format_comparison(fixture_name: str, comparison: Comparison) -> str:
    verdict = "PASS" if comparison.passed else "FAIL"
    line = (
        f"{verdict}  {fixture_name + ':' + comparison.name:<56} max_abs={comparison.max_abs:.3e} "
        f"max_rel={comparison.max_rel:.3e}  (atol={comparison.atol:g}, rtol={comparison.rtol:g})"
    )
    return f"{line}  {comparison.detail}" if comparison.detail else line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="check_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture_dir", type=Path, help="folder holding the golden *.pt files")
    parser.add_argument(
        "--only", action="append", metavar="KIND", help="check only fixtures of this kind (repeatable)"
    )
    parser.add_argument(
        "--native-kernels",
        action="store_true",
        help=f"do not limit oneDNN to {REFERENCE_ONEDNN_ISA} kernels (results then depend on the CPU)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.native_kernels:
        # Must precede the first oneDNN primitive of the process (see module docstring).
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", REFERENCE_ONEDNN_ISA)
    torch.set_num_threads(PARITY_THREADS)
    if not args.fixture_dir.is_dir():
        print(f"error: fixture folder {args.fixture_dir} does not exist", file=sys.stderr)
        return 2

    checks, import_errors = collect_checks()
    for message in import_errors:
        print(f"ERROR {message}")
    if args.only:
        unknown = sorted(set(args.only) - set(checks))
        if unknown:
            print(f"error: no registered check for {unknown}; known: {sorted(checks)}", file=sys.stderr)
            return 2
    print(
        f"threads={torch.get_num_threads()} oneDNN ISA limit={os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')} "
        f"torch={torch.__version__}"
    )

    failed = 0
    compared = 0
    unchecked = 0
    for path in sorted(args.fixture_dir.glob("*.pt")):
        kind = resolve_kind(path.stem, list(checks))
        if args.only and kind not in args.only:
            continue
        if kind is None:
            unchecked += 1
            print(f"----  {path.name}: no registered check")
            continue
        comparisons = run_check(checks[kind], path)
        for comparison in comparisons:
            print(format_comparison(path.name, comparison))
        bad = sum(not c.passed for c in comparisons)
        compared += len(comparisons)
        failed += bad
        verdict = "FAIL" if bad else "PASS"
        print(f"{verdict}  {path.name} [{kind}]: {len(comparisons) - bad}/{len(comparisons)} passed")

    print(f"summary: {compared} comparisons, {failed} failed, {unchecked} fixtures without a check")
    if args.only and not compared:
        print(f"error: no fixture of kind {args.only} in {args.fixture_dir}", file=sys.stderr)
        return 1
    # With --only, a module that failed to import cannot own the requested kinds (they resolved).
    if failed or (import_errors and not args.only):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
