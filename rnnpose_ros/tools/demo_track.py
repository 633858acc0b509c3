"""The demo's ``--track`` run: the real ``refine_node`` in ``mode: track`` follows a synthetic sequence.

    python -m rnnpose_ros.tools.demo --track [--frames 60] [--detect-every 10] [--seed S]

The node process is started by :mod:`rnnpose_ros.tools.demo` with ``mode:=track``. This player sends a
:mod:`rnnpose_ros.core.sequence` sequence (a camera swaying over the duck at 30 frames per second of
motion, stamps 1/30 s apart) one image at a time: image + camera_info on every frame and, on every
``--detect-every``-th frame, a detections message (standard noise, no ids) just before the image.
It waits for the node's answer to each image (``~/detections`` with that stamp), then prints the live
tracks, each object's ADD(-S) against the truth and the latency (image published → answer received),
and writes ``track.gif`` (the node's debug overlays, captioned with error and latency), the per-frame
PNGs and ``summary.json`` under ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rnnpose_ros.core import metrics
from rnnpose_ros.tools.node_process import NodeProcess, ros_context

GIF_FRAME_S = 0.2


@dataclass
class TrackFrame:
    """One sent frame and the node's answer."""

    index: int
    detected: bool
    published_at: float
    answer: Any = None
    answered_at: float | None = None
    errors: list[float | None] = field(default_factory=list)
    tracks: list[str] = field(default_factory=list)

    @property
    def latency_s(self) -> float | None:
        return None if self.answered_at is None else self.answered_at - self.published_at


def run(args: argparse.Namespace, node: NodeProcess) -> int:
    """Play the sequence against the running ``node``; returns the exit status (raises the demo's
    ``DemoError`` when the node does not answer)."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image
    from vision_msgs.msg import Detection3DArray

    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.render import Renderer
    from rnnpose_ros.core.sequence import SequenceSpec, make_sequence
    from rnnpose_ros.ros.conversions import rgb_to_image, stamp_nanoseconds
    from rnnpose_ros.ros.scene_player import camera_info_message
    from rnnpose_ros.tools import demo  # its constants and helpers; it imports this module lazily

    registry = ObjectRegistry.from_yaml(args.objects_file)
    models = [registry[c] for c in args.objects]
    spec = SequenceSpec(frames=args.frames, detect_every=args.detect_every)
    with ros_context() as context:
        player = rclpy.create_node("track_demo_player", context=context)
        pub_image = player.create_publisher(Image, "image", qos_profile_sensor_data)
        pub_info = player.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        pub_detections = player.create_publisher(Detection3DArray, "detections", reliable)
        answers: dict[int, tuple[Any, float]] = {}
        player.create_subscription(
            Detection3DArray,
            demo.RESULT_TOPIC,
            lambda msg: answers.setdefault(stamp_nanoseconds(msg.header.stamp), (msg, time.monotonic())),
            reliable,
        )
        collector, outputs = demo._collector(context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(player)
        executor.add_node(collector)
        played: list[TrackFrame] = []
        try:
            _wait_ready(executor, pub_image, pub_detections, collector, node)
            print(f"[demo] node ready; tracking {args.frames} frames, detections every {args.detect_every}")
            for frame in make_sequence(models, args.seed, Renderer(), spec):
                header = _header(frame.stamp)
                if frame.detections:
                    pub_detections.publish(_detections(frame, registry, header))
                sent = TrackFrame(frame.index, bool(frame.detections), time.monotonic())
                pub_image.publish(rgb_to_image(frame.image, copy.deepcopy(header)))
                pub_info.publish(camera_info_message(frame.K, frame.image.shape[:2], copy.deepcopy(header)))
                key = stamp_nanoseconds(header.stamp)
                deadline = time.monotonic() + args.result_timeout
                while key not in answers:
                    executor.spin_once(timeout_sec=0.02)
                    if node.exit_code is not None:
                        raise demo.DemoError(f"refine_node exited with {node.exit_code}:\n{node.log_tail()}")
                    if time.monotonic() > deadline:
                        raise demo.DemoError(
                            f"no answer to frame {frame.index} within {args.result_timeout:g} s:\n"
                            + node.log_tail()
                        )
                sent.answer, sent.answered_at = answers[key]
                _score(sent, frame, registry)
                played.append(sent)
                print(_describe(sent), flush=True)
            demo._await_last(
                executor, outputs, [stamp_nanoseconds(_header(f.index / spec.fps).stamp) for f in played]
            )
        except KeyboardInterrupt:
            print("\n[demo] interrupted")
            return 130
        finally:
            executor.shutdown()
            player.destroy_node()
            collector.destroy_node()
    return _report(args, played, outputs, spec)


def _wait_ready(
    executor: Any, pub_image: Any, pub_detections: Any, collector: Any, node: NodeProcess
) -> None:
    """Spin until the node subscribes to the inputs and publishes its debug image."""
    from rnnpose_ros.tools import demo

    deadline = time.monotonic() + demo.STARTUP_TIMEOUT_S
    while not (
        pub_image.get_subscription_count() > 0
        and pub_detections.get_subscription_count() > 0
        and collector.count_publishers(demo.DEBUG_TOPIC) > 0
    ):
        executor.spin_once(timeout_sec=0.1)
        if node.exit_code is not None:
            raise demo.DemoError(
                f"refine_node exited with {node.exit_code} before it was ready:\n{node.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise demo.DemoError(f"refine_node did not subscribe in time:\n{node.log_tail()}")
    end = time.monotonic() + 0.5  # let the node see our debug-image subscription too
    while time.monotonic() < end:
        executor.spin_once(timeout_sec=0.05)


def _header(stamp_s: float) -> Any:
    """Header of the frame at ``stamp_s`` seconds of the sequence (stamps start at 1000 s)."""
    from std_msgs.msg import Header

    header = Header(frame_id="camera_color_optical_frame")
    nanoseconds = round((1000.0 + stamp_s) * 1e9)
    header.stamp.sec, header.stamp.nanosec = nanoseconds // 1_000_000_000, nanoseconds % 1_000_000_000
    return header


def _detections(frame: Any, registry: Any, header: Any) -> Any:
    """The detector's message: the detected objects' noisy poses in the detector's order, no ids (a
    detector without a tracker)."""
    from rnnpose_ros.core.synth import Scene
    from rnnpose_ros.ros.scene_player import detections_message

    scene = Scene(frame.image, frame.K, [frame.instances[i] for i in frame.detections])
    message = detections_message(scene, registry, copy.deepcopy(header))
    for detection in message.detections:
        detection.id = ""
    return message


def _score(sent: TrackFrame, frame: Any, registry: Any) -> None:
    """Per object of ``frame``: ADD(-S)/d of the answer's track assigned to it (Hungarian, per class)."""
    from rnnpose_ros.ros.conversions import pose_to_matrix
    from rnnpose_ros.tools.sequence_eval import relative_errors

    @dataclass
    class Answered:
        class_id: str
        pose: np.ndarray

    tracks = [
        Answered(d.results[0].hypothesis.class_id, pose_to_matrix(d.results[0].pose.pose)[0])
        for d in sent.answer.detections
    ]
    sent.tracks = [d.id for d in sent.answer.detections]
    sent.errors, _ = relative_errors(registry, frame, tracks)


