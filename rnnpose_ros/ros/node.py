"""The ``rnnpose_refiner`` node: synchronised image + camera_info + detections in, refined poses out.

Subscribes (relative names, remap them):
    ``image`` (sensor_msgs/Image, rectified), ``camera_info`` (sensor_msgs/CameraInfo),
    ``detections`` (vision_msgs/Detection3DArray, initial poses in the image's optical frame,
    ``results[0]`` = class id + pose), synchronised on identical stamps (``sync_slop`` > 0: approximately).
Publishes:
    ``~/detections`` (vision_msgs/Detection3DArray, header = image header, one detection per input, same
    order), ``/tf`` (``<tf_prefix><id>`` under the image frame, image stamp), ``~/markers``
    (visualization_msgs/MarkerArray), ``~/debug_image`` (sensor_msgs/Image, only when subscribed),
    ``/diagnostics`` (diagnostic_msgs/DiagnosticArray).

Threading: subscription callbacks only queue the synchronised set (bounded, ``max_pending_frames``,
oldest dropped with a throttled warning); one worker thread converts, refines and publishes, so the
executor is never blocked by refinement. Bad input never stops the node: the frame's detections are
passed through with score 0 and the reason is logged (throttled per reason).

Parameters are declared from one table (:data:`PARAMETERS`, with descriptions, types and ranges),
validated at start (:class:`ParameterError` names the parameter); the few marked ``dynamic`` can be
changed at run time. ``docs/ros_api.md`` documents the whole interface.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
import rclpy.executors
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.event_handler import QoSRequestedIncompatibleQoSInfo, SubscriptionEventCallbacks
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (
    QoSProfile,
    ReliabilityPolicy,
    qos_policy_name_from_kind,
    qos_profile_sensor_data,
    qos_profile_system_default,
)
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection3DArray
from visualization_msgs.msg import MarkerArray

from rnnpose_ros.package_files import default_objects_file
from rnnpose_ros.ros import compat
from rnnpose_ros.ros.conversions import (
    ConversionError,
    DetectionInput,
    DetectionOutput,
    MeshMarker,
    OverlayObject,
    detection_array,
    has_distortion,
    image_to_rgb,
    intrinsics_from_camera_info,
    mesh_markers,
    object_transforms,
    overlay_image,
    parse_detections,
    rgb_to_image,
    stamp_text,
)

NODE_NAME = "rnnpose_refiner"
WARN_THROTTLE_S = 5.0
LATENCY_STAGES = ("queue", "convert", "refine", "publish", "total")
# Seconds of inputs without a single synchronised set before the node says why nothing comes out.
SYNC_HINT_AFTER_S = 3.0
SHUTDOWN_WAIT_S = 2.0


class ParameterError(ValueError):
    """A parameter value the node cannot start with (the message names the parameter)."""


@dataclass(frozen=True)
class ParameterSpec:
    """One row of the parameter table: name, default (its Python type is the ROS type), description,
    optional allowed values / numeric range, and whether it may change at run time."""

    name: str
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    int_range: tuple[int, int] | None = None
    float_range: tuple[float, float] | None = None
    dynamic: bool = False

    def descriptor(self) -> ParameterDescriptor:
        text = self.description + (f" One of: {', '.join(self.choices)}." if self.choices else "")
        descriptor = ParameterDescriptor(name=self.name, description=text, read_only=not self.dynamic)
        descriptor.type = Parameter.Type.from_parameter_value(self.default).value
        if self.choices:
            descriptor.additional_constraints = f"one of: {', '.join(self.choices)}"
        if self.int_range is not None:
            descriptor.integer_range = [
                IntegerRange(from_value=self.int_range[0], to_value=self.int_range[1], step=1)
            ]
        if self.float_range is not None:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=self.float_range[0], to_value=self.float_range[1], step=0.0)
            ]
        return descriptor


PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec(
        "objects_file",
        "",
        "Object registry YAML (class_id -> mesh, scale, symmetric, weights). Empty = the package's "
        "config/objects.yaml.",
    ),
    ParameterSpec(
        "device", "auto", "Torch device; auto = cuda when available, else cpu.", ("auto", "cuda", "cpu")
    ),
    ParameterSpec(
        "backend",
        "auto",
        "Correspondence backend; auto = rnnpose when every registered object has a weights file, else "
        "classical.",
        ("auto", "classical", "rnnpose"),
    ),
    ParameterSpec(
        "outer_iterations", 0, "Render iterations per frame; 0 = the backend's default.", int_range=(0, 100)
    ),
    ParameterSpec(
        "inner_iterations",
        0,
        "Correspondence + LM steps per render iteration; 0 = the backend's default.",
        int_range=(0, 50),
    ),
    ParameterSpec(
        "restart_below_score",
        -1.0,
        "Refine results scoring below this again from four rotation hypotheses (more robust, slower); "
        "0 = never, -1 = the backend's default.",
        float_range=(-1.0, 1.0),
    ),
    ParameterSpec(
        "score_threshold",
        0.0,
        "Refined detections scoring below this keep their refined pose and score in ~/detections but get "
        "no TF frame and no marker.",
        float_range=(0.0, 1.0),
        dynamic=True,
    ),
    ParameterSpec(
        "tf_prefix", "", "Prefix of the object TF frames <tf_prefix><class_id>_<index>.", dynamic=True
    ),
    ParameterSpec("publish_tf", True, "Broadcast one TF frame per refined detection on /tf.", dynamic=True),
    ParameterSpec(
        "sync_slop",
        0.0,
        "Largest stamp difference (s) between image, camera_info and detections of one set; 0 = identical "
        "stamps (TimeSynchronizer), > 0 = ApproximateTimeSynchronizer for detectors that re-stamp.",
        float_range=(0.0, 10.0),
    ),
    ParameterSpec(
        "queue_size",
        10,
        "Messages kept per input by the synchroniser and subscription depth.",
        int_range=(1, 1000),
    ),
    ParameterSpec(
        "max_pending_frames",
        1,
        "Synchronised frames waiting for the worker; when full the oldest is dropped (1 = latest frame).",
        int_range=(1, 100),
    ),
    ParameterSpec(
        "image_qos",
        "sensor_data",
        "QoS of the image and camera_info subscriptions (sensor_data = best effort, accepts any publisher).",
        ("sensor_data", "reliable", "system_default"),
    ),
    ParameterSpec(
        "detections_qos",
        "reliable",
        "QoS of the detections subscription (reliable does not match a best-effort publisher).",
        ("sensor_data", "reliable", "system_default"),
    ),
    ParameterSpec(
        "debug_image", True, "Publish ~/debug_image (drawn only while someone subscribes).", dynamic=True
    ),
    ParameterSpec(
        "frame_id_check",
        "strict",
        "Mismatched frame ids between image, camera_info and detections (or expected_frame_id): strict = "
        "pass the frame's detections through unrefined, warn = refine anyway and warn, off = ignore.",
        ("strict", "warn", "off"),
        dynamic=True,
    ),
    ParameterSpec(
        "expected_frame_id",
        "",
        "If set, the image frame id every input must carry (e.g. camera_color_optical_frame).",
    ),
    ParameterSpec(
        "warmup",
        True,
        "Refine one synthetic frame per object class at start (renderer, torch and GPU initialisation), so "
        "that the first real frame is not slow.",
    ),
    ParameterSpec(
        "diagnostics_period", 1.0, "Seconds between /diagnostics messages.", float_range=(0.1, 60.0)
    ),
)
SPECS = {spec.name: spec for spec in PARAMETERS}


@dataclass
class Settings:
    """Validated parameter values (see :data:`PARAMETERS` for the meaning of each)."""

    objects_file: Path
    device: str
    backend: str
    outer_iterations: int
    inner_iterations: int
    restart_below_score: float
    score_threshold: float
    tf_prefix: str
    publish_tf: bool
    sync_slop: float
    queue_size: int
    max_pending_frames: int
    image_qos: str
    detections_qos: str
    debug_image: bool
    frame_id_check: str
    expected_frame_id: str
    warmup: bool
    diagnostics_period: float


def validate_parameter(name: str, value: Any) -> Any:
    """The value of parameter ``name`` after the checks the descriptor cannot express; raises
    ParameterError naming the parameter."""
    spec = SPECS[name]
    if spec.choices and value not in spec.choices:
        raise ParameterError(f"parameter {name!r} = {value!r} is not one of: {', '.join(spec.choices)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(f"parameter {name!r} must be finite, got {value}")
    if spec.float_range is not None and not spec.float_range[0] <= value <= spec.float_range[1]:
        raise ParameterError(
            f"parameter {name!r} = {value} is outside [{spec.float_range[0]}, {spec.float_range[1]}]"
        )
    if spec.int_range is not None and not spec.int_range[0] <= value <= spec.int_range[1]:
        raise ParameterError(
            f"parameter {name!r} = {value} is outside [{spec.int_range[0]}, {spec.int_range[1]}]"
        )
    if name in ("tf_prefix", "expected_frame_id") and (
        value.startswith("/") or any(c.isspace() for c in value)
    ):
        raise ParameterError(
            f"parameter {name!r} = {value!r}: TF frame ids may not start with '/' or contain spaces"
        )
    if name == "objects_file":
        path = Path(value).expanduser() if value else default_objects_file()
        if not path.is_file():
            raise ParameterError(f"parameter 'objects_file': {path} does not exist")
        return path.resolve()
    return value


def qos_profile(name: str, depth: int) -> QoSProfile:
    """QoS of an input subscription from the ``image_qos`` / ``detections_qos`` parameter value."""
    if name == "sensor_data":
        base = qos_profile_sensor_data
    elif name == "reliable":
        base = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)
    else:
        base = qos_profile_system_default
    return QoSProfile(
        history=base.history, depth=depth, reliability=base.reliability, durability=base.durability
    )


# ---------------------------------------------------------------- frames and statistics


@dataclass
class Frame:
    """One synchronised input set and when it was queued (``time.monotonic()``)."""

    image: Image
    camera_info: CameraInfo
    detections: Detection3DArray
    queued: float


class FrameQueue:
    """Bounded FIFO between the subscription callbacks and the worker; ``put`` drops the oldest frame."""

    def __init__(self, capacity: int):
        self._frames: deque[Frame] = deque()
        self.capacity = capacity
        self._condition = threading.Condition()
        self._closed = False

    def put(self, frame: Frame) -> Frame | None:
        """Queue ``frame``; returns the frame dropped to make room, if any. Never blocks."""
        with self._condition:
            dropped = self._frames.popleft() if len(self._frames) >= self.capacity else None
            self._frames.append(frame)
            self._condition.notify()
        return dropped

    def get(self) -> Frame | None:
        """The oldest frame, waiting for one; None once closed."""
        with self._condition:
            while not self._frames and not self._closed:
                self._condition.wait()
            return None if self._closed else self._frames.popleft()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._condition:
            return len(self._frames)


@dataclass
class Statistics:
    """Counters since start and samples of the current diagnostics period (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    received: dict[str, int] = field(default_factory=lambda: {"image": 0, "camera_info": 0, "detections": 0})
    synchronised: int = 0
    processed: int = 0
    dropped: int = 0
    detections_refined: int = 0
    detections_failed: int = 0
    frame_errors: int = 0
    period_synchronised: int = 0
    period_processed: int = 0
    period_dropped: int = 0
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in LATENCY_STAGES})
    incompatible_qos: dict[str, int] = field(default_factory=dict)
    last_problem: str = ""
    first_input: float | None = None


