"""End-to-end demo: the real ``refine_node`` executable refines synthetic frames sent over real DDS.

    python -m rnnpose_ros.tools.demo [--frames N] [--seed S] [--backend classical|rnnpose]
                                     [--output demo_output] [--rate HZ] [--free-run] [--depth [16UC1|32FC1]]
    python -m rnnpose_ros.tools.demo --track [--frames 60] [--detect-every 10]   (see demo_track.py)

What runs:
  * ``refine_node --ros-args --params-file config/refine.yaml -p backend:=...`` as a child process
    (the installed console script next to this Python, else on PATH, else ``python -m
    rnnpose_ros.ros.node``), its log in ``<output>/refine_node.log``;
  * in this process, the :class:`~rnnpose_ros.ros.scene_player.ScenePlayer` (pybullet's textured duck
    over real photographs, noisy detector poses, matching camera_info) and a collector of the node's
    ``~/debug_image`` and ``/diagnostics``.

It prints each frame's initial (detector) vs refined error, then an ADD(-S)@0.1d / 5cm5° / 2D-proj-5px
table and the latency (frame published → refined detections received, so DDS transport is included),
and writes the node's debug overlays (white = detector pose, red = refined) as PNGs, an animated GIF and
``summary.json`` under ``--output``. By default each frame waits for its answer (accuracy, no drops);
``--free-run`` publishes at ``--rate`` regardless and shows the node's drop-oldest policy.

``--depth`` plays the same frames twice (same seed, so the same scenes and detector noise): once to
the node RGB-only, once with the scene player publishing the registered depth image (``16UC1``
millimetres by default, or ``32FC1`` metres) and the node started with ``use_depth:=true``; each run
writes its own ``rgb/`` and ``rgbd/`` folder under ``--output``, and the demo prints the two side by
side (also the stricter ADD(-S)@0.02d and @0.05d, and the time per frame) and writes
``comparison.json``.

DDS safety: before anything imports rclpy the demo restricts discovery to this machine
(``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, the project's Fast DDS profile: shared memory + UDP on
127.0.0.1) and picks a random ``ROS_DOMAIN_ID`` in 100–199 unless one is set; the child inherits it.
The child is stopped on exit, Ctrl-C or SIGTERM (SIGINT, then SIGTERM, then SIGKILL) and dies with the
demo even if the demo is killed (``PR_SET_PDEATHSIG``); Fast DDS shared-memory files left by a child
that had to be killed are removed when no process uses them.

Exit status: 0 on success, 1 when the node never answers (or exits early), 2 for unusable arguments
(e.g. ``--backend rnnpose`` without weights in objects.yaml), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rnnpose_ros.core import metrics
from rnnpose_ros.core.backends import BACKENDS, backend_help
from rnnpose_ros.tools.node_process import (
    NODE_NAME,
    NodeProcess,
    NodeProcessError,
    config_file,
    dds_safe_environment,
    node_command,
    ros_context,
    signals_as_keyboard_interrupt,
)

if TYPE_CHECKING:  # the scene player imports rclpy, which must wait for the DDS environment
    from rnnpose_ros.ros.scene_player import InstanceScore

RESULT_TOPIC = f"/{NODE_NAME}/detections"
DEBUG_TOPIC = f"/{NODE_NAME}/debug_image"
STARTUP_TIMEOUT_S = 180.0
# After the first answer everything is warm; a frame that takes longer than this is counted unanswered.
RESULT_TIMEOUT_S = 120.0
# Seconds granted for the last debug image / diagnostics after the last answer.
GRACE_S = 2.0
GIF_SCALE = 0.5  # the GIF is half the image size
GIF_FRAME_S = 1.0
#: The rows of the demo's table and the keys of its summary: these tests of
#: :data:`rnnpose_ros.core.metrics.PASS_TESTS`, by tag, in this order.
DEMO_TESTS = ("add_s", "cm5_deg5", "proj_5px")
#: Stricter ADD(-S) thresholds (fractions of the diameter) of the RGB vs RGB-D comparison: with depth,
#: 0.1·d is no longer the interesting threshold.
STRICT_ADD_FRACTIONS = (0.02, 0.05)
DEPTH_ENCODINGS = ("16UC1", "32FC1")


class DemoError(RuntimeError):
    """The demo cannot run or the node did not answer (the message says what to check)."""


def objects_without_weights(objects_file: Path, class_ids: Sequence[str]) -> list[str]:
    """The class ids among ``class_ids`` whose entry in the registry YAML has no ``weights`` file."""
    import yaml

    entries = (yaml.safe_load(objects_file.read_text()) or {}).get("objects") or {}
    return [c for c in class_ids if not (entries.get(c) or {}).get("weights")]


# ---------------------------------------------------------------- results


@dataclass
class Rates:
    """Share of instances passing each test, initial (detector) and refined."""

    initial: float
    refined: float


def pass_rates(scores: Sequence[InstanceScore]) -> dict[str, Rates]:
    """Share of ``scores`` passing each test of :data:`DEMO_TESTS`, by the test's tag (an instance
    without a refined pose fails the refined test); empty without scores."""
    if not scores:
        return {}
    initial = [metrics.passed(s.initial) for s in scores]
    refined = [None if s.refined is None else metrics.passed(s.refined) for s in scores]
    return {
        metrics.PASS_TESTS[name].tag: Rates(
            initial=float(np.mean([p[name] for p in initial])),
            refined=float(np.mean([p is not None and p[name] for p in refined])),
        )
        for name in DEMO_TESTS
    }


def strict_add_rates(scores: Sequence[InstanceScore]) -> dict[str, Rates]:
    """Share of ``scores`` whose ADD(-S) is below each of :data:`STRICT_ADD_FRACTIONS` of the diameter,
    initial and refined (an instance without a refined pose fails), by label ("ADD(-S)@0.02d")."""
    if not scores:
        return {}
    return {
        f"ADD(-S)@{fraction:g}d": Rates(
            initial=float(np.mean([s.initial.add_fraction < fraction for s in scores])),
            refined=float(
                np.mean([s.refined is not None and s.refined.add_fraction < fraction for s in scores])
            ),
        )
        for fraction in STRICT_ADD_FRACTIONS
    }


def caption(image: np.ndarray, text: Sequence[str]) -> np.ndarray:
    """(H + h, W, 3) uint8: ``image`` below a black strip holding one line of ``text`` each."""
    import cv2

    line_height = 18
    strip = np.zeros((line_height * len(text) + 6, image.shape[1], 3), np.uint8)
    for row, line in enumerate(text):
        cv2.putText(
            strip,
            line,
            (6, line_height * (row + 1)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
    return np.concatenate([strip, image], axis=0)


def frame_caption(index: int, scores: Sequence[InstanceScore], latency_s: float | None) -> list[str]:
    """The lines above a frame's overlay: each object's initial → refined ADD(-S), then the legend."""
    lines = []
    for s in scores:
        refined = "not refined" if s.refined is None else f"{s.refined.add_m * 1000:.1f} mm"
        name = metrics.add_name(s.symmetric)
        lines.append(
            f"frame {index} {s.instance_id}: {name} {s.initial.add_m * 1000:.1f} mm -> {refined}, "
            f"score {s.score:.2f}"
        )
    lines.append(
        "white: detector pose   red: refined" + ("" if latency_s is None else f"   {latency_s:.2f} s")
    )
    return lines


def format_table(rates: dict[str, Rates], count: int) -> str:
    lines = [f"{'metric (' + str(count) + ' instances)':<28} {'initial':>8} {'refined':>8}"]
    for name, rate in rates.items():
        lines.append(f"{name:<28} {rate.initial * 100:7.1f}% {rate.refined * 100:7.1f}%")
    return "\n".join(lines)


def latency_summary(latencies: Sequence[float]) -> dict[str, float | None]:
    """Mean / mean without the first (warm-up) frame / median / max, milliseconds."""
    ms = [1000.0 * s for s in latencies]
    return {
        "mean": float(np.mean(ms)) if ms else None,
        "mean_after_first": float(np.mean(ms[1:])) if len(ms) > 1 else None,
        "median": float(np.median(ms)) if ms else None,
        "max": float(np.max(ms)) if ms else None,
    }


# ---------------------------------------------------------------- the run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rnnpose_ros.tools.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--frames", type=int, default=None, help="frames to play (default 12; --track 60)")
    parser.add_argument("--seed", type=int, default=0, help="scene and detector-noise seed (default 0)")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default="classical", help=backend_help())
    parser.add_argument("--output", type=Path, default=Path("demo_output"), help="folder for images/summary")
    parser.add_argument("--rate", type=float, default=2.0, help="most frames per second (default 2)")
    parser.add_argument(
        "--free-run", action="store_true", help="do not wait for each answer: show the node's drop policy"
    )
    parser.add_argument(
        "--node-param",
        action="append",
        default=[],
        metavar="NAME:=VALUE",
        help="extra refine_node parameter (repeatable), e.g. outer_iterations:=4",
    )
    parser.add_argument(
        "--depth",
        nargs="?",
        const=DEPTH_ENCODINGS[0],
        choices=DEPTH_ENCODINGS,
        help="play the frames twice, RGB-only and with registered depth in this encoding (default "
        f"{DEPTH_ENCODINGS[0]}: millimetres; 32FC1: metres), and compare",
    )
    parser.add_argument("--objects", nargs="+", default=["duck"], help="class ids in every scene")
    parser.add_argument(
        "--result-timeout",
        type=float,
        default=RESULT_TIMEOUT_S,
        help="seconds a frame may wait for its answer",
    )
    parser.add_argument(
        "--track",
        action="store_true",
        help="run the node in mode track on a synthetic sequence (rnnpose_ros.tools.demo_track)",
    )
    parser.add_argument("--detect-every", type=int, default=10, help="--track: detections every Nth frame")
    args = parser.parse_args(argv)
    if args.frames is None:
        args.frames = 60 if args.track else 12
    if args.detect_every < 1:
        parser.error("--detect-every must be >= 1")
    if args.track and args.depth is not None:
        parser.error("--track plays one RGB sequence; --depth compares RGB with RGB-D in detect mode")
    if args.frames < 1:
        parser.error("--frames must be >= 1")
    if args.rate <= 0:
        parser.error("--rate must be > 0")
    if any(":=" not in p for p in args.node_param):
        parser.error("--node-param takes NAME:=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Before rclpy is imported anywhere in this process: the environment decides the DDS transport.
        os.environ.update(dds_safe_environment(dict(os.environ)))
        args.objects_file = config_file("objects.yaml")
        params_file = config_file("refine.yaml")
    except NodeProcessError as error:
        print(f"[demo] FAILED: {error}", file=sys.stderr)
        return 1
    needs_weights = BACKENDS[args.backend].needs_weights
    if needs_weights and (missing := objects_without_weights(args.objects_file, args.objects)):
        print(
            f"[demo] --backend {args.backend} needs learned weights, but {args.objects_file} gives none for "
            f"{', '.join(missing)} (set 'weights:' there), or use --backend classical",
            file=sys.stderr,
        )
        return 2
    print(
        f"[demo] ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}, discovery LOCALHOST, Fast DDS profile "
        f"{os.environ['FASTDDS_DEFAULT_PROFILES_FILE']}"
    )
    if args.depth is None:
        return _play(args, params_file)[0]
    # The same seed twice: the same scenes and detector noise, compared instance by instance.
    runs = {}
    for label, folder, encoding in (("RGB", "rgb", None), ("RGB-D", "rgbd", args.depth)):
        run = argparse.Namespace(**vars(args))
        run.output, run.depth = args.output / folder, encoding
        if encoding is not None:
            run.node_param = [*args.node_param, "use_depth:=true"]
        print(f"\n[demo] ===== {label} run: {run.output}/")
        code, results = _play(run, params_file)
        if code or results is None:
            return code or 1
        runs[label] = results
    _compare(args, runs)
    return 0


def _play(args: argparse.Namespace, params_file: Path) -> tuple[int, RunResults | None]:
    """Start the node, play the frames, report: (exit status, the run's figures or None)."""
    args.output.mkdir(parents=True, exist_ok=True)
    for stale in [*args.output.glob("frame_*.png"), args.output / "demo.gif", args.output / "track.gif"]:
        stale.unlink(missing_ok=True)
    node_params = [*args.node_param, "mode:=track"] if args.track else args.node_param
    command = node_command(params_file, args.objects_file, args.backend, node_params)
    print(f"[demo] starting: {' '.join(command)}  (log: {args.output / 'refine_node.log'})")
    # Ctrl-C, SIGTERM and a closed terminal all stop the demo through the same clean-up.
    with signals_as_keyboard_interrupt():
        node = NodeProcess(command, dict(os.environ), args.output / "refine_node.log")
        try:
            if args.track:
                from rnnpose_ros.tools.demo_track import run as run_track

                return run_track(args, node), None
            return _run(args, node)
        except KeyboardInterrupt:
            print("\n[demo] interrupted")
            return 130, None
        except DemoError as error:
            print(f"[demo] FAILED: {error}", file=sys.stderr)
            return 1, None
        finally:
            print(f"[demo] {node.stop_and_clean()}")


def _compare(args: argparse.Namespace, runs: dict[str, RunResults]) -> None:
    """Print the RGB and RGB-D runs side by side and write ``comparison.json`` under ``--output``."""
    rgb, rgbd = runs["RGB"], runs["RGB-D"]
    print(
        f"\n[demo] RGB vs RGB-D, the same {rgb.instances} instances (seed {args.seed}, depth {args.depth}):"
    )
    print(f"{'metric':<28} {'initial':>8} {'RGB':>8} {'RGB-D':>8}")
    for name in [*rgb.rates, *rgb.strict_add]:
        a, b = (rgb.rates | rgb.strict_add)[name], (rgbd.rates | rgbd.strict_add)[name]
        print(f"{name:<28} {a.initial * 100:7.1f}% {a.refined * 100:7.1f}% {b.refined * 100:7.1f}%")
    if rgb.mean_add_mm["refined"] is not None and rgbd.mean_add_mm["refined"] is not None:
        print(
            f"{'mean ADD(-S) (mm)':<28} {rgb.mean_add_mm['initial']:8.1f} {rgb.mean_add_mm['refined']:8.1f} "
            f"{rgbd.mean_add_mm['refined']:8.1f}"
        )
    times = [r.latency_ms["mean_after_first"] or r.latency_ms["mean"] for r in (rgb, rgbd)]
    if None not in times:
        print(
            f"{'latency per frame (ms)':<28} {'':>8} {times[0]:8.0f} {times[1]:8.0f}   "
            f"(RGB-D / RGB = {times[1] / times[0]:.2f}; warm-up frame excluded)"
        )
    comparison = {
        "seed": args.seed,
        "frames": args.frames,
        "depth_encoding": args.depth,
        "runs": {
            label: {
                "instances": r.instances,
                "metrics": {name: asdict(rate) for name, rate in (r.rates | r.strict_add).items()},
                "mean_add_mm": r.mean_add_mm,
                "latency_ms": r.latency_ms,
            }
            for label, r in runs.items()
        },
    }
    (args.output / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    print(f"[demo] wrote {args.output / 'comparison.json'}")


def _run(args: argparse.Namespace, node: NodeProcess) -> tuple[int, RunResults | None]:
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from rnnpose_ros.ros.scene_player import describe, score_frame

    with ros_context() as context:
        overrides = [
            Parameter("frames", value=args.frames),
            Parameter("seed", value=args.seed),
            Parameter("rate", value=float(args.rate)),
            Parameter("wait_for_result", value=not args.free_run),
            Parameter("result_timeout", value=float(args.result_timeout)),
            Parameter("result_topic", value=RESULT_TOPIC),
            Parameter("objects", value=list(args.objects)),
            Parameter("objects_file", value=str(args.objects_file)),
            Parameter("autostart", value=False),
            Parameter("depth_encoding", value=args.depth or "none"),
        ]
        player = _scene_player(context, overrides)
        collector, outputs = _collector(context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(player)
        executor.add_node(collector)
        printed: set[int] = set()

        def on_answered(frame: Any) -> None:
            printed.add(frame.index)
            print(describe(frame, score_frame(frame, player.registry)), flush=True)

        player.on_answered.append(on_answered)
        try:
            _wait_for_node(executor, player, collector, node)
            player.start()
            print(
                f"[demo] node ready; playing {args.frames} frames "
                f"({'free-running' if args.free_run else 'one at a time'}, at most {args.rate:g} Hz)"
            )
            interrupted = False
            try:
                while not player.finished:
                    executor.spin_once(timeout_sec=0.05)
                    if node.exit_code is not None:
                        raise DemoError(f"refine_node exited with {node.exit_code}:\n{node.log_tail()}")
                    first = player.frames[0] if player.frames else None
                    if (
                        first is not None
                        and not any(f.result is not None for f in player.frames)
                        and time.monotonic() - first.published_at > args.result_timeout
                    ):
                        raise DemoError(
                            f"refine_node did not answer the first frame within {args.result_timeout:g} s:\n"
                            f"{node.log_tail()}"
                        )
                _await_last(executor, outputs, [f.stamp_ns for f in player.frames if f.result is not None])
            except KeyboardInterrupt:
                interrupted = True
                print("\n[demo] interrupted: results of the frames answered so far")
            for frame in player.frames:
                if frame.index not in printed:
                    print(describe(frame, []) + (" (dropped by the node)" if args.free_run else ""))
            if interrupted:
                answered = any(f.result is not None for f in player.frames)
                return 130, _report(args, player, outputs, node) if answered else None
            return 0, _report(args, player, outputs, node)
        finally:
            executor.shutdown()
            player.destroy_node()
            collector.destroy_node()


def _scene_player(context: Any, overrides: list[Any]) -> Any:
    from rnnpose_ros.ros.scene_player import ScenePlayer

    return ScenePlayer(context=context, parameter_overrides=overrides)


def _wait_for_node(executor: Any, player: Any, collector: Any, node: NodeProcess) -> None:
    """Spin until the node subscribes to the player and publishes what the collector listens to."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (player.refiner_subscribed and collector.count_publishers(DEBUG_TOPIC) > 0):
        executor.spin_once(timeout_sec=0.1)
        if node.exit_code is not None:
            raise DemoError(
                f"refine_node exited with {node.exit_code} before it was ready:\n{node.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise DemoError(
                f"refine_node did not subscribe within {STARTUP_TIMEOUT_S:.0f} s:\n{node.log_tail()}"
            )
    # Discovery is symmetric but not simultaneous: give the node a moment to see our subscriptions too
    # (it draws the debug image only while it knows a subscriber).
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        executor.spin_once(timeout_sec=0.05)
    refiners = [n for n, _ns in collector.get_node_names_and_namespaces() if n == NODE_NAME]
    if len(refiners) > 1:
        raise DemoError(
            f"{len(refiners)} {NODE_NAME} nodes answer on ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']} "
            "(another run shares this domain): unset ROS_DOMAIN_ID for a random one, or set a free one"
        )


@dataclass
class Outputs:
    """What the demo's collector node received from the refiner besides the detections."""

    debug_images: dict[int, np.ndarray]  # stamp (ns) -> (H, W, 3) uint8 RGB overlay
    diagnostics: dict[str, str]  # the last /diagnostics status of the refiner (key -> value)
    diagnostics_count: int = 0


def _collector(context: Any) -> tuple[Any, Outputs]:
    """A node subscribed to the refiner's ``~/debug_image`` and ``/diagnostics``, and what it collects."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image

    from rnnpose_ros.ros.conversions import image_to_rgb, stamp_nanoseconds

    outputs = Outputs(debug_images={}, diagnostics={})

    def on_debug(msg: Image) -> None:
        outputs.debug_images[stamp_nanoseconds(msg.header.stamp)] = image_to_rgb(msg)

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(NODE_NAME):
                outputs.diagnostics = {kv.key: kv.value for kv in status.values}
                outputs.diagnostics["message"] = status.message
                outputs.diagnostics_count += 1

    node = rclpy.create_node("demo_collector", context=context)
    node.create_subscription(Image, DEBUG_TOPIC, on_debug, 10)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    return node, outputs


def _await_last(executor: Any, outputs: Outputs, stamps: Sequence[int]) -> None:
    """Spin until every answered frame's debug image and one more diagnostics message came (or GRACE_S)."""
    count = outputs.diagnostics_count
    end = time.monotonic() + GRACE_S
    while time.monotonic() < end and not (
        all(s in outputs.debug_images for s in stamps) and outputs.diagnostics_count > count
    ):
        executor.spin_once(timeout_sec=0.05)


def _overlay(frame: Any, outputs: Outputs, registry: Any) -> tuple[np.ndarray, str] | None:
    """The frame's overlay and who drew it: the node's ``~/debug_image`` ("node"), else — when the node
    had not yet seen our subscription — the same drawing made here from its answer ("demo")."""
    from rnnpose_ros.ros.conversions import ConversionError, OverlayObject, overlay_image, pose_to_matrix

    image = outputs.debug_images.get(frame.stamp_ns)
    if image is not None:
        return image, "node"
    if frame.result is None:
        return None
    objects = []
    for truth, detection in zip(frame.scene.instances, frame.result.detections, strict=False):
        model = registry[truth.class_id]
        try:
            refined = pose_to_matrix(detection.results[0].pose.pose)[0] if detection.results else None
        except ConversionError:
            refined = None
        objects.append(OverlayObject(model.vertices, model.faces, truth.pose_init, refined))
    return overlay_image(frame.scene.image, frame.scene.K, objects), "demo"


@dataclass
class FrameReport:
    """One played frame as the report shows it.

    Attributes:
        record: its entry in ``summary.json``'s ``frames``.
        scores: its objects' errors (empty when unanswered).
        image: (H + h, W, 3) uint8 captioned overlay, or None when there is nothing to draw.
    """

    record: dict[str, Any]
    scores: list[InstanceScore]
    image: np.ndarray | None


@dataclass
class RunResults:
    """The figures the demo prints and records for the whole run.

    Attributes:
        frames_published, frames_answered: frame counts.
        instances: scored objects (of answered frames).
        rates: pass rates by test tag (:func:`pass_rates`).
        strict_add: pass rates at the stricter ADD(-S) thresholds (:func:`strict_add_rates`).
        mean_add_mm: mean ADD(-S) of the "initial" and of the "refined" poses, millimetres (None
            without such poses).
        latency_ms: :func:`latency_summary` of the answered frames.
    """

    frames_published: int
    frames_answered: int
    instances: int
    rates: dict[str, Rates]
    strict_add: dict[str, Rates]
    mean_add_mm: dict[str, float | None]
    latency_ms: dict[str, float | None]


def _report(args: argparse.Namespace, player: Any, outputs: Outputs, node: NodeProcess) -> RunResults:
    """Score every frame, write the overlays and ``summary.json``, print the results; returns the figures.

    Raises:
        DemoError: the node answered no frame.
    """
    reports = [_frame_report(frame, outputs, player.registry) for frame in player.frames]
    pngs, gif = _write_images(args.output, reports)
    results = _results(player.frames, reports)
    _print_results(results, outputs.diagnostics)
    files = {"png": [p.name for p in pngs], "gif": None if gif is None else gif.name}
    summary = _summary(args, node, results, outputs, reports, files)
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"[demo] wrote {len(pngs)} overlays, {'no GIF' if gif is None else gif.name} and summary.json to "
        f"{args.output}/"
    )
    if not results.frames_answered:
        raise DemoError(f"refine_node never answered ({len(player.frames)} frames sent):\n{node.log_tail()}")
    return results


def _frame_report(frame: Any, outputs: Outputs, registry: Any) -> FrameReport:
    """The scores, summary entry and captioned overlay of one played frame."""
    from rnnpose_ros.ros.scene_player import score_frame

    scores = score_frame(frame, registry)
    record = {
        "frame": frame.index,
        "stamp_ns": frame.stamp_ns,
        "background": frame.scene.background,
        "answered": frame.result is not None,
        "latency_ms": None if frame.latency_s is None else 1000.0 * frame.latency_s,
        "instances": [_instance_record(s) for s in scores],
    }
    overlay = _overlay(frame, outputs, registry)
    if overlay is None:
        return FrameReport(record, scores, None)
    image, drawn_by = overlay
    record["overlay_from"] = drawn_by
    return FrameReport(record, scores, caption(image, frame_caption(frame.index, scores, frame.latency_s)))


def _write_images(output: Path, reports: Sequence[FrameReport]) -> tuple[list[Path], Path | None]:
    """Each captioned overlay as ``frame_<index>.png``, all of them (scaled by GIF_SCALE) as
    ``demo.gif``; returns the PNG paths and the GIF's (None without overlays)."""
    import cv2
    import imageio.v2 as imageio

    pngs, small = [], []
    for report in reports:
        if report.image is None:
            continue
        path = output / f"frame_{report.record['frame']:03d}.png"
        imageio.imwrite(path, report.image)
        pngs.append(path)
        size = (round(report.image.shape[1] * GIF_SCALE), round(report.image.shape[0] * GIF_SCALE))
        small.append(cv2.resize(report.image, size, interpolation=cv2.INTER_AREA))
    if not small:
        return pngs, None
    gif = output / "demo.gif"
    imageio.mimsave(gif, small, duration=GIF_FRAME_S, loop=0)
    return pngs, gif


def _results(frames: Sequence[Any], reports: Sequence[FrameReport]) -> RunResults:
    """The run's figures from the played frames and their reports."""
    scores = [s for report in reports for s in report.scores]
    answered = [f for f in frames if f.result is not None]
    return RunResults(
        frames_published=len(frames),
        frames_answered=len(answered),
        instances=len(scores),
        rates=pass_rates(scores),
        strict_add=strict_add_rates(scores),
        mean_add_mm=mean_add_mm(scores),
        latency_ms=latency_summary([f.latency_s for f in answered]),
    )


def mean_add_mm(scores: Sequence[InstanceScore]) -> dict[str, float | None]:
    """Mean ADD(-S) of the initial poses and of the refined ones (those that exist), millimetres."""
    refined = [s.refined.add_m for s in scores if s.refined is not None]
    return {
        "initial": float(np.mean([s.initial.add_m for s in scores])) * 1000 if scores else None,
        "refined": float(np.mean(refined)) * 1000 if refined else None,
    }


def _print_results(results: RunResults, diagnostics: dict[str, str]) -> None:
    """The pass-rate table, mean ADD(-S), latency and frame counts."""
    print()
    if results.rates:
        print(format_table(results.rates, results.instances))
    else:
        print("[demo] no frame was answered: no table")
    mean_add = results.mean_add_mm
    if mean_add["refined"] is not None:
        print(f"{'mean ADD(-S) (mm)':<28} {mean_add['initial']:8.1f} {mean_add['refined']:8.1f}")
    latency = results.latency_ms
    if latency["mean"] is not None:
        after = latency["mean_after_first"]
        print(
            f"latency (publish -> refined detections): mean {latency['mean']:.0f} ms"
            + (f", {after:.0f} ms without the first (warm-up) frame" if after is not None else "")
            + f", max {latency['max']:.0f} ms over {results.frames_answered} frames"
        )
    unanswered = results.frames_published - results.frames_answered
    print(
        f"frames: {results.frames_published} published, {results.frames_answered} answered, "
        f"{unanswered} unanswered"
        + (f" (node: {diagnostics.get('frames_dropped', '?')} dropped)" if diagnostics else "")
    )
    if "frames_with_depth" in diagnostics:
        print(
            f"depth: the node refined {diagnostics['frames_with_depth']} frames with depth, "
            f"{diagnostics['frames_without_depth']} without"
        )


def _summary(
    args: argparse.Namespace,
    node: NodeProcess,
    results: RunResults,
    outputs: Outputs,
    reports: Sequence[FrameReport],
    files: dict[str, Any],
) -> dict[str, Any]:
    """The content of ``summary.json``; ``files`` names the overlays written (``png``, ``gif``)."""
    return {
        "backend": args.backend,
        "seed": args.seed,
        "objects": list(args.objects),
        "wait_for_result": not args.free_run,
        "depth_encoding": args.depth,
        "rate_hz": args.rate,
        "ros_domain_id": int(os.environ["ROS_DOMAIN_ID"]),
        "node_command": node.command,
        "frames_requested": args.frames,
        "frames_published": results.frames_published,
        "frames_answered": results.frames_answered,
        "frames_unanswered": results.frames_published - results.frames_answered,
        "instances": results.instances,
        "metrics": {name: asdict(rate) for name, rate in results.rates.items()},
        "metrics_strict_add": {name: asdict(rate) for name, rate in results.strict_add.items()},
        "mean_add_mm": results.mean_add_mm,
        "latency_ms": results.latency_ms,
        "node_diagnostics": outputs.diagnostics,
        "frames": [report.record for report in reports],
        "files": files,
    }


def _instance_record(score: InstanceScore) -> dict[str, Any]:
    """One object's entry in ``summary.json``."""
    return {
        "class_id": score.class_id,
        "instance_id": score.instance_id,
        "score": score.score,
        "initial": _errors_record(score.initial),
        "refined": None if score.refined is None else _errors_record(score.refined),
    }


def _errors_record(errors: metrics.PoseErrors) -> dict[str, float]:
    """The errors of one pose in ``summary.json``: metres, fraction of the diameter, degrees, pixels."""
    return {
        "add_m": errors.add_m,
        "add_fraction": errors.add_fraction,
        "rotation_deg": errors.rotation_deg,
        "translation_m": errors.translation_m,
        "projection_px": errors.projection_px,
    }


if __name__ == "__main__":
    sys.exit(main())
