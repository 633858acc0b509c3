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
- ``cm5_deg5``: translation error < 5 cm and rotation error < 5°

(:data:`rnnpose_ros.core.metrics.PASS_TESTS`), plus the stricter ADD(-S) < 0.02·d and < 0.05·d
(``add_s_002``, ``add_s_005``, refined) and ``score_auroc``: the area under the ROC curve of the
refiner's score as a predictor of ADD(-S)@0.1d pass vs fail (1: every pass scores above every
failure; 0.5: no information).

``--depth`` gives the refiner a depth image from the synthetic sensor
(:class:`~rnnpose_ros.core.depth_sensor.DepthSensorModel`): the scenes are the same as without it for
a given seed (the depth noise has its own random stream), so two runs compare instance by instance.

``--sequence`` evaluates tracking on a synthetic sequence instead (:mod:`.sequence_eval`):

    python -m rnnpose_ros.tools.evaluate --sequence --frames 90 --detect-every 10 --seed 0 --json out.json

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
from typing import TYPE_CHECKING

import numpy as np

from rnnpose_ros.core import metrics
from rnnpose_ros.core.backends import BACKENDS, backend_help
from rnnpose_ros.core.renderers import RENDERER_KINDS
from rnnpose_ros.package_files import default_objects_file

if TYPE_CHECKING:  # heavy (OpenGL, torch): imported where used, so that --help stays fast
    from rnnpose_ros.core.objects import ObjectModel, ObjectRegistry
    from rnnpose_ros.core.refiner import RefineResult
    from rnnpose_ros.core.synth import Scene, SceneSpec

DEFAULT_OBJECTS = default_objects_file()
SWEEP_FACTORS = (0.25, 0.5, 1.0, 1.5, 2.0)


class EvaluationError(RuntimeError):
    """The evaluation cannot run with the given options."""


@dataclass
class InstanceOutcome:
    """Per-instance pass/fail of every test (:data:`~rnnpose_ros.core.metrics.PASS_TESTS`) before and
    after refinement."""

    class_id: str
    initial: dict[str, bool]
    refined: dict[str, bool]
    status: str
    score: float
    add_fraction: float = float("nan")
    restarted: bool = False


@dataclass
class LevelResult:
    """Results of one noise level."""

    rot_deg: float
    trans_m: tuple[float, float, float]
    outcomes: list[InstanceOutcome] = field(default_factory=list)
    refine_seconds: float = 0.0
    #: Per scene, its refinement time divided by its instances (restarts included), seconds.
    scene_seconds_per_instance: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        def recall(outcomes: list[InstanceOutcome], which: str) -> dict[str, float]:
            n = max(len(outcomes), 1)
            return {m: sum(getattr(o, which)[m] for o in outcomes) / n for m in metrics.PASS_TESTS}

        per_object = {}
        for class_id in sorted({o.class_id for o in self.outcomes}):
            mine = [o for o in self.outcomes if o.class_id == class_id]
            per_object[class_id] = {
                "initial": recall(mine, "initial"),
                "refined": recall(mine, "refined"),
                "n": len(mine),
                **_score_figures(mine),
            }
        statuses: dict[str, int] = {}
        for o in self.outcomes:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        return {
            "initial": recall(self.outcomes, "initial"),
            "refined": recall(self.outcomes, "refined"),
            "per_object": per_object,
            "seconds_per_instance": self.refine_seconds / max(len(self.outcomes), 1),
            "median_seconds_per_instance": _median(self.scene_seconds_per_instance),
            "num_instances": len(self.outcomes),
            "noise": {"rot_deg": self.rot_deg, "trans_m": list(self.trans_m)},
            "status_counts": statuses,
            "mean_score": _mean([o.score for o in self.outcomes]),
            # How well the score separates good from bad refinements (ADD(-S) pass vs fail).
            "mean_score_add_s_pass": _mean([o.score for o in self.outcomes if o.refined["add_s"]]),
            "mean_score_add_s_fail": _mean([o.score for o in self.outcomes if not o.refined["add_s"]]),
            **_score_figures(self.outcomes),
        }