class Throttle:
    """Per-key rate limit for warnings: each reason is logged at most once per ``period`` seconds."""

    def __init__(self, period: float):
        self.period = period
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self.period:
                return False
            self._last[key] = now
            return True


# ---------------------------------------------------------------- the node


class RefinerNode(Node):
    """ROS 2 adapter around :class:`rnnpose_ros.core.refiner.Refiner` (module docstring).

    Args:
        refiner_factory: builds the engine from the validated settings and the registry; defaults to
            :func:`create_refiner`. Raises ParameterError (from the parameters) or the engine's errors.
        **kwargs: passed to :class:`rclpy.node.Node` (``context``, ``parameter_overrides``, ``cli_args``).
    """

    def __init__(self, refiner_factory: Callable[[Settings, Any], Any] | None = None, **kwargs: Any):
        super().__init__(NODE_NAME, **kwargs)
        self.settings = self._declare_and_validate()
        from rnnpose_ros.core.objects import ObjectModelError, ObjectRegistry  # heavy: after the cheap checks

        try:
            self.registry = ObjectRegistry.from_yaml(self.settings.objects_file)
        except ObjectModelError as error:
            raise ParameterError(
                f"parameter 'objects_file' ({self.settings.objects_file}): {error}"
            ) from None
        self.refiner = (refiner_factory or create_refiner)(self.settings, self.registry)
        self.stats = Statistics()
        self._throttle = Throttle(WARN_THROTTLE_S)
        self._markers_shown: set[str] = set()
        self.add_on_set_parameters_callback(self._on_set_parameters)

        s = self.settings
        self.pub_detections = self.create_publisher(Detection3DArray, "~/detections", 10)
        self.pub_markers = self.create_publisher(MarkerArray, "~/markers", 10)
        self.pub_debug = self.create_publisher(Image, "~/debug_image", QoSProfile(depth=2))
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.tf_broadcaster = compat.TransformBroadcaster(self)

        image_qos = qos_profile(s.image_qos, s.queue_size)
        detections_qos = qos_profile(s.detections_qos, s.queue_size)
        inputs = [
            compat.Subscriber(self, msg_type, topic, qos_profile=qos, event_callbacks=self._qos_events(topic))
            for msg_type, topic, qos in (
                (Image, "image", image_qos),
                (CameraInfo, "camera_info", image_qos),
                (Detection3DArray, "detections", detections_qos),
            )
        ]
        for topic, subscriber in zip(("image", "camera_info", "detections"), inputs, strict=True):
            subscriber.registerCallback(lambda _msg, topic=topic: self._count_input(topic))
        if s.sync_slop > 0.0:
            self.synchronizer = compat.ApproximateTimeSynchronizer(inputs, s.queue_size, s.sync_slop)
        else:
            self.synchronizer = compat.TimeSynchronizer(inputs, s.queue_size)
        self.synchronizer.registerCallback(self._on_frame)
        self._inputs = inputs

        self.queue = FrameQueue(s.max_pending_frames)
        self.warmed_up = threading.Event()
        self._worker = threading.Thread(target=self._work, name="rnnpose_worker", daemon=True)
        self._worker.start()
        self._period_start = time.monotonic()
        self.create_timer(s.diagnostics_period, self._publish_diagnostics)
        self.get_logger().info(
            f"ready: backend {s.backend}, device {s.device}, objects {', '.join(self.registry.class_ids)} "
            f"from {s.objects_file}; sync {'exact stamps' if s.sync_slop == 0 else f'slop {s.sync_slop} s'} "
            f"({compat.IMPLEMENTATION['synchronizer']}), TF via {compat.IMPLEMENTATION['tf_broadcaster']}"
        )

    # --- parameters ---------------------------------------------------------------------------------

    def _declare_and_validate(self) -> Settings:
        values: dict[str, Any] = {}
        for spec in PARAMETERS:
            try:
                value = self.declare_parameter(spec.name, spec.default, spec.descriptor()).value
            except InvalidParameterTypeException:
                kind = type(spec.default).__name__
                hint = " (write 0.0, not 0)" if isinstance(spec.default, float) else ""
                raise ParameterError(f"parameter {spec.name!r} must be of type {kind}{hint}") from None
            except InvalidParameterValueException as error:
                raise ParameterError(f"parameter {spec.name!r}: {error}") from None
            values[spec.name] = validate_parameter(spec.name, value)
        return Settings(**values)

    def _on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        updates = {}
        for parameter in parameters:
            if parameter.name not in SPECS:
                continue
            try:
                updates[parameter.name] = validate_parameter(parameter.name, parameter.value)
            except ParameterError as error:
                return SetParametersResult(successful=False, reason=str(error))
        for name, value in updates.items():
            setattr(self.settings, name, value)
        return SetParametersResult(successful=True)

    # --- callbacks (executor thread: cheap, never blocking) ---------------------------------------

    def _count_input(self, topic: str) -> None:
        with self.stats.lock:
            self.stats.received[topic] += 1
            if self.stats.first_input is None:
                self.stats.first_input = time.monotonic()

    def _qos_events(self, topic: str) -> SubscriptionEventCallbacks:
        """Say which parameter to change when a publisher's QoS cannot match the subscription (otherwise
        the callback silently never fires)."""
        parameter = "detections_qos" if topic == "detections" else "image_qos"

        def incompatible(info: QoSRequestedIncompatibleQoSInfo) -> None:
            policy = qos_policy_name_from_kind(info.last_policy_kind)
            text = (
                f"a publisher on '{self.resolve_topic_name(topic)}' offers QoS incompatible with this "
                f"subscription ({policy}): set {parameter} to match it (sensor_data accepts any publisher)"
            )
            with self.stats.lock:
                self.stats.incompatible_qos[topic] = info.total_count
                self.stats.last_problem = text
            self._warn(f"qos:{topic}", text)

        return SubscriptionEventCallbacks(incompatible_qos=incompatible)

    def _on_frame(self, image: Image, camera_info: CameraInfo, detections: Detection3DArray) -> None:
        dropped = self.queue.put(Frame(image, camera_info, detections, time.monotonic()))
        with self.stats.lock:
            self.stats.synchronised += 1
            self.stats.period_synchronised += 1
            if dropped is not None:
                self.stats.dropped += 1
                self.stats.period_dropped += 1
                total = self.stats.dropped
        if dropped is not None:
            self._warn(
                "dropped",
                f"refinement cannot keep up: dropped the oldest pending frame (stamp "
                f"{stamp_text(dropped.image.header.stamp)}; {total} dropped so far, max_pending_frames = "
                f"{self.queue.capacity})",
            )

    # --- worker thread ------------------------------------------------------------------------------

    def _work(self) -> None:
        if self.settings.warmup:
            self._warm_up()
        self.warmed_up.set()
        while (frame := self.queue.get()) is not None:
            try:
                self.process(frame)
            except Exception as error:  # never let one frame end the worker
                if self.queue.closed or not self.context.ok():
                    return  # shutting down: the node's publishers may already be gone
                with self.stats.lock:
                    self.stats.frame_errors += 1
                    self.stats.last_problem = f"internal error: {error}"
                self.get_logger().error(f"frame processing failed: {error}\n{traceback.format_exc()}")

    def _warm_up(self) -> None:
        """One engine call on a grey 320×240 image with each class 3 diameters ahead (results unused)."""
        from rnnpose_ros.core.observation import Observation
        from rnnpose_ros.core.refiner import Instance

        start = time.monotonic()
        K = np.array([[300.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0.0, 0.0, 1.0]])
        instances = []
        for model in self.registry:
            pose = np.eye(4)
            pose[:3, 3] = -model.center + (0.0, 0.0, 3.0 * model.diameter)
            instances.append(Instance(model.class_id, pose, "warmup"))
        try:
            self.refiner.refine(Observation(np.full((240, 320, 3), 128, np.uint8), K), instances)
        except Exception as error:  # a failed warm-up only costs first-frame latency
            self.get_logger().warning(f"warm-up failed (the first frame will be slower): {error}")
            return
        if not self.queue.closed:
            self.get_logger().info(f"warm-up done in {time.monotonic() - start:.2f} s")

    def process(self, frame: Frame) -> Detection3DArray:
        """Convert, refine and publish one synchronised frame; returns the published detections."""
        start = time.monotonic()
        header = frame.image.header
        inputs = parse_detections(frame.detections)
        for item in inputs:
            if item.warning:
                self._warn(
                    f"detection-warning:{item.warning.split()[0]}",
                    f"detection {item.instance_id}: {item.warning}",
                )
        outputs = [self._passthrough(item) for item in inputs]
        rgb, K = None, None
        problem = self._frame_problem(frame)
        if problem is None:
            try:
                rgb = image_to_rgb(frame.image)
                K = intrinsics_from_camera_info(frame.camera_info)
                if has_distortion(frame.camera_info):
                    self._warn(
                        "distortion",
                        "camera_info has non-zero distortion: the node expects rectified images (image_rect) "
                        "and ignores distortion",
                    )
            except ConversionError as error:
                problem = str(error)
        converted = time.monotonic()
        refined_count = 0
        if problem is None and rgb is not None and K is not None:
            problem, refined_count = self._refine(rgb, K, inputs, outputs)
        if problem is not None:
            self._warn(f"frame:{problem[:40]}", f"frame {stamp_text(header.stamp)} not refined: {problem}")
        refined = time.monotonic()
        message = detection_array(header, frame.detections, inputs, outputs)
        self.pub_detections.publish(message)
        self._publish_extras(header, rgb, K, inputs, outputs)
        done = time.monotonic()
        self._record(
            frame, start, converted, refined, done, refined_count, len(inputs) - refined_count, problem
        )
        return message

    def _frame_problem(self, frame: Frame) -> str | None:
        """Why the whole frame cannot be refined (frame-id and size checks), or None."""
        image_frame = frame.image.header.frame_id
        s = self.settings
        problems = []
        if s.expected_frame_id and image_frame != s.expected_frame_id:
            problems.append(f"image frame {image_frame!r} != expected_frame_id {s.expected_frame_id!r}")
        if frame.camera_info.header.frame_id != image_frame:
            problems.append(
                f"camera_info frame {frame.camera_info.header.frame_id!r} != image frame {image_frame!r}"
            )
        detections_frame = frame.detections.header.frame_id
        if detections_frame and detections_frame != image_frame:
            problems.append(f"detections frame {detections_frame!r} != image frame {image_frame!r}")
        if problems and s.frame_id_check != "off":
            text = "mismatched frame ids: " + "; ".join(problems)
            if s.frame_id_check == "strict":
                return text + " (set frame_id_check to warn to refine anyway)"
            self._warn("frame-ids", text)
        info = frame.camera_info
        if (
            info.width
            and info.height
            and (info.width, info.height) != (frame.image.width, frame.image.height)
        ):
            return (
                f"camera_info is for {info.width}×{info.height} but the image is "
                f"{frame.image.width}×{frame.image.height}"
            )
        return None

    def _passthrough(self, item: DetectionInput) -> DetectionOutput:
        model = self.registry.models.get(item.class_id) if item.class_id else None
        return DetectionOutput(
            pose=None,
            score=0.0,
            extents=None if model is None else model.extents,
            center=None if model is None else model.center,
        )

    def _refine(
        self, rgb: np.ndarray, K: np.ndarray, inputs: list[DetectionInput], outputs: list[DetectionOutput]
    ) -> tuple[str | None, int]:
        """Refine the usable detections in one engine call, filling ``outputs``; returns (problem, count)."""
        from rnnpose_ros.core.observation import InputError, Observation
        from rnnpose_ros.core.refiner import Instance, RefineStatus

        usable = []
        for item in inputs:
            if item.error is not None:
                self._warn(
                    f"detection:{item.error[:30]}",
                    f"detection {item.instance_id} passed through: {item.error}",
                )
            else:
                usable.append(item)
        if not usable:
            return None, 0
        instances = [Instance(item.class_id, item.pose, item.instance_id) for item in usable]
        try:
            results = self.refiner.refine(Observation(rgb, K), instances)
        except InputError as error:
            return f"engine rejected the input: {error}", 0
        except Exception as error:  # the detections are still published (passed through)
            self.get_logger().error(
                f"engine failed: {error}\n{traceback.format_exc()}", throttle_duration_sec=5.0
            )
            return f"engine failed: {type(error).__name__}: {error}", 0
        count = 0
        for item, result in zip(usable, results, strict=True):
            if result.status is RefineStatus.OK:
                outputs[item.index].pose = np.asarray(result.pose, dtype=np.float64)
                outputs[item.index].score = float(result.score)
                count += 1
            else:
                self._warn(
                    f"status:{result.status.value}",
                    f"detection {item.instance_id} ({item.class_id}) passed through: {result.status.value}: "
                    f"{result.message}",
                )
        return None, count

    def _publish_extras(
        self,
        header: Header,
        rgb: np.ndarray | None,
        K: np.ndarray | None,
        inputs: Sequence[DetectionInput],
        outputs: Sequence[DetectionOutput],
    ) -> None:
        """TF, markers and (when subscribed) the debug overlay for one frame."""
        s = self.settings
        shown = [
            (item, result)
            for item, result in zip(inputs, outputs, strict=True)
            if result.pose is not None and result.score >= s.score_threshold
        ]
        if s.publish_tf and shown:
            if header.frame_id:
                frames = [(s.tf_prefix + item.instance_id, result.pose) for item, result in shown]
                self.tf_broadcaster.sendTransform(object_transforms(header, frames))
            else:
                self._warn("tf-no-frame", "image header.frame_id is empty: no TF published")
        meshes = [
            MeshMarker(
                item.instance_id,
                result.pose,
                self.registry[item.class_id].mesh_path.resolve().as_uri(),
                self.registry[item.class_id].mesh_scale,
            )
            for item, result in shown
        ]
        current = {mesh.instance_id for mesh in meshes}
        if meshes or self._markers_shown:
            self.pub_markers.publish(mesh_markers(header, meshes, sorted(self._markers_shown - current)))
        self._markers_shown = current
        if (
            s.debug_image
            and rgb is not None
            and K is not None
            and self.pub_debug.get_subscription_count() > 0
        ):
            drawings = [
                OverlayObject(model.vertices, model.faces, item.pose, result.pose)
                for item, result in zip(inputs, outputs, strict=True)
                if item.pose is not None and (model := self.registry.models.get(item.class_id)) is not None
            ]
            self.pub_debug.publish(rgb_to_image(overlay_image(rgb, K, drawings), header))

    # --- logging and diagnostics -------------------------------------------------------------------

    def _warn(self, key: str, text: str) -> None:
        if self._throttle.allow(key):
            self.get_logger().warning(text)

    def _record(
        self,
        frame: Frame,
        start: float,
        converted: float,
        refined: float,
        done: float,
        refined_count: int,
        failed_count: int,
        problem: str | None,
    ) -> None:
        stages = {
            "queue": start - frame.queued,
            "convert": converted - start,
            "refine": refined - converted,
            "publish": done - refined,
            "total": done - frame.queued,
        }
        with self.stats.lock:
            self.stats.processed += 1
            self.stats.period_processed += 1
            self.stats.detections_refined += refined_count
            self.stats.detections_failed += failed_count
            for stage, seconds in stages.items():
                self.stats.latency_ms[stage].append(seconds * 1000.0)
            if problem is not None:
                self.stats.frame_errors += 1
                self.stats.last_problem = problem

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        period = max(now - self._period_start, 1e-6)
        self._period_start = now
        s = self.stats
        with s.lock:
            values = {
                "backend": self.settings.backend,
                "device": self.settings.device,
                "synchronizer": compat.IMPLEMENTATION["synchronizer"],
                "input_rate_hz": f"{s.period_synchronised / period:.2f}",
                "output_rate_hz": f"{s.period_processed / period:.2f}",
                "queue_length": str(len(self.queue)),
                "queue_capacity": str(self.queue.capacity),
                "frames_synchronised": str(s.synchronised),
                "frames_processed": str(s.processed),
                "frames_dropped": str(s.dropped),
                "frames_not_refined": str(s.frame_errors),
                "detections_refined": str(s.detections_refined),
                "detections_failed": str(s.detections_failed),
            }
            for topic, count in s.received.items():
                values[f"received_{topic}"] = str(count)
            for topic, count in s.incompatible_qos.items():
                values[f"incompatible_qos_publishers_{topic}"] = str(count)
            for stage, samples in s.latency_ms.items():
                if samples:
                    values[f"latency_{stage}_ms_mean"] = f"{float(np.mean(samples)):.1f}"
                    values[f"latency_{stage}_ms_max"] = f"{float(np.max(samples)):.1f}"
                samples.clear()
            dropped_now, synced_total = s.period_dropped, s.synchronised
            waiting = (
                s.first_input is not None and synced_total == 0 and now - s.first_input > SYNC_HINT_AFTER_S
            )
            received = dict(s.received)
            s.period_synchronised = s.period_processed = s.period_dropped = 0
            if s.last_problem:
                values["last_problem"] = s.last_problem
        level, summary = DiagnosticStatus.OK, "refining"
        if dropped_now:
            level, summary = DiagnosticStatus.WARN, f"dropped {dropped_now} frames in the last {period:.1f} s"
        elif waiting:
            level = DiagnosticStatus.WARN
            summary = (
                f"inputs arrive ({received}) but no image, camera_info and detections share a stamp: "
                "check the detector keeps the image header, or set sync_slop"
            )
            self._warn("no-sync", summary)
        elif not self.warmed_up.is_set():
            summary = "warming up (frames are queued meanwhile)"
        elif synced_total == 0:
            summary = "waiting for image, camera_info and detections"
        status = DiagnosticStatus(
            level=level,
            name=f"{self.get_name()}: refinement",
            message=summary,
            hardware_id=self.settings.device,
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.pub_diagnostics.publish(array)

    def destroy_node(self) -> None:
        """Stop the worker, waiting up to ``SHUTDOWN_WAIT_S`` for the frame in progress (a slow CPU
        refinement or the warm-up is abandoned: the worker is a daemon thread)."""
        if hasattr(self, "queue"):  # absent when the constructor failed
            self.queue.close()
            if self._worker.is_alive() and threading.current_thread() is not self._worker:
                self._worker.join(timeout=SHUTDOWN_WAIT_S)
        super().destroy_node()


# ---------------------------------------------------------------- engine construction


def resolve_device(requested: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if available else "cpu"
    if requested == "cuda" and not available:
        raise ParameterError("parameter 'device' = 'cuda' but torch sees no CUDA device (use auto or cpu)")
    return requested


def resolve_backend(requested: str, registry: Any) -> str:
    """``auto`` → ``rnnpose`` when every registered object has a weights file, else ``classical``."""
    if requested != "auto":
        return requested
    return (
        "rnnpose" if len(registry) and all(model.weights is not None for model in registry) else "classical"
    )


def create_refiner(settings: Settings, registry: Any) -> Any:
    """The engine for ``settings``; resolves ``device``/``backend`` in place and applies iteration counts."""
    from rnnpose_ros.core.backends import BackendError
    from rnnpose_ros.core.refiner import Refiner

    settings.device = resolve_device(settings.device)
    settings.backend = resolve_backend(settings.backend, registry)
    try:
        refiner = Refiner(registry, backend=settings.backend, device=settings.device)
        # Per-object caches (learned: weights + 3D features) are built now, so a missing or broken
        # weights file stops the node at start instead of failing every frame.
        refiner.prepare()
    except BackendError as error:
        raise ParameterError(f"parameter 'backend' = {settings.backend!r}: {error}") from None
    if settings.outer_iterations:
        refiner.config.outer_iterations = settings.outer_iterations
    if settings.inner_iterations:
        refiner.config.inner_steps = settings.inner_iterations
    if settings.restart_below_score >= 0.0:
        refiner.config.restart_below_score = settings.restart_below_score or None
    return refiner


def main(args: list[str] | None = None) -> int:
    """Console entry point ``refine_node``: spin the node until shut down (exit 2 on a parameter error)."""
    rclpy.init(args=args)
    node = None
    try:
        node = RefinerNode()
        rclpy.spin(node)
    except ParameterError as error:
        rclpy.logging.get_logger(NODE_NAME).fatal(str(error))
        return 2
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