def _describe(sent: TrackFrame) -> str:
    errors = ", ".join("no track" if e is None else f"{e:.3f} d" for e in sent.errors)
    return (
        f"frame {sent.index:3d}{' [detections]' if sent.detected else '             '} tracks "
        f"{', '.join(sent.tracks) or '-':<12} ADD(-S) {errors:<20} latency {sent.latency_s:.2f} s"
    )


def _report(args: argparse.Namespace, played: list[TrackFrame], outputs: Any, spec: Any) -> int:
    """Captioned overlays (PNGs, ``track.gif``), ``summary.json`` and the printed summary."""
    import cv2
    import imageio.v2 as imageio

    from rnnpose_ros.ros.conversions import stamp_nanoseconds
    from rnnpose_ros.tools import demo

    small = []
    for sent in played:
        image = outputs.debug_images.get(stamp_nanoseconds(_header(sent.index / spec.fps).stamp))
        if image is None:
            continue
        errors = " ".join("lost" if e is None else f"{e:.3f}d" for e in sent.errors)
        lines = [
            f"frame {sent.index} ({sent.index / spec.fps:.2f} s){'  DETECTIONS' if sent.detected else ''}",
            f"ADD(-S) {errors}   latency {sent.latency_s:.2f} s   tracks {', '.join(sent.tracks) or '-'}",
        ]
        captioned = demo.caption(image, lines)
        imageio.imwrite(args.output / f"frame_{sent.index:03d}.png", captioned)
        size = (captioned.shape[1] // 2, captioned.shape[0] // 2)
        small.append(cv2.resize(captioned, size, interpolation=cv2.INTER_AREA))
    gif = None
    if small:
        gif = args.output / "track.gif"
        imageio.mimsave(gif, small, duration=GIF_FRAME_S, loop=0)
    scored = [e for sent in played for e in sent.errors]
    passed = [e is not None and e < metrics.ADD_S_FRACTION for e in scored]
    latency = demo.latency_summary([s.latency_s for s in played if s.latency_s is not None])
    summary = {
        "mode": "track",
        "seed": args.seed,
        "objects": list(args.objects),
        "detect_every": args.detect_every,
        "frames": len(played),
        "add_s": float(np.mean(passed)) if passed else None,
        "latency_ms": latency,
        "node_diagnostics": outputs.diagnostics,
        "per_frame": [
            {
                "frame": s.index,
                "detected": s.detected,
                "tracks": s.tracks,
                "relative_add_s": s.errors,
                "latency_ms": None if s.latency_s is None else 1000.0 * s.latency_s,
            }
            for s in played
        ],
        "gif": None if gif is None else gif.name,
    }
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    if passed:
        print(f"tracked ADD(-S)@0.1d {np.mean(passed):.3f} over {len(passed)} frame-objects")
    if latency["mean"] is not None:
        print(
            f"latency (image published -> answer): mean {latency['mean']:.0f} ms, "
            f"median {latency['median']:.0f} ms, max {latency['max']:.0f} ms"
        )
    print(
        f"[demo] wrote {len(small)} overlays, {gif.name if gif else 'no GIF'} and summary.json "
        f"to {args.output}/"
    )
    return 0 if played else 1