def _score_figures(outcomes: list[InstanceOutcome]) -> dict[str, float | None]:
    """Strict ADD(-S) recalls, how well the score separates passes from failures, restart rate."""
    scores, passed = [o.score for o in outcomes], [o.refined["add_s"] for o in outcomes]
    return {
        "add_s_002": _mean([float(o.add_fraction < 0.02) for o in outcomes]),
        "add_s_005": _mean([float(o.add_fraction < 0.05) for o in outcomes]),
        "score_auroc": score_auroc(scores, passed),
        "median_score_add_s_pass": _median([s for s, p in zip(scores, passed, strict=True) if p]),
        "restart_rate": _mean([float(o.restarted) for o in outcomes]),
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def score_auroc(scores: list[float], passed: list[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` separating ``passed`` from failed instances: the
    probability that a random pass scores above a random failure (ties count ½); None without both."""
    positive = np.array([s for s, p in zip(scores, passed, strict=True) if p], dtype=np.float64)
    negative = np.array([s for s, p in zip(scores, passed, strict=True) if not p], dtype=np.float64)
    if len(positive) == 0 or len(negative) == 0:
        return None
    greater = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))


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
    parser.add_argument(
        "--depth",
        action="store_true",
        help="refine with a synthetic registered depth image (RealSense-like sensor model; same scenes)",
    )
    parser.add_argument("--backend", choices=tuple(BACKENDS), default="classical", help=backend_help())
    parser.add_argument(
        "--weights", nargs="*", default=[], metavar="CLASS=FILE", help="weights per class (rnnpose backend)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch and OpenCV CPU threads (0 = available cores)"
    )
    parser.add_argument(
        "--renderer",
        default="auto",
        choices=RENDERER_KINDS,
        help="the refiner's renderer (auto: Warp on CUDA, OpenGL on the CPU); scenes are drawn with OpenGL",
    )
    parser.add_argument(
        "--outer-iterations",
        type=int,
        default=None,
        help="render iterations (default: the backend's schedule)",
    )
    parser.add_argument(
        "--no-early-stop", action="store_true", help="run the whole schedule (no convergence-based stop)"
    )
    parser.add_argument(
        "--restart-below",
        type=float,
        default=None,
        metavar="SCORE",
        help="restart results scoring below this, with and without depth (0 = never; default: the "
        "backend's thresholds), as the node's restart_below_score",
    )
    parser.add_argument(
        "--inner-steps", type=int, default=None, help="steps per render iteration (default: the backend's)"
    )
    parser.add_argument(
        "--crop-sizes",
        default=None,
        metavar="FIRST,ZOOM",
        help="rnnpose crop sides in pixels (default 320,240): those the weights were trained with",
    )
    parser.add_argument(
        "--dataset",
        choices=("synthetic", "bop"),
        default="synthetic",
        help="synthetic scenes or a BOP folder",
    )
    parser.add_argument("--root", type=Path, default=None, help="BOP dataset folder (--dataset bop)")
    parser.add_argument("--split", default="test", help="BOP split (default test)")
    parser.add_argument(
        "--init", type=Path, default=None, help="BOP19 CSV of initial poses (default: noisy GT)"
    )
    parser.add_argument("--results-csv", type=Path, default=None, help="write refined poses as BOP19 CSV")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate at most this many BOP images")
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
    sequence = parser.add_argument_group("tracking (--sequence, see rnnpose_ros.tools.sequence_eval)")
    sequence.add_argument(
        "--sequence", action="store_true", help="evaluate tracking on one synthetic sequence"
    )
    sequence.add_argument("--frames", type=int, default=90, help="frames of the sequence (default 90)")
    sequence.add_argument(
        "--detect-every", type=int, default=10, help="detections on every Nth frame (default 10)"
    )
    sequence.add_argument(
        "--track-iterations", type=int, default=1, help="render iterations per tracking step (default 1)"
    )
    sequence.add_argument(
        "--occlude", type=str, default=None, metavar="FIRST,COUNT", help="hide every object for COUNT frames"
    )
    args = parser.parse_args(argv)
    if args.frames < 1 or args.detect_every < 1 or args.track_iterations < 1:
        parser.error("--frames, --detect-every and --track-iterations must be at least 1")
    if args.occlude is not None:
        try:
            first, count = (int(x) for x in args.occlude.split(","))
        except ValueError:
            parser.error(f"--occlude must be two integers FIRST,COUNT, got {args.occlude!r}")
        if first < 0 or count < 1:
            parser.error(f"--occlude needs FIRST ≥ 0 and COUNT ≥ 1, got {args.occlude!r}")
        args.occlude = (first, count)
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
    if args.inner_steps is not None and args.inner_steps < 1:
        parser.error("--inner-steps must be at least 1")
    if args.noise_rot < 0:
        parser.error("--noise-rot must be non-negative")
    if args.dataset == "bop" and args.root is None:
        parser.error("--dataset bop needs --root")
    if args.crop_sizes is not None:
        try:
            args.crop_sizes = tuple(int(x) for x in args.crop_sizes.split(","))
        except ValueError:
            parser.error(f"--crop-sizes must be two integers FIRST,ZOOM, got {args.crop_sizes!r}")
        if len(args.crop_sizes) != 2 or any(c < 64 or c % 8 for c in args.crop_sizes):
            parser.error(f"--crop-sizes must be two multiples of 8 ≥ 64, got {args.crop_sizes}")
    if args.plot is not None and not (args.sweep or args.sequence) and args.dataset != "bop":
        parser.error("--plot draws the noise sweep (add --sweep) or the sequence (add --sequence)")
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
        if args.no_early_stop:
            loop.convergence = None
        if args.restart_below is not None:
            loop.use_one_restart_threshold(args.restart_below)
        if getattr(args, "inner_steps", None) is not None:
            loop.inner_steps = args.inner_steps
        if info.needs_weights:
            backend_config = info.config_class()(weights=dict(args.weights))
            if getattr(args, "crop_sizes", None):
                backend_config.first_crop_size, backend_config.zoom_crop_size = args.crop_sizes
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
    from rnnpose_ros.core.refiner import Instance
    from rnnpose_ros.core.synth import make_scene

    spec = scene_spec(args, rot_deg, trans_m)
    result = LevelResult(rot_deg=rot_deg, trans_m=trans_m)
    scenes = range(args.num_scenes)
    if not args.no_progress:
        from tqdm import tqdm

        scenes = tqdm(scenes, desc=f"noise {rot_deg:g}°", unit="scene", file=sys.stderr)
    for i in scenes:
        scene = make_scene(scene_models(args, registry, i), args.seed + i, renderer, spec)
        instances = [Instance(s.class_id, s.pose_init, s.instance_id) for s in scene.instances]
        start = time.perf_counter()
        refined = refiner.refine(scene.observation, instances)
        elapsed = time.perf_counter() - start
        result.refine_seconds += elapsed
        result.scene_seconds_per_instance.append(elapsed / max(len(instances), 1))
        result.outcomes += score_scene(scene, refined, registry)
    return result


def scene_spec(args: argparse.Namespace, rot_deg: float, trans_m: tuple[float, float, float]) -> SceneSpec:
    """The :class:`~rnnpose_ros.core.synth.SceneSpec` of one noise level (σ in degrees and metres)."""
    from rnnpose_ros.core.depth_sensor import DepthSensorModel
    from rnnpose_ros.core.synth import SceneSpec

    return SceneSpec(
        occluders=args.occluders,
        rot_sigma_deg=rot_deg,
        trans_sigma=trans_m,
        depth=DepthSensorModel() if args.depth else None,
    )


def scene_models(args: argparse.Namespace, registry: ObjectRegistry, index: int) -> list[ObjectModel]:
    """The objects of scene ``index``: ``--instances-per-scene`` of them, cycling through the classes."""
    class_ids = args.classes or registry.class_ids
    per_scene = args.instances_per_scene
    return [registry[class_ids[(index * per_scene + k) % len(class_ids)]] for k in range(per_scene)]


def score_scene(scene: Scene, refined: list[RefineResult], registry: ObjectRegistry) -> list[InstanceOutcome]:
    """Which tests each instance's initial and refined pose pass; an instance the refiner did not
    refine (status other than OK) keeps its initial pose."""
    from rnnpose_ros.core.refiner import RefineStatus

    outcomes = []
    for truth, out in zip(scene.instances, refined, strict=True):
        model = registry[truth.class_id]
        final = out.pose if out.status is RefineStatus.OK else truth.pose_init
        refined = metrics.pose_errors(model, final, truth.pose_gt, scene.K)
        outcomes.append(
            InstanceOutcome(
                class_id=truth.class_id,
                initial=metrics.passed(metrics.pose_errors(model, truth.pose_init, truth.pose_gt, scene.K)),
                refined=metrics.passed(refined),
                status=out.status.value,
                score=out.score,
                add_fraction=refined.add_fraction,
                restarted=out.restarted,
            )
        )
    return outcomes


def format_table(summary: dict, title: str) -> str:
    """Printable recall table (overall and per object)."""
    lines = [title, f"{'':18s}{'initial':>9s}{'refined':>9s}"]
    for name, test in metrics.PASS_TESTS.items():
        lines.append(f"{test.label:18s}{summary['initial'][name]:9.3f}{summary['refined'][name]:9.3f}")
    if len(summary["per_object"]) > 1:
        for class_id, entry in summary["per_object"].items():
            lines.append(f"  {class_id} (n={entry['n']})")
            for name, test in metrics.PASS_TESTS.items():
                lines.append(
                    f"    {test.label:14s}{entry['initial'][name]:9.3f}{entry['refined'][name]:9.3f}"
                )
            lines.append(f"    {_score_line(entry)}")
    lines.append(
        f"instances {summary['num_instances']}, {summary['seconds_per_instance']:.3f} s per instance"
        + (
            ""
            if summary.get("median_seconds_per_instance") is None
            else f" (median over scenes {summary['median_seconds_per_instance']:.3f} s)"
        )
        + ", "
        f"statuses {summary['status_counts']}, mean score {summary['mean_score']:.3f}"
    )
    as_text = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    lines.append(
        f"mean score of ADD(-S) passes {as_text(summary['mean_score_add_s_pass'])}, "
        f"of failures {as_text(summary['mean_score_add_s_fail'])}"
    )
    lines.append(_score_line(summary))
    return "\n".join(lines)


def _score_line(figures: dict) -> str:
    as_text = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    return (
        f"ADD(-S) < 0.02d {as_text(figures['add_s_002'])}, < 0.05d {as_text(figures['add_s_005'])}; "
        f"score AUROC {as_text(figures['score_auroc'])}, median score of passes "
        f"{as_text(figures['median_score_add_s_pass'])}, restarted {as_text(figures['restart_rate'])}"
    )


def plot_sweep(levels: list[dict], path: Path, backend: str) -> None:
    """Recall vs rotation noise (initial dashed, refined solid), one colour per test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rot = [level["noise"]["rot_deg"] for level in levels]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (name, test), colour in zip(
        metrics.PASS_TESTS.items(), ("tab:blue", "tab:orange", "tab:green"), strict=True
    ):
        ax.plot(rot, [lv["refined"][name] for lv in levels], "-o", color=colour, label=test.label)
        ax.plot(rot, [lv["initial"][name] for lv in levels], "--", color=colour, alpha=0.6)
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
    from rnnpose_ros.core.threads import configure_threads, prefer_passive_waiting

    prefer_passive_waiting()
    configure_threads(args.threads)
    if args.sequence:
        from rnnpose_ros.tools.sequence_eval import main as sequence_main

        return sequence_main(args)
    if args.dataset == "bop":
        from rnnpose_ros.tools.bop_evaluation import main_bop

        return main_bop(args)
    from rnnpose_ros.core.objects import ObjectModelError

    try:
        registry, renderer, refiner = setup(args)
    except (EvaluationError, ObjectModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summaries = []
    for rot, trans in noise_levels(args):
        summary = evaluate_level(args, registry, renderer, refiner, rot, trans).summary()
        summaries.append(summary)
        title = f"\nnoise {rot:g}° / {', '.join(f'{t * 100:g}' for t in trans)} cm ({args.backend})"
        print(format_table(summary, title), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_record(args, refiner, summaries), indent=2))
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_sweep(summaries, args.plot, args.backend)
        print(f"wrote {args.plot}")
    if args.trace_gif is not None:
        write_trace_gif(args, registry, renderer, refiner)
        print(f"wrote {args.trace_gif}")
    return 0


def setup(args: argparse.Namespace) -> tuple:
    """(registry, renderer, refiner) of ``args``; raises EvaluationError or ObjectModelError."""
    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.render import Renderer
    from rnnpose_ros.core.renderers import default_renderer_kind, make_renderer

    registry = ObjectRegistry.from_yaml(args.objects)
    unknown = [c for c in args.classes or [] if c not in registry]
    if unknown:
        raise EvaluationError(f"--classes names unknown class(es) {unknown}; known: {registry.class_ids}")
    renderer = Renderer()
    kind = default_renderer_kind(args.device) if args.renderer == "auto" else args.renderer
    refiner_renderer = renderer if kind == "opengl" else make_renderer(args.device, kind)
    return registry, renderer, build_refiner(args, registry, refiner_renderer)


def noise_levels(args: argparse.Namespace) -> list[tuple[float, tuple[float, ...]]]:
    """(rotation σ degrees, translation σ X, Y, Z metres) of every level to evaluate."""
    if not args.sweep:
        return [(args.noise_rot, args.noise_trans)]
    return [(args.noise_rot * f, tuple(t * f for t in args.noise_trans)) for f in SWEEP_FACTORS]


def json_record(args: argparse.Namespace, refiner, summaries: list[dict]) -> dict:
    """The ``--json`` output: the main level's summary, the run's settings, and the sweep if any."""
    main_summary = summaries[SWEEP_FACTORS.index(1.0)] if args.sweep else summaries[0]
    output = dict(main_summary)
    output.update(
        backend=args.backend,
        device=str(refiner.device),
        num_scenes=args.num_scenes,
        seed=args.seed,
        depth=args.depth,
        occluders=args.occluders,
        config=_config_summary(refiner),
    )
    if args.sweep:
        output["sweep"] = summaries
    return output


def write_trace_gif(args: argparse.Namespace, registry, renderer, refiner) -> None:
    """The GIF of ``--trace-gif``: scene ``args.seed`` at the main noise level, first instance."""
    from rnnpose_ros.core.refiner import Instance
    from rnnpose_ros.core.synth import make_scene
    from rnnpose_ros.tools.trace_gif import record_trace_gif

    class_ids = args.classes or registry.class_ids
    spec = scene_spec(args, args.noise_rot, args.noise_trans)
    scene = make_scene([registry[class_ids[0]]], args.seed, renderer, spec)
    first = scene.instances[0]
    record_trace_gif(
        args.trace_gif, refiner, renderer, scene.observation, Instance(first.class_id, first.pose_init)
    )


def _config_summary(refiner) -> dict:
    """The schedule and restart thresholds of the refiner, for the JSON record."""
    return {
        "outer_iterations": refiner.config.outer_iterations,
        "inner_steps": refiner.config.inner_steps,
        "restart_below_score": refiner.config.restart_threshold(with_depth=False),
        "restart_below_score_with_depth": refiner.config.restart_threshold(with_depth=True),
        "published_conventions": getattr(refiner.backend.config, "published_conventions", False),
    }


if __name__ == "__main__":
    sys.exit(main())
