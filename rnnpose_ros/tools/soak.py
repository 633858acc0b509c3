"""Soak test: the real ``refine_node`` under a steady stream of valid frames for minutes or hours.

    python -m rnnpose_ros.tools.soak --minutes 30 --rate 30 --detections 4 [--json soak.json]

Publishes synthetic frames (pybullet's duck, ``--detections`` instances per frame, noisy detector
poses, a handful of scenes cycled with fresh stamps) at ``--rate`` Hz to the node started as a child
process (DDS-safe, see :mod:`~rnnpose_ros.tools.node_process`) and samples, every ``--sample-period``
seconds, the node's resident memory (``/proc/<pid>/status``), frames answered (received here) and
frames dropped (the node's ``/diagnostics``), and the latency from publishing a frame to receiving its
answer. It prints one table row per sample and a summary: memory at the start (after the first answer)
and at the end, frames published / answered / dropped, latency percentiles.

Exit status: 0 when memory stayed bounded, 1 on growth beyond ``--max-growth-mb`` between the first and
the last quarter of the run (medians, after the first minute), when the node exits, or when frames go
unaccounted for (published ≠ answered + dropped + in flight); 130 on Ctrl-C.

Machine load changes the latency and drop figures (not the memory ones): measure on an otherwise idle
machine, with passive OpenMP waiting (``OMP_WAIT_POLICY=PASSIVE``, which the tool sets for the node).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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

RESULT_TOPIC = f"/{NODE_NAME}/detections"
FRAME_ID = "camera_color_optical_frame"
SCENES = 6
STARTUP_TIMEOUT_S = 180.0
TABLE_COLUMNS = (("min", 6), ("RSS MB", 8), ("published", 10), ("answered", 9), ("dropped", 8),
                 ("lat p50", 8), ("lat max", 8))  # fmt: skip
WARM_UP_S = 60.0  # memory samples of the first minute are not compared (caches, allocator growth)


class SoakError(RuntimeError):
    """The soak could not run (the node exited or never answered)."""


@dataclass
class Sample:
    """One row of the table: time since the first answer (s), node RSS (MB), counters since start,
    latency percentiles (s) of the answers received since the previous sample (None: none received)."""

    elapsed_s: float
    rss_mb: float
    published: int
    answered: int
    dropped: int
    latency_p50_s: float | None
    latency_max_s: float | None


@dataclass
class SoakResult:
    """The summary written with ``--json``."""

    minutes: float
    rate_hz: float
    detections: int
    backend: str
    published: int
    answered: int
    dropped: int
    in_flight: int
    rss_start_mb: float
    rss_end_mb: float
    rss_growth_mb: float
    latency_s: dict[str, float | None]
    passed: bool
    verdict: str
    samples: list[Sample] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="duration after the first answer")
    parser.add_argument("--rate", type=float, default=30.0, help="frames published per second")
    parser.add_argument("--detections", type=int, default=4, help="duck detections per frame")
    parser.add_argument("--backend", default="classical", help="node parameter backend")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")
    parser.add_argument("--sample-period", type=float, default=10.0, help="seconds between table rows")
    parser.add_argument("--max-growth-mb", type=float, default=100.0, help="allowed RSS growth (MB)")
    parser.add_argument("--node-param", action="append", default=[], metavar="NAME:=VALUE")
    parser.add_argument("--log", type=Path, default=Path("soak_refine_node.log"), help="the node's log")
    parser.add_argument("--json", type=Path, help="write the summary (and every sample) here")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.detections < 1:
        parser.error("--minutes and --rate must be > 0 and --detections >= 1")
    return args


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 / max of ``values`` (None each when empty)."""
    if not len(values):
        return {"p50": None, "p90": None, "p99": None, "max": None}
    array = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(array, 50)),
        "p90": float(np.percentile(array, 90)),
        "p99": float(np.percentile(array, 99)),
        "max": float(array.max()),
    }


