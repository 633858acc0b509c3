"""Tracking evaluation on a synthetic sequence (``python -m rnnpose_ros.tools.evaluate --sequence``).

    python -m rnnpose_ros.tools.evaluate --sequence --frames 90 --detect-every 10 --seed 0 --json out.json

One sequence (:mod:`rnnpose_ros.core.sequence`: a swaying camera over the scene, 30 frames per
second, detections with the standard noise every ``--detect-every`` frames, in random order without
ids) goes through a :class:`~rnnpose_ros.core.tracker.Tracker` over the evaluation's refiner.

Reported (``"sequence"`` in the JSON):

- ``add_s``: fraction of frame-instances passing ADD(-S) < 0.1·d. A frame-instance is one object in
  one frame where it is at least ``detect_min_visible`` visible (a fully hidden object has no image
  evidence to be scored on); it passes when a live track of its class is assigned to it (Hungarian
  assignment on ADD(-S) among the frame's tracks) with ADD(-S) below the threshold;
- ``frames``; ``track_losses``: tracks lost over the sequence; ``false_track_frames``: live tracks,
  summed over frames, that no visible object was assigned to (e.g. a track coasting on an occluder);
- ``seconds_per_frame``: mean wall time of the tracker's update per frame (all tracks, including the
  full refinements that create or re-seed tracks);
- ``seconds_per_full_refinement``: mean wall time of a full refinement of all the frame's visible
  objects from the standard detection noise, on the frames midway between two detection frames
  (interleaved with tracking, so both run under the same load), and its ``full_refinement_add_s``.

``per_frame`` holds every frame's tracking time and per-object ADD(-S) / diameter (None when no track
was assigned) for plots and the demo GIF.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from rnnpose_ros.core import metrics


@dataclass
class SequenceResult:
    """Running figures of one evaluated sequence (see the module docstring)."""

    frames: int = 0
    passed: int = 0
    frame_instances: int = 0
    track_losses: int = 0
    false_track_frames: int = 0
    track_seconds: list[float] = field(default_factory=list)
    full_seconds: list[float] = field(default_factory=list)
    full_passed: int = 0
    full_instances: int = 0
    per_frame: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "add_s": self.passed / max(self.frame_instances, 1),
            "frames": self.frames,
            "frame_instances": self.frame_instances,
            "track_losses": self.track_losses,
            "false_track_frames": self.false_track_frames,
            "seconds_per_frame": float(np.mean(self.track_seconds)) if self.track_seconds else None,
            "seconds_per_full_refinement": float(np.mean(self.full_seconds)) if self.full_seconds else None,
            "full_refinement_add_s": self.full_passed / max(self.full_instances, 1),
            "per_frame": self.per_frame,
        }


def relative_errors(registry, frame, tracks) -> tuple[list[float | None], int]:
    """Per ground-truth instance of ``frame``: ADD(-S) / diameter of the track assigned to it (None when
    none is), and the number of tracks assigned to no visible instance.

    Tracks and instances are paired per class by minimum total ADD(-S) (Hungarian).
    """
    errors: list[float | None] = [None] * len(frame.instances)
    unassigned = 0
    for class_id in {t.class_id for t in tracks} | {i.class_id for i in frame.instances}:
        model = registry[class_id]
        rows = [k for k, inst in enumerate(frame.instances) if inst.class_id == class_id]
        mine = [t for t in tracks if t.class_id == class_id]
        if not mine:
            continue
        cost = np.array(
            [
                [
                    metrics.add_or_add_s(
                        model.eval_points, t.pose, frame.instances[k].pose_gt, model.symmetric
                    )
                    / model.diameter
                    for t in mine
                ]
                for k in rows
            ]
        ).reshape(len(rows), len(mine))
        r, c = linear_sum_assignment(cost)
        for a, b in zip(r, c, strict=True):
            errors[rows[a]] = float(cost[a, b])
        unassigned += len(mine) - len(r)
    return errors, unassigned


def evaluate_sequence(args: argparse.Namespace, registry, renderer, refiner) -> SequenceResult:
    """Track one sequence (``args.frames``, ``args.detect_every``, ``args.seed``, the scene options of
    ``args``) and score it."""
    from rnnpose_ros.core.refiner import Instance
    from rnnpose_ros.core.sequence import SequenceSpec, make_sequence
    from rnnpose_ros.core.synth import SceneSpec
    from rnnpose_ros.core.tracker import Seed, Tracker, TrackerConfig
    from rnnpose_ros.tools.evaluate import scene_models

    scene = SceneSpec(distance=(0.4, 0.8), rot_sigma_deg=args.noise_rot, trans_sigma=args.noise_trans)
    spec = SequenceSpec(
        frames=args.frames, detect_every=args.detect_every, occlusion=args.occlude, scene=scene
    )
    tracker = Tracker(refiner, TrackerConfig(outer_iterations=args.track_iterations))
    full_rng = np.random.default_rng(args.seed + 1)
    models = scene_models(args, registry, 0)
    threshold = metrics.ADD_S_FRACTION
    result = SequenceResult()
    frames = make_sequence(models, args.seed, renderer, spec)
    if not args.no_progress:
        from tqdm import tqdm

        frames = tqdm(frames, total=args.frames, desc="sequence", unit="frame", file=sys.stderr)
    warmed = False
    for frame in frames:
        if not warmed:  # per-object caches and first-call costs are not part of either timing
            first = frame.instances[0]
            refiner.refine(frame.observation, [Instance(first.class_id, first.pose_gt)])
            warmed = True
        seeds = [Seed(frame.instances[i].class_id, frame.instances[i].pose_init) for i in frame.detections]
        update = tracker.update(frame.observation, seeds)
        result.frames += 1
        result.track_seconds.append(update.seconds)
        result.track_losses += len(update.lost)
        errors, unassigned = relative_errors(registry, frame, update.tracks)
        result.false_track_frames += unassigned
        visible = [inst.visible_fraction >= spec.detect_min_visible for inst in frame.instances]
        for error, seen in zip(errors, visible, strict=True):
            if seen:
                result.frame_instances += 1
                result.passed += error is not None and error < threshold
        result.per_frame.append(
            {
                "frame": frame.index,
                "detections": len(frame.detections),
                "seconds": update.seconds,
                "relative_add_s": errors,
                "visible": visible,
                "tracks": [t.track_id for t in update.tracks],
                "lost": [t.track_id for t in update.lost],
            }
        )
        if frame.index % spec.detect_every == spec.detect_every // 2 and any(visible):
            _time_full(frame, visible, refiner, registry, scene, full_rng, result)
    return result


def _time_full(frame, visible, refiner, registry, scene, rng, result: SequenceResult) -> None:
    """One full refinement of the frame's visible objects from the standard noise, timed and scored."""
    from rnnpose_ros.core.refiner import Instance
    from rnnpose_ros.core.synth import perturb_pose

    truth = [inst for inst, seen in zip(frame.instances, visible, strict=True) if seen]
    instances = [
        Instance(
            inst.class_id,
            perturb_pose(inst.pose_gt, rng, scene.rot_sigma_deg, scene.trans_sigma, scene.max_angle_deg),
        )
        for inst in truth
    ]
    start = time.perf_counter()
    refined = refiner.refine(frame.observation, instances)
    result.full_seconds.append(time.perf_counter() - start)
    for inst, out in zip(truth, refined, strict=True):
        model = registry[inst.class_id]
        error = metrics.add_or_add_s(model.eval_points, out.pose, inst.pose_gt, model.symmetric)
        result.full_instances += 1
        result.full_passed += error < metrics.ADD_S_FRACTION * model.diameter


