"""Evaluation of the refiner on a BOP dataset (``evaluate --dataset bop``; the CLI is evaluate.py).

    python -m rnnpose_ros.tools.evaluate --dataset bop --root DIR [--split test] [--init FILE] \\
        --backend rnnpose --weights obj_000001=runs/duck/weights/duck.pt --json bop.json \\
        --plot bop.png --results-csv refined_lmo-test.csv

Every annotated instance of the split is refined from an initial pose: the best-matching row of a
BOP19 results file (``--init``: same image and object, nearest translation), or the ground truth
perturbed with the standard noise model (``--noise-rot``, ``--noise-trans``; seeded per image). All
instances of an image are refined in one ``Refiner.refine`` call, exactly as the synthetic
evaluation refines a scene, so a BOP folder written from synthetic scenes evaluates to the same
numbers as those scenes in memory.

Reported per object and overall: the three standard tests (ADD(-S) < 0.1d, 2D projection < 5 px,
5 cm 5°) before and after refinement, and the BOP recalls AR_MSSD (thresholds 0.05–0.5 diameters)
and AR_MSPD (5–50 px scaled by image width / 640), the VSD-free part of the BOP score. Symmetries
come from ``models_info.json`` (discrete ones as given; continuous ones sampled every 10°).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rnnpose_ros.core import metrics
from rnnpose_ros.data.bop import BopDataset, BopEstimate, BopImage, object_class_id, read_results

MSSD_THRESHOLDS = np.arange(0.05, 0.51, 0.05)
MSPD_THRESHOLDS_PX = np.arange(5.0, 51.0, 5.0)
CONTINUOUS_SYMMETRY_STEP_DEG = 10.0


def symmetry_transforms(entry: dict) -> list[np.ndarray]:
    """4×4 model-frame symmetries of a models_info entry (metres), identity first."""
    transforms = [np.eye(4)]
    for flat in entry.get("symmetries_discrete", []) or []:
        S = np.asarray(flat, dtype=np.float64).reshape(4, 4).copy()
        S[:3, 3] /= 1000.0
        transforms.append(S)
    from scipy.spatial.transform import Rotation

    for sym in entry.get("symmetries_continuous", []) or []:
        axis = np.asarray(sym["axis"], dtype=np.float64)
        offset = np.asarray(sym.get("offset", [0, 0, 0]), dtype=np.float64) / 1000.0
        for angle in np.arange(CONTINUOUS_SYMMETRY_STEP_DEG, 360.0, CONTINUOUS_SYMMETRY_STEP_DEG):
            R = Rotation.from_rotvec(np.radians(angle) * axis / np.linalg.norm(axis)).as_matrix()
            S = np.eye(4)
            S[:3, :3], S[:3, 3] = R, offset - R @ offset
            transforms.append(S)
    return transforms


@dataclass
class BopInstanceResult:
    """One refined instance: the standard outcome plus the BOP errors of the refined pose."""

    outcome: object  # evaluate.InstanceOutcome
    mssd_m: float
    mspd_px: float
    diameter_m: float
    image_width: int


@dataclass
class BopEvaluation:
    """Everything an evaluation produced."""

    results: list[BopInstanceResult] = field(default_factory=list)
    estimates: list[BopEstimate] = field(default_factory=list)
    refine_seconds: float = 0.0


def match_initial(
    image: BopImage, initial: dict[tuple[int, int], list[BopEstimate]]
) -> list[np.ndarray | None]:
    """Per annotation of ``image``, the nearest-translation row of its object in ``initial`` (each row
    used once), or None when the file has no row left for it."""
    rows: dict[int, list[BopEstimate]] = {}
    for estimate in initial.get((image.scene_id, image.im_id), []):
        rows.setdefault(estimate.obj_id, []).append(estimate)
    poses = []
    for annotation in image.annotations:
        candidates = rows.get(annotation.obj_id, [])
        if not candidates:
            poses.append(None)
            continue
        distances = [np.linalg.norm(e.pose[:3, 3] - annotation.pose[:3, 3]) for e in candidates]
        poses.append(candidates.pop(int(np.argmin(distances))).pose)
    return poses


def perturbed_initial(
    image: BopImage, seed: int, rot_deg: float, trans_m: tuple[float, float, float]
) -> list:
    """Ground truth perturbed with the standard noise model, seeded by (seed, scene, image)."""
    from rnnpose_ros.core.synth import perturb_pose

    rng = np.random.default_rng([seed, image.scene_id, image.im_id])
    return [perturb_pose(a.pose, rng, rot_deg, trans_m) for a in image.annotations]


def evaluate_dataset(
    dataset: BopDataset,
    split: str,
    refiner,
    init_file: Path | None = None,
    seed: int = 0,
    rot_deg: float = 15.0,
    trans_m: tuple[float, float, float] = (0.01, 0.01, 0.05),
    max_images: int | None = None,
    progress: bool = True,
) -> BopEvaluation:
    """Refine every annotated instance of ``split`` and measure it (see the module docstring)."""
    from rnnpose_ros.core.observation import Observation
    from rnnpose_ros.core.refiner import Instance, RefineStatus
    from rnnpose_ros.tools.evaluate import InstanceOutcome

    initial: dict[tuple[int, int], list[BopEstimate]] = {}
    if init_file is not None:
        for estimate in read_results(init_file):
            initial.setdefault((estimate.scene_id, estimate.im_id), []).append(estimate)
    images = list(dataset.images(split))
    if max_images is not None:
        images = images[:max_images]
    if progress:
        from tqdm import tqdm

        images = tqdm(images, desc=f"BOP {split}", unit="image", file=sys.stderr)
    evaluation = BopEvaluation()
    for image in images:
        starts = (
            match_initial(image, initial)
            if init_file is not None
            else perturbed_initial(image, seed, rot_deg, trans_m)
        )
        kept = [(a, T0) for a, T0 in zip(image.annotations, starts, strict=True) if T0 is not None]
        if not kept:
            continue
        rgb = image.rgb()
        instances = [Instance(object_class_id(a.obj_id), T0, f"{a.obj_id}_{a.index}") for a, T0 in kept]
        start = time.perf_counter()
        refined = refiner.refine(Observation(rgb, image.K), instances)
        elapsed = time.perf_counter() - start
        evaluation.refine_seconds += elapsed
        for (annotation, T0), out in zip(kept, refined, strict=True):
            model = dataset.model(annotation.obj_id)
            final = out.pose if out.status is RefineStatus.OK else T0
            symmetries = symmetry_transforms(dataset.models_info[annotation.obj_id])
            evaluation.results.append(
                BopInstanceResult(
                    outcome=InstanceOutcome(
                        class_id=object_class_id(annotation.obj_id),
                        initial=metrics.passed(metrics.pose_errors(model, T0, annotation.pose, image.K)),
                        refined=metrics.passed(metrics.pose_errors(model, final, annotation.pose, image.K)),
                        status=out.status.value,
                        score=out.score,
                    ),
                    mssd_m=metrics.mssd(model.eval_points, final, annotation.pose, symmetries),
                    mspd_px=metrics.mspd(model.eval_points, final, annotation.pose, image.K, symmetries),
                    diameter_m=model.diameter,
                    image_width=rgb.shape[1],
                )
            )
            evaluation.estimates.append(
                BopEstimate(image.scene_id, image.im_id, annotation.obj_id, out.score, final, elapsed)
            )
    return evaluation


def bop_recalls(results: list[BopInstanceResult]) -> dict[str, float]:
    """AR_MSSD, AR_MSPD and their mean over ``results`` (BOP thresholds)."""
    if not results:
        return {"ar_mssd": 0.0, "ar_mspd": 0.0, "ar_mean": 0.0}
    mssd = np.mean([[r.mssd_m < t * r.diameter_m for t in MSSD_THRESHOLDS] for r in results])
    mspd = np.mean([[r.mspd_px < t * r.image_width / 640.0 for t in MSPD_THRESHOLDS_PX] for r in results])
    return {"ar_mssd": float(mssd), "ar_mspd": float(mspd), "ar_mean": float((mssd + mspd) / 2)}


def summarise(evaluation: BopEvaluation, rot_deg: float, trans_m: tuple[float, float, float]) -> dict:
    """The synthetic evaluation's summary (same keys) plus BOP recalls per object and overall."""
    from rnnpose_ros.tools.evaluate import LevelResult

    level = LevelResult(rot_deg=rot_deg, trans_m=trans_m, refine_seconds=evaluation.refine_seconds)
    level.outcomes = [r.outcome for r in evaluation.results]
    summary = level.summary()
    summary["bop"] = bop_recalls(evaluation.results)
    for class_id, entry in summary["per_object"].items():
        entry["bop"] = bop_recalls([r for r in evaluation.results if r.outcome.class_id == class_id])
    per_object = [entry["refined"] for entry in summary["per_object"].values()]
    summary["mean_over_objects"] = {
        name: float(np.mean([p[name] for p in per_object])) if per_object else 0.0
        for name in metrics.PASS_TESTS
    }
    return summary