def memory_growth(samples: Sequence[Sample]) -> tuple[float, float, float]:
    """(start, end, growth) in MB: medians of the first and last quarter of the samples taken after the
    first ``WARM_UP_S`` (all samples when the run is shorter)."""
    settled = [s.rss_mb for s in samples if s.elapsed_s >= WARM_UP_S] or [s.rss_mb for s in samples]
    quarter = max(1, len(settled) // 4)
    start, end = float(np.median(settled[:quarter])), float(np.median(settled[-quarter:]))
    return start, end, end - start


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        os.environ.update(dds_safe_environment(dict(os.environ)))
        command = node_command(
            config_file("refine.yaml"), config_file("objects.yaml"), args.backend, args.node_param
        )
    except NodeProcessError as error:
        print(f"[soak] FAILED: {error}", file=sys.stderr)
        return 1
    print(
        f"[soak] ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}; starting: {' '.join(command)} (log: {args.log})"
    )
    with signals_as_keyboard_interrupt():
        node = NodeProcess(command, dict(os.environ) | {"OMP_WAIT_POLICY": "PASSIVE"}, args.log)
        try:
            result = _soak(args, node)
        except KeyboardInterrupt:
            print("\n[soak] interrupted")
            return 130
        except SoakError as error:
            print(f"[soak] FAILED: {error}", file=sys.stderr)
            return 1
        finally:
            print(f"[soak] {node.stop_and_clean()}")
    print(_summary_text(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
        print(f"[soak] wrote {args.json}")
    return 0 if result.passed else 1


def _scenes(detections: int, seed: int) -> tuple[Any, list[Any]]:
    """The object registry and ``SCENES`` scenes of ``detections`` ducks each."""
    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.render import Renderer
    from rnnpose_ros.core.synth import SceneSpec, make_scene

    registry = ObjectRegistry.from_yaml(config_file("objects.yaml"))
    renderer = Renderer()
    spec = SceneSpec(min_visible=0.3)
    scenes = [make_scene([registry["duck"]] * detections, seed + i, renderer, spec) for i in range(SCENES)]
    renderer.close()
    return registry, scenes


class _Traffic:
    """The publishing camera + detector, and what comes back (one rclpy node in this process)."""

    def __init__(self, context: Any, registry: Any, scenes: Sequence[Any]) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, Image
        from vision_msgs.msg import Detection3DArray

        from rnnpose_ros.ros.conversions import rgb_to_image

        self.node = rclpy.create_node("soak_camera_and_detector", context=context)
        self.pub_image = self.node.create_publisher(Image, "image", qos_profile_sensor_data)
        self.pub_info = self.node.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data)
        self.pub_detections = self.node.create_publisher(Detection3DArray, "detections", 10)
        self.node.create_subscription(Detection3DArray, RESULT_TOPIC, self._on_answer, 100)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.images = [rgb_to_image(scene.image) for scene in scenes]
        self.registry = registry
        self.scenes = scenes
        self.sent: dict[int, float] = {}  # stamp (ns) -> monotonic publish time
        self.latencies: list[float] = []
        self.published = self.answered = self.dropped = 0

    def publish(self) -> None:
        from std_msgs.msg import Header

        from rnnpose_ros.ros.conversions import stamp_nanoseconds
        from rnnpose_ros.ros.scene_player import camera_info_message, detections_message

        index = self.published % len(self.scenes)
        scene = self.scenes[index]
        header = Header(frame_id=FRAME_ID, stamp=self.node.get_clock().now().to_msg())
        image = self.images[index]
        image.header = header
        self.sent[stamp_nanoseconds(header.stamp)] = time.monotonic()
        self.pub_image.publish(image)
        self.pub_info.publish(camera_info_message(scene.K, scene.image.shape[:2], header))
        self.pub_detections.publish(detections_message(scene, self.registry, header))
        self.published += 1

    def _on_answer(self, msg: Any) -> None:
        from rnnpose_ros.ros.conversions import stamp_nanoseconds

        sent = self.sent.pop(stamp_nanoseconds(msg.header.stamp), None)
        if sent is not None:
            self.answered += 1
            self.latencies.append(time.monotonic() - sent)

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            if status.name.startswith(NODE_NAME):
                values = {kv.key: kv.value for kv in status.values}
                self.dropped = int(values.get("frames_dropped", self.dropped))


def _soak(args: argparse.Namespace, node: NodeProcess) -> SoakResult:
    from rclpy.executors import SingleThreadedExecutor

    print(f"[soak] generating {SCENES} scenes with {args.detections} ducks each")
    registry, scenes = _scenes(args.detections, args.seed)
    with ros_context() as context:
        traffic = _Traffic(context, registry, scenes)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(traffic.node)
        try:
            _start(executor, traffic, node)
            return _run(args, executor, traffic, node)
        finally:
            executor.shutdown()
            traffic.node.destroy_node()


def _start(executor: Any, traffic: _Traffic, node: NodeProcess) -> None:
    """Publish slowly (1 Hz) until the node answers a frame: discovery and warm-up are over then."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    next_publish = 0.0
    while traffic.answered == 0:
        if node.exit_code is not None:
            raise SoakError(f"refine_node exited with {node.exit_code}:\n{node.log_tail()}")
        if time.monotonic() > deadline:
            raise SoakError(f"refine_node did not answer within {STARTUP_TIMEOUT_S:.0f} s")
        if time.monotonic() >= next_publish:
            traffic.publish()
            next_publish = time.monotonic() + 1.0
        executor.spin_once(timeout_sec=0.05)
    traffic.sent.clear()
    traffic.published = traffic.answered = 0
    traffic.latencies.clear()


def _run(args: argparse.Namespace, executor: Any, traffic: _Traffic, node: NodeProcess) -> SoakResult:
    pid = node.process.pid
    dropped_at_start = traffic.dropped
    start = time.monotonic()
    end = start + 60.0 * args.minutes
    period = 1.0 / args.rate
    next_publish, next_sample = start, start
    samples: list[Sample] = []
    latencies_seen = 0
    print(" ".join(f"{title:>{width}}" for title, width in TABLE_COLUMNS))
    while time.monotonic() < end:
        if node.exit_code is not None:
            break
        now = time.monotonic()
        if now >= next_publish:
            traffic.publish()
            next_publish += period
            if next_publish < now:  # fell behind (a slow spin): keep the rate, do not burst
                next_publish = now + period
        if now >= next_sample:
            recent = traffic.latencies[latencies_seen:]
            latencies_seen = len(traffic.latencies)
            sample = Sample(
                elapsed_s=now - start,
                rss_mb=rss_mb(pid),
                published=traffic.published,
                answered=traffic.answered,
                dropped=traffic.dropped - dropped_at_start,
                latency_p50_s=float(np.median(recent)) if recent else None,
                latency_max_s=float(np.max(recent)) if recent else None,
            )
            samples.append(sample)
            print(_row(sample), flush=True)
            next_sample += args.sample_period
        executor.spin_once(timeout_sec=max(0.0, min(next_publish, next_sample) - time.monotonic()))
    # Let the last answers and one more diagnostics message arrive.
    settle = time.monotonic() + 5.0
    while time.monotonic() < settle and node.exit_code is None:
        executor.spin_once(timeout_sec=0.05)
    return _result(args, traffic, samples, dropped_at_start, node.exit_code)


def _result(
    args: argparse.Namespace,
    traffic: _Traffic,
    samples: list[Sample],
    dropped_at_start: int,
    exit_code: int | None,
) -> SoakResult:
    dropped = traffic.dropped - dropped_at_start
    in_flight = traffic.published - traffic.answered - dropped
    start_mb, end_mb, growth = memory_growth(samples) if samples else (0.0, 0.0, 0.0)
    verdict = "memory bounded, every frame accounted for"
    if exit_code is not None:
        verdict = f"refine_node exited with {exit_code}"
    elif not traffic.answered:
        verdict = "no frame answered"
    elif growth > args.max_growth_mb:
        verdict = f"memory grew by {growth:.0f} MB (> {args.max_growth_mb:g} MB)"
    elif not 0 <= in_flight <= 2:  # the frame in the engine and the one in the queue
        verdict = f"{in_flight} frames unaccounted for (published - answered - dropped)"
    return SoakResult(
        minutes=args.minutes,
        rate_hz=args.rate,
        detections=args.detections,
        backend=args.backend,
        published=traffic.published,
        answered=traffic.answered,
        dropped=dropped,
        in_flight=in_flight,
        rss_start_mb=start_mb,
        rss_end_mb=end_mb,
        rss_growth_mb=growth,
        latency_s=percentiles(traffic.latencies),
        passed=verdict.startswith("memory bounded"),
        verdict=verdict,
        samples=samples,
    )


def _row(sample: Sample) -> str:
    latency = [
        f"{v:8.2f}" if v is not None else f"{'-':>8}" for v in (sample.latency_p50_s, sample.latency_max_s)
    ]
    return (
        f"{sample.elapsed_s / 60.0:6.1f} {sample.rss_mb:8.0f} {sample.published:10d} {sample.answered:9d} "
        f"{sample.dropped:8d} {latency[0]} {latency[1]}"
    )


def _summary_text(result: SoakResult) -> str:
    latency = ", ".join(f"{k} {v:.2f} s" if v is not None else f"{k} -" for k, v in result.latency_s.items())
    return (
        f"[soak] {result.minutes:g} min at {result.rate_hz:g} Hz, {result.detections} detections per frame "
        f"({result.backend}): published {result.published}, answered {result.answered}, dropped "
        f"{result.dropped}, in flight {result.in_flight}\n"
        f"[soak] node RSS {result.rss_start_mb:.0f} MB -> {result.rss_end_mb:.0f} MB "
        f"(growth {result.rss_growth_mb:+.0f} MB); latency {latency}\n"
        f"[soak] {'PASSED' if result.passed else 'FAILED'}: {result.verdict}"
    )


if __name__ == "__main__":
    sys.exit(main())