def format_summary(summary: dict) -> str:
    """Printable lines of a sequence summary."""
    full = summary["seconds_per_full_refinement"]
    per_frame = summary["seconds_per_frame"]
    ratio = f" ({per_frame / full:.0%} of a full refinement)" if full and per_frame is not None else ""
    return "\n".join(
        [
            f"sequence: {summary['frames']} frames, {summary['frame_instances']} visible frame-instances",
            f"  tracked ADD(-S)@0.1d     {summary['add_s']:.3f}",
            f"  track losses             {summary['track_losses']}",
            f"  false-track frames       {summary['false_track_frames']}",
            f"  s per frame (tracking)   {per_frame:.3f}{ratio}",
            f"  s per full refinement    {full if full is None else f'{full:.3f}'}"
            f"  (its ADD(-S)@0.1d {summary['full_refinement_add_s']:.3f})",
        ]
    )


def plot_sequence(summary: dict, path, occlusion: tuple[int, int] | None) -> None:
    """Per-frame figure: ADD(-S)/d of every object (top; threshold dashed, detection frames ticked,
    occlusion shaded) and tracking time per frame against a full refinement's (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = summary["per_frame"]
    index = [f["frame"] for f in frames]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.0, 4.6), sharex=True)
    for k in range(len(frames[0]["relative_add_s"])):
        errors = [np.nan if f["relative_add_s"][k] is None else f["relative_add_s"][k] for f in frames]
        top.plot(index, errors, "-", label=f"object {k}")
    top.axhline(metrics.ADD_S_FRACTION, color="k", ls="--", lw=0.8, label="0.1·d")
    for f in frames:
        if f["detections"]:
            top.axvline(f["frame"], color="tab:green", alpha=0.25, lw=1)
    for axis in (top, bottom):
        if occlusion:
            axis.axvspan(occlusion[0], occlusion[0] + occlusion[1] - 1, color="grey", alpha=0.2)
    top.set_ylabel("ADD(-S) / diameter")
    top.set_yscale("log")
    top.legend(loc="upper right", fontsize=7)
    top.set_title(
        f"tracked ADD(-S)@0.1d {summary['add_s']:.2f}, {summary['track_losses']} losses "
        "(green: detection frames, grey: occlusion)",
        fontsize=9,
    )
    bottom.plot(index, [f["seconds"] for f in frames], ".-", label="tracking (all tracks)")
    if summary["seconds_per_full_refinement"]:
        bottom.axhline(
            summary["seconds_per_full_refinement"], color="tab:red", ls="--", label="full refinement"
        )
    bottom.set_yscale("log")
    bottom.set_xlabel("frame (30 per second of motion)")
    bottom.set_ylabel("seconds")
    bottom.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """``evaluate --sequence``: run, print, write ``--json`` as ``{"sequence": {...}, ...}``."""
    import json

    from rnnpose_ros.core.objects import ObjectModelError
    from rnnpose_ros.core.synth import SceneError
    from rnnpose_ros.tools.evaluate import EvaluationError, scene_models, setup

    try:
        registry, renderer, refiner = setup(args)
        result = evaluate_sequence(args, registry, renderer, refiner)
    except (EvaluationError, ObjectModelError, SceneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = result.summary()
    print(format_summary(summary), flush=True)
    if args.json is not None:
        record = {
            "sequence": summary,
            "backend": args.backend,
            "seed": args.seed,
            "detect_every": args.detect_every,
            "track_iterations": args.track_iterations,
            "occlusion": list(args.occlude) if args.occlude else None,
            "classes": [m.class_id for m in scene_models(args, registry, 0)],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_sequence(summary, args.plot, args.occlude)
        print(f"wrote {args.plot}")
    return 0
