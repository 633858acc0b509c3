"""One synchronised frame through the engine, without a node: messages in, a :class:`FrameOutcome` out.

:func:`process_frame` parses the detections, checks the frame (frame ids, image size), converts the
image and intrinsics, refines every usable detection in one engine call and decides the output of
each input detection: the refined pose and score, or the input passed through with score 0. Nothing
here raises for bad input, publishes or logs: like :func:`~rnnpose_ros.ros.conversions.parse_detections`,
every problem becomes data — the reason the frame was not refined (:attr:`FrameOutcome.problem`) or a
warning keyed by its reason (:attr:`FrameOutcome.warnings`, for a throttled logger) — and the caller
publishes and logs. With ``use_depth`` the frame's depth image goes into the observation; a missing or
unusable one refines the frame RGB-only (:attr:`FrameOutcome.depth_status` says which), never costs a
detection.

Threading: a pure function of its arguments; the node calls it from its worker thread only.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from rnnpose_ros.core.observation import InputError, Observation
from rnnpose_ros.ros.conversions import (
    ConversionError,
    DetectionInput,
    DetectionOutput,
    has_distortion,
    image_to_rgb,
    intrinsics_from_camera_info,
    parse_depth,
    parse_detections,
    stamp_text,
)
from rnnpose_ros.ros.inputs import Frame
from rnnpose_ros.ros.parameters import Settings

if TYPE_CHECKING:
    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.refiner import RefineResult


@dataclass
class FrameOutcome:
    """What became of one frame.

    Attributes:
        detections: the parsed input detections, in input order.
        outputs: one per input detection, same order: the refined (4, 4) pose and its score, or
            ``pose=None`` and score 0 (pass the input through).
        observation: the converted image (H, W, 3) uint8 RGB and intrinsics (3, 3), or None when the
            frame was rejected before or during conversion.
        problem: why no detection of the frame was refined (bad frame, engine error), or None.
        problem_key: a short fixed code of ``problem`` (its warning's throttle key), or None.
        warnings: text to log per reason key (the first text of each reason in this frame), in order;
            keys are fixed codes, never message text, so that each reason is throttled as one.
        over_limit: usable detections beyond ``max_detections_per_frame``, passed through unrefined.
        engine_failure: an unexpected engine exception with its traceback, to log as an error, or None.
        depth_status: with ``use_depth``, ``"used"`` when the observation carries the frame's depth, else
            why it does not (a fixed code: ``missing``, ``frame-id``, or a
            :class:`~rnnpose_ros.ros.conversions.DepthInput` reason) and the frame is refined RGB-only;
            None without ``use_depth`` or when the frame was not converted.
        convert_s, refine_s: seconds spent checking and converting, and refining.
    """

    detections: list[DetectionInput]
    outputs: list[DetectionOutput] = field(default_factory=list)
    observation: Observation | None = None
    problem: str | None = None
    problem_key: str | None = None
    warnings: dict[str, str] = field(default_factory=dict)
    over_limit: int = 0
    engine_failure: str | None = None
    depth_status: str | None = None
    convert_s: float = 0.0
    refine_s: float = 0.0

    @property
    def refined_count(self) -> int:
        return sum(output.pose is not None for output in self.outputs)

    def refined_poses(self) -> list[tuple[str, np.ndarray]]:
        """(instance id, (4, 4) refined pose) of every refined detection, in input order."""
        return [
            (item.instance_id, output.pose)
            for item, output in zip(self.detections, self.outputs, strict=True)
            if output.pose is not None
        ]

    @property
    def failed_count(self) -> int:
        """Detections passed through unrefined."""
        return len(self.outputs) - self.refined_count

    def warn(self, key: str, text: str) -> None:
        """Record ``text`` for reason ``key`` unless this frame already has a warning for that reason."""
        self.warnings.setdefault(key, text)

    def fail(self, key: str, problem: str) -> None:
        """The whole frame is passed through because of ``problem`` (reason code ``key``)."""
        self.problem_key, self.problem = key, problem


def process_frame(
    frame: Frame,
    refiner: Any,
    settings: Settings,
    registry: ObjectRegistry,
    stop: Callable[[], bool] | None = None,
    references: Mapping[str, np.ndarray] | None = None,
    not_ready: Mapping[str, str] | None = None,
) -> FrameOutcome:
    """Refine the detections of ``frame`` with ``refiner`` (``refine(observation, instances, stop=...)``,
    as :class:`~rnnpose_ros.core.refiner.Refiner`); reads ``frame_id_check``, ``expected_frame_id`` and
    ``max_detections_per_frame`` of ``settings`` and the models' boxes from ``registry``; ``references``
    (instance id -> (4, 4) pose, e.g. the previous frame's output) choose among a symmetric object's
    equivalent poses (:attr:`~rnnpose_ros.core.refiner.Instance.reference`). Detections of a class in
    ``not_ready`` (class id -> why, e.g. an object being added at run time) are passed through with that
    reason as a warning. Never raises for bad input;
    :class:`~rnnpose_ros.core.refiner.RefinementCancelledError` passes through when ``stop`` asks the
    engine to stop."""
    start = time.monotonic()
    detections = parse_detections(frame.detections)
    outcome = FrameOutcome(detections)
    for item in detections:
        if item.warning:
            outcome.warn(
                f"detection-warning:{item.warning.split()[0]}",
                f"detection {item.instance_id}: {item.warning}",
            )
    check_frame(frame, settings, outcome)
    if outcome.problem is None:
        try:
            rgb = image_to_rgb(frame.image)
            outcome.observation = Observation(
                rgb,
                intrinsics_from_camera_info(frame.camera_info),
                depth=_depth(frame, settings, rgb.shape[:2], outcome),
            )
            if has_distortion(frame.camera_info):
                outcome.warn(
                    "distortion",
                    "camera_info has non-zero distortion: the node expects rectified images (image_rect) "
                    "and ignores distortion",
                )
        except ConversionError as error:
            outcome.fail(type(error).__name__, str(error))
    converted = time.monotonic()
    results: dict[int, RefineResult] = {}
    if outcome.observation is not None and outcome.problem is None:
        results = _refine(
            refiner,
            outcome.observation,
            outcome,
            settings.max_detections_per_frame,
            stop,
            references or {},
            not_ready or {},
        )
    outcome.outputs = [_output(item, results.get(item.index), registry) for item in detections]
    if outcome.problem is not None:
        outcome.warn(
            f"frame:{outcome.problem_key}",
            f"frame {stamp_text(frame.image.header.stamp)} not refined: {outcome.problem}",
        )
    outcome.convert_s, outcome.refine_s = converted - start, time.monotonic() - converted
    return outcome


def check_frame(frame: Frame, settings: Settings, outcome: FrameOutcome) -> None:
    """Fail ``outcome`` when the whole frame cannot be refined (frame-id and size checks); mismatched
    frame ids with ``frame_id_check: warn`` become a warning instead."""
    image_frame = frame.image.header.frame_id
    problems = []
    if settings.expected_frame_id and image_frame != settings.expected_frame_id:
        problems.append(f"image frame {image_frame!r} != expected_frame_id {settings.expected_frame_id!r}")
    if frame.camera_info.header.frame_id != image_frame:
        problems.append(
            f"camera_info frame {frame.camera_info.header.frame_id!r} != image frame {image_frame!r}"
        )
    detections_frame = frame.detections.header.frame_id if frame.detections is not None else ""
    if detections_frame and detections_frame != image_frame:
        problems.append(f"detections frame {detections_frame!r} != image frame {image_frame!r}")
    if problems and settings.frame_id_check != "off":
        text = "mismatched frame ids: " + "; ".join(problems)
        if settings.frame_id_check == "strict":
            outcome.fail("frame-ids", text + " (set frame_id_check to warn to refine anyway)")
            return
        outcome.warn("frame-ids", text)
    info = frame.camera_info
    if info.width and info.height and (info.width, info.height) != (frame.image.width, frame.image.height):
        outcome.fail(
            "camera-info-size",
            f"camera_info is for {info.width}×{info.height} but the image is "
            f"{frame.image.width}×{frame.image.height}",
        )


def _depth(
    frame: Frame, settings: Settings, size: tuple[int, int], outcome: FrameOutcome
) -> np.ndarray | None:
    """The frame's depth in metres (H, W) float32 for the observation, or None (RGB-only): without
    ``use_depth``, or — with a warning keyed by the reason and ``outcome.depth_status`` — when the
    depth image did not arrive in time, carries another frame id (``frame_id_check``), or is unusable."""
    if not settings.use_depth:
        return None
    stamp = stamp_text(frame.image.header.stamp)
    if frame.depth is None:
        outcome.depth_status = "missing"
        outcome.warn(
            "depth:missing",
            f"frame {stamp} refined RGB-only: no depth image with its stamp (within sync_slop = "
            f"{settings.sync_slop:g} s) arrived within depth_timeout = {settings.depth_timeout:g} s",
        )
        return None
    depth_frame, image_frame = frame.depth.header.frame_id, frame.image.header.frame_id
    if depth_frame != image_frame and settings.frame_id_check != "off":
        text = (
            f"depth frame {depth_frame!r} != image frame {image_frame!r}: a depth image registered to the "
            "colour image carries the colour frame id (e.g. aligned_depth_to_color)"
        )
        if settings.frame_id_check == "strict":
            outcome.depth_status = "frame-id"
            outcome.warn(
                "depth:frame-id",
                f"frame {stamp} refined RGB-only: {text} (set frame_id_check to warn to use it anyway)",
            )
            return None
        outcome.warn("depth:frame-id", text)
    parsed = parse_depth(frame.depth, size)
    if parsed.metres is None:
        outcome.depth_status = parsed.reason
        outcome.warn(f"depth:{parsed.reason}", f"frame {stamp} refined RGB-only: {parsed.error}")
        return None
    outcome.depth_status = "used"
    return parsed.metres


def _refine(
    refiner: Any,
    observation: Observation,
    outcome: FrameOutcome,
    max_detections: int,
    stop: Callable[[], bool] | None,
    references: Mapping[str, np.ndarray],
    not_ready: Mapping[str, str],
) -> dict[int, RefineResult]:
    """One engine call for the usable detections (the first ``max_detections`` of them, in input order);
    returns the OK results by input index and records every other outcome (warnings, ``problem``,
    ``engine_failure``, ``over_limit``) on ``outcome``."""
    from rnnpose_ros.core.refiner import (  # heavy (torch): not at node start-up
        Instance,
        RefinementCancelledError,
        RefineStatus,
    )

    usable = []
    for item in outcome.detections:
        if item.error is None and item.class_id in not_ready:
            outcome.warn(
                f"not-ready:{item.class_id}",
                f"detection {item.instance_id} passed through: {not_ready[item.class_id]}",
            )
        elif item.error is None:
            usable.append(item)
        else:
            outcome.warn(
                f"detection:{item.reason}", f"detection {item.instance_id} passed through: {item.error}"
            )
    if len(usable) > max_detections:
        outcome.over_limit = len(usable) - max_detections
        outcome.warn(
            "too-many-detections",
            f"{len(usable)} detections in one frame: the first {max_detections} are refined, "
            f"{outcome.over_limit} passed through (max_detections_per_frame = {max_detections})",
        )
        usable = usable[:max_detections]
    if not usable:
        return {}
    instances = [
        Instance(item.class_id, item.pose, item.instance_id, references.get(item.instance_id))
        for item in usable
    ]
    try:
        results = refiner.refine(observation, instances, stop=stop)
    except RefinementCancelledError:
        raise
    except InputError as error:
        outcome.fail("engine-input", f"engine rejected the input: {error}")
        return {}
    except Exception as error:  # the detections are still published (passed through)
        outcome.engine_failure = f"engine failed: {error}\n{traceback.format_exc()}"
        outcome.fail("engine-failure", f"engine failed: {type(error).__name__}: {error}")
        return {}
    refined = {}
    for item, result in zip(usable, results, strict=True):
        if result.status is RefineStatus.OK:
            refined[item.index] = result
        else:
            outcome.warn(
                f"status:{result.status.value}",
                f"detection {item.instance_id} ({item.class_id}) passed through: {result.status.value}: "
                f"{result.message}",
            )
    return refined


def _output(item: DetectionInput, result: RefineResult | None, registry: ObjectRegistry) -> DetectionOutput:
    """The refined pose and score of ``item``, or a pass-through when ``result`` is None; the mesh box of
    a known class either way."""
    model = registry.models.get(item.class_id) if item.class_id else None
    return DetectionOutput(
        pose=None if result is None else np.asarray(result.pose, dtype=np.float64),
        score=0.0 if result is None else float(result.score),
        extents=None if model is None else model.extents,
        center=None if model is None else model.center,
    )