def plot_summary(summary: dict, path: Path, backend: str) -> None:
    """Bar chart: per object, refined recall of each test and the BOP recalls (initial as outlines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objects = list(summary["per_object"])
    names = [*metrics.PASS_TESTS, "ar_mssd", "ar_mspd"]
    labels = [t.label for t in metrics.PASS_TESTS.values()] + ["AR_MSSD", "AR_MSPD"]
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(objects) * len(names) / 3), 4.2))
    width = 0.8 / len(names)
    for k, (name, label) in enumerate(zip(names, labels, strict=True)):
        xs = np.arange(len(objects)) + k * width
        entries = [summary["per_object"][o] for o in objects]
        refined = [e["bop"][name] if name.startswith("ar_") else e["refined"][name] for e in entries]
        ax.bar(xs, refined, width, label=label)
        if not name.startswith("ar_"):
            ax.bar(xs, [e["initial"][name] for e in entries], width, fill=False, edgecolor="k", linewidth=0.6)
    ax.set_xticks(np.arange(len(objects)) + 0.4 - width / 2, objects, rotation=20)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("recall")
    ax.set_title(f"{backend} refinement on BOP (outlines: initial poses)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_bop(args) -> int:
    """``evaluate --dataset bop``: ``args`` as parsed by evaluate.py."""
    import json

    from rnnpose_ros.core.render import Renderer
    from rnnpose_ros.data.bop import BopError, write_results
    from rnnpose_ros.tools.evaluate import EvaluationError, build_refiner, format_table

    try:
        dataset = BopDataset(args.root)
        refiner = build_refiner(args, dataset.registry(), Renderer())
        evaluation = evaluate_dataset(
            dataset,
            args.split,
            refiner,
            init_file=args.init,
            seed=args.seed,
            rot_deg=args.noise_rot,
            trans_m=args.noise_trans,
            max_images=args.max_images,
            progress=not args.no_progress,
        )
    except (BopError, EvaluationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarise(evaluation, args.noise_rot, args.noise_trans)
    print(format_table(summary, f"\nBOP {args.root} / {args.split} ({args.backend})"))
    bop = summary["bop"]
    print(f"AR_MSSD {bop['ar_mssd']:.3f}  AR_MSPD {bop['ar_mspd']:.3f}  mean {bop['ar_mean']:.3f}")
    if args.json is not None:
        record = dict(summary, backend=args.backend, root=str(args.root), split=args.split)
        record["init"] = str(args.init) if args.init else "perturbed ground truth"
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_summary(summary, args.plot, args.backend)
        print(f"wrote {args.plot}")
    if args.results_csv is not None:
        write_results(args.results_csv, evaluation.estimates)
        print(f"wrote {args.results_csv}")
    return 0
