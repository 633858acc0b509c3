"""Synthetic accuracy evaluation of the refiner: initial vs refined recall on generated scenes.

    python -m rnnpose_ros.tools.evaluate --objects config/objects.yaml --num-scenes 80 --seed 0 \\
        --noise-rot 15 --noise-trans 0.01,0.01,0.05 --backend classical --json eval.json
    python -m rnnpose_ros.tools.evaluate --num-scenes 40 --sweep --plot sweep.png

Every scene renders one or more registered objects over a real photograph (:mod:`synth`) with a
ground-truth pose and an initial pose drawn from the standard noise model (Euler angles
N(0, noise-rot) per axis, translation N(0, noise-trans) per camera axis, total rotation ≤ 45°).
All instances of a scene are refined in one ``Refiner.refine`` call. Recall is the fraction of
instances passing each test:

- ``add_s``: ADD(-S) < 0.1·diameter (ADD-S for objects registered as symmetric);
- ``proj_5px``: mean 2D reprojection error of the model points < 5 px (with the scene's K);
- ``cm5_deg5``: translation error < 5 cm and rotation error < 5°.

``--sweep`` repeats the evaluation at several noise levels (the given one scaled by
0.25, 0.5, 1, 1.5, 2 in rotation and translation) and ``--plot`` draws recall vs noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rnnpose_ros.core.backends import BACKENDS, backend_help
from rnnpose_ros.package_files import default_objects_file

DEFAULT_OBJECTS = default_objects_file()
METRICS = ("add_s", "proj_5px", "cm5_deg5")
METRIC_LABELS = {"add_s": "ADD(-S) < 0.1d", "proj_5px": "2D proj < 5 px", "cm5_deg5": "5 cm 5°"}
SWEEP_FACTORS = (0.25, 0.5, 1.0, 1.5, 2.0)


class EvaluationError(RuntimeError):
    """The evaluation cannot run with the given options."""


@dataclass
class InstanceOutcome:
    """Per-instance pass/fail of every metric before and after refinement."""

    class_id: str
    initial: dict[str, bool]
    refined: dict[str, bool]
    status: str
    score: float


@dataclass
class LevelResult:
    """Results of one noise level."""

    rot_deg: float
    trans_m: tuple[float, float, float]
    outcomes: list[InstanceOutcome] = field(default_factory=list)
    refine_seconds: float = 0.0

    def summary(self) -> dict:
        def recall(outcomes: list[InstanceOutcome], which: str) -> dict[str, float]:
            n = max(len(outcomes), 1)
            return {m: sum(getattr(o, which)[m] for o in outcomes) / n for m in METRICS}

        per_object = {}
        for class_id in sorted({o.class_id for o in self.outcomes}):
            mine = [o for o in self.outcomes if o.class_id == class_id]
            per_object[class_id] = {
                "initial": recall(mine, "initial"),
                "refined": recall(mine, "refined"),
                "n": len(mine),
            }
        statuses: dict[str, int] = {}
        for o in self.outcomes:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        return {
            "initial": recall(self.outcomes, "initial"),
            "refined": recall(self.outcomes, "refined"),
            "per_object": per_object,
            "seconds_per_instance": self.refine_seconds / max(len(self.outcomes), 1),
            "num_instances": len(self.outcomes),
            "noise": {"rot_deg": self.rot_deg, "trans_m": list(self.trans_m)},
            "status_counts": statuses,
            "mean_score": _mean([o.score for o in self.outcomes]),
            # How well the score separates good from bad refinements (ADD(-S) pass vs fail).
            "mean_score_add_s_pass": _mean([o.score for o in self.outcomes if o.refined["add_s"]]),
            "mean_score_add_s_fail": _mean([o.score for o in self.outcomes if not o.refined["add_s"]]),
        }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rnnpose_ros.tools.evaluate",
        description="Evaluate pose refinement on synthetic scenes (initial vs refined recall).",
    )
    parser.add_argument(
        "--objects", type=Path, default=DEFAULT_OBJECTS, help="objects.yaml (default shipped)"
    )
    parser.add_argument("--classes", nargs="+", default=None, help="class ids to use (default: all)")
    parser.add_argument("--num-scenes", type=int, default=80, help="scenes per noise level (default 80)")
    parser.add_argument("--instances-per-scene", type=int, default=1, help="objects per scene (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first scene (scene i uses seed+i)")
    parser.add_argument("--noise-rot", type=float, default=15.0, help="rotation noise σ per axis, degrees")
    parser.add_argument(
        "--noise-trans", type=str, default="0.01,0.01,0.05", help="translation noise σ X,Y,Z in metres"
    )
    parser.add_argument("--occluders", type=int, default=0, help="random occluder patches per scene")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default="classical", help=backend_help())
    parser.add_argument(
        "--weights", nargs="*", default=[], metavar="CLASS=FILE", help="weights per class (rnnpose backend)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--outer-iterations",
        type=int,
        default=None,
        help="render iterations (default: the backend's schedule)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--sweep", action="store_true", help="also evaluate scaled noise levels")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of recall vs noise (needs --sweep)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument(
        "--trace-gif",
        type=Path,
        default=None,
        help="animated GIF of the iterations of the first scene's first instance (contour + weight map)",
    )
    args = parser.parse_args(argv)
    try:
        trans = tuple(float(x) for x in args.noise_trans.split(","))
    except ValueError:
        parser.error(f"--noise-trans must be three numbers X,Y,Z in metres, got {args.noise_trans!r}")
    if len(trans) != 3 or any(t < 0 for t in trans):
        parser.error(f"--noise-trans must be three non-negative numbers X,Y,Z, got {args.noise_trans!r}")
    args.noise_trans = trans
    if args.num_scenes < 1:
        parser.error("--num-scenes must be at least 1")
    if args.instances_per_scene < 1:
        parser.error("--instances-per-scene must be at least 1")
    if args.outer_iterations is not None and args.outer_iterations < 1:
        parser.error("--outer-iterations must be at least 1")
    if args.noise_rot < 0:
        parser.error("--noise-rot must be non-negative")
    if args.plot is not None and not args.sweep:
        parser.error("--plot draws the noise sweep: add --sweep")
    weights = {}
    for item in args.weights:
        class_id, sep, path = item.partition("=")
        if not sep or not class_id or not path:
            parser.error(f"--weights entries must be CLASS=FILE, got {item!r}")
        weights[class_id] = Path(path)
    args.weights = weights
    return args


def build_refiner(args: argparse.Namespace, registry, renderer):
    """The Refiner for ``args.backend`` (raises EvaluationError with the reason if it cannot be built)."""
    from rnnpose_ros.core.backends import BACKENDS, BackendError
    from rnnpose_ros.core.refiner import Refiner

    for class_id, path in args.weights.items():
        if class_id not in registry:
            raise EvaluationError(f"--weights names unknown class {class_id!r}; known: {registry.class_ids}")
        if not path.is_file():
            raise EvaluationError(f"--weights file for {class_id!r} not found: {path}")
    info = BACKENDS[args.backend]
    try:
        loop = info.default_loop()
        if args.outer_iterations is not None:
            loop.outer_iterations = args.outer_iterations
        if info.needs_weights:
            backend_config = info.config_class()(weights=dict(args.weights))
        else:
            if args.weights:
                print(f"note: --weights is ignored by the {info.name} backend", file=sys.stderr)
            backend_config = None
        return Refiner(
            registry,
            backend=info.name,
            device=args.device,
            config=loop,
            backend_config=backend_config,
            renderer=renderer,
        )
    except (BackendError, ImportError) as exc:
        raise EvaluationError(f"backend {args.backend!r} is not available: {exc}") from exc


def evaluate_level(
    args: argparse.Namespace, registry, renderer, refiner, rot_deg: float, trans_m: tuple[float, float, float]
) -> LevelResult:
    """Generate ``args.num_scenes`` scenes at one noise level, refine them, score them."""
    from rnnpose_ros.core.refiner import Instance, RefineStatus
    from rnnpose_ros.core.synth import make_scene

    class_ids = args.classes or registry.class_ids
    result = LevelResult(rot_deg=rot_deg, trans_m=trans_m)
    scenes = range(args.num_scenes)
    if not args.no_progress:
        from tqdm import tqdm

        scenes = tqdm(scenes, desc=f"noise {rot_deg:g}°", unit="scene", file=sys.stderr)
    for i in scenes:
        models = [
            registry[class_ids[(i * args.instances_per_scene + k) % len(class_ids)]]
            for k in range(args.instances_per_scene)
        ]
        scene = make_scene(
            models,
            args.seed + i,
            renderer,
            occluders=args.occluders,
            rot_sigma_deg=rot_deg,
            trans_sigma=trans_m,
        )
        instances = [Instance(s.class_id, s.pose_init, s.instance_id) for s in scene.instances]
        start = time.perf_counter()
        refined = refiner.refine(scene.observation, instances)
        result.refine_seconds += time.perf_counter() - start
        for truth, out in zip(scene.instances, refined, strict=True):
            model = registry[truth.class_id]
            final = out.pose if out.status is RefineStatus.OK else truth.pose_init
            result.outcomes.append(
                InstanceOutcome(
                    class_id=truth.class_id,
                    initial=passed_tests(model, truth.pose_init, truth.pose_gt, scene.K),
                    refined=passed_tests(model, final, truth.pose_gt, scene.K),
                    status=out.status.value,
                    score=out.score,
                )
            )
    return result


def passed_tests(model, pose: np.ndarray, pose_gt: np.ndarray, K: np.ndarray) -> dict[str, bool]:
    """Which of the three tests (``METRICS``) a pose passes against the ground truth."""
    from rnnpose_ros.core import metrics

    points = model.eval_points
    error = metrics.add_or_add_s(points, pose, pose_gt, model.symmetric)
    return {
        "add_s": metrics.add_passed(error, model.diameter, 0.1),
        "proj_5px": metrics.projection_2d_passed(metrics.projection_error_2d(points, pose, pose_gt, K), 5.0),
        "cm5_deg5": metrics.cm_deg_passed(pose, pose_gt, 5.0, 5.0),
    }


def format_table(summary: dict, title: str) -> str:
    """Printable recall table (overall and per object)."""
    lines = [title, f"{'':18s}{'initial':>9s}{'refined':>9s}"]
    for metric in METRICS:
        lines.append(
            f"{METRIC_LABELS[metric]:18s}{summary['initial'][metric]:9.3f}{summary['refined'][metric]:9.3f}"
        )
    if len(summary["per_object"]) > 1:
        for class_id, entry in summary["per_object"].items():
            lines.append(f"  {class_id} (n={entry['n']})")
            for metric in METRICS:
                initial, refined = entry["initial"][metric], entry["refined"][metric]
                lines.append(f"    {METRIC_LABELS[metric]:14s}{initial:9.3f}{refined:9.3f}")
    lines.append(
        f"instances {summary['num_instances']}, {summary['seconds_per_instance']:.3f} s per instance, "
        f"statuses {summary['status_counts']}, mean score {summary['mean_score']:.3f}"
    )
    as_text = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    lines.append(
        f"mean score of ADD(-S) passes {as_text(summary['mean_score_add_s_pass'])}, "
        f"of failures {as_text(summary['mean_score_add_s_fail'])}"
    )
    return "\n".join(lines)


def plot_sweep(levels: list[dict], path: Path, backend: str) -> None:
    """Recall vs rotation noise (initial dashed, refined solid), one colour per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rot = [level["noise"]["rot_deg"] for level in levels]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for metric, colour in zip(METRICS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        refined = [lv["refined"][metric] for lv in levels]
        ax.plot(rot, refined, "-o", color=colour, label=METRIC_LABELS[metric])
        ax.plot(rot, [lv["initial"][metric] for lv in levels], "--", color=colour, alpha=0.6)
    ax.set_xlabel("initial rotation noise σ per axis (°); translation noise scaled alike")
    ax.set_ylabel("recall")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{backend} refinement (solid) vs initial poses (dashed)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    from rnnpose_ros.core.objects import ObjectModelError, ObjectRegistry
    from rnnpose_ros.core.render import Renderer

    try:
        registry = ObjectRegistry.from_yaml(args.objects)
        unknown = [c for c in args.classes or [] if c not in registry]
        if unknown:
            raise EvaluationError(f"--classes names unknown class(es) {unknown}; known: {registry.class_ids}")
        renderer = Renderer()
        refiner = build_refiner(args, registry, renderer)
    except (EvaluationError, ObjectModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    levels = [(args.noise_rot, args.noise_trans)]
    if args.sweep:
        levels = [(args.noise_rot * f, tuple(t * f for t in args.noise_trans)) for f in SWEEP_FACTORS]
    summaries = []
    for rot, trans in levels:
        summary = evaluate_level(args, registry, renderer, refiner, rot, trans).summary()
        summaries.append(summary)
        title = f"\nnoise {rot:g}° / {', '.join(f'{t * 100:g}' for t in trans)} cm ({args.backend})"
        print(format_table(summary, title), flush=True)

    main_summary = summaries[SWEEP_FACTORS.index(1.0)] if args.sweep else summaries[0]
    output = dict(main_summary)
    output.update(
        backend=args.backend,
        device=str(refiner.device),
        num_scenes=args.num_scenes,
        seed=args.seed,
        config=_config_summary(refiner),
    )
    if args.sweep:
        output["sweep"] = summaries
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(output, indent=2))
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_sweep(summaries, args.plot, args.backend)
        print(f"wrote {args.plot}")
    if args.trace_gif is not None:
        write_trace_gif(args, registry, renderer, refiner)
        print(f"wrote {args.trace_gif}")
    return 0


def write_trace_gif(args: argparse.Namespace, registry, renderer, refiner) -> None:
    """The GIF of ``--trace-gif``: scene ``args.seed`` at the main noise level, first instance."""
    from rnnpose_ros.core.refiner import Instance
    from rnnpose_ros.core.synth import make_scene
    from rnnpose_ros.tools.trace_gif import record_trace_gif

    class_ids = args.classes or registry.class_ids
    scene = make_scene(
        [registry[class_ids[0]]],
        args.seed,
        renderer,
        occluders=args.occluders,
        rot_sigma_deg=args.noise_rot,
        trans_sigma=args.noise_trans,
    )
    first = scene.instances[0]
    record_trace_gif(
        args.trace_gif, refiner, renderer, scene.observation, Instance(first.class_id, first.pose_init)
    )


def _config_summary(refiner) -> dict:
    """The schedule of the refiner, for the JSON record."""
    return {
        "outer_iterations": refiner.config.outer_iterations,
        "inner_steps": refiner.config.inner_steps,
        "published_conventions": getattr(refiner.backend.config, "published_conventions", False),
    }


if __name__ == "__main__":
    sys.exit(main())
