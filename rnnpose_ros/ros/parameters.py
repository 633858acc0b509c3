"""Node parameters from one declarative table: declaration, validation and a typed settings object.

A node lists its parameters as :class:`ParameterSpec` rows (name, default — whose Python type is the
ROS type —, description, allowed values or range, an optional further check, whether it may change at
run time) and calls :func:`declare_settings`, which declares every row with a full descriptor,
validates the values and returns them as the node's settings dataclass (one field per row). A value
the node cannot start with raises :class:`ParameterError` naming the parameter. Rows marked
``dynamic`` are validated the same way when they change at run time and then updated in place on the
settings object.

:data:`PARAMETERS` and :class:`Settings` are the ``rnnpose_refiner`` node's table; the scene player
declares its own table through the same function. The ``backend`` row takes its choices and help
from the backend registry, and :func:`resolve_backend` applies the ``auto`` rule that row describes.

Threading: run-time changes are applied in the executor thread (one attribute assignment each) while
the node's worker reads the settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data, qos_profile_system_default

from rnnpose_ros.core.backends import BACKENDS, backend_help
from rnnpose_ros.package_files import default_objects_file

SettingsT = TypeVar("SettingsT")
QOS_CHOICES = ("sensor_data", "reliable", "system_default")


class ParameterError(ValueError):
    """A parameter value the node cannot start with (the message names the parameter)."""


@dataclass(frozen=True)
class ParameterSpec:
    """One row of a parameter table.

    Attributes:
        name: the parameter (and settings field) name.
        default: the default value; its Python type is the parameter's ROS type.
        description: one or two sentences for ``ros2 param describe``.
        choices: the allowed values of a string parameter (empty = any).
        int_range, float_range: inclusive bounds of a numeric parameter.
        dynamic: whether it may change while the node runs.
        check: a further check of the value, ``check(name, value) -> value`` (the value may come back
            converted, e.g. a path resolved), raising ParameterError.
    """

    name: str
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    int_range: tuple[int, int] | None = None
    float_range: tuple[float, float] | None = None
    dynamic: bool = False
    check: Callable[[str, Any], Any] | None = None

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


def validate_parameter(spec: ParameterSpec, value: Any) -> Any:
    """``value`` of ``spec`` after the checks the descriptor cannot express (choices, finite, range,
    ``spec.check``); raises ParameterError naming the parameter."""
    name = spec.name
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
    return value if spec.check is None else spec.check(name, value)


def declare_settings(
    node: Node, specs: Sequence[ParameterSpec], settings_type: Callable[..., SettingsT]
) -> SettingsT:
    """Declare every row of ``specs`` on ``node``, validate the values and return
    ``settings_type(name=value, ...)``; changes of ``dynamic`` rows are validated and then applied to
    that object. Raises ParameterError naming the first unusable parameter."""
    settings = settings_type(**{spec.name: _declare(node, spec) for spec in specs})
    dynamic = {spec.name: spec for spec in specs if spec.dynamic}
    if dynamic:
        node.add_on_set_parameters_callback(lambda parameters: _apply_changes(parameters, dynamic, settings))
    return settings


def _declare(node: Node, spec: ParameterSpec) -> Any:
    try:
        value = node.declare_parameter(spec.name, spec.default, spec.descriptor()).value
    except InvalidParameterTypeException:
        raise _wrong_type(spec) from None
    except InvalidParameterValueException as error:
        raise ParameterError(f"parameter {spec.name!r}: {error}") from None
    return validate_parameter(spec, value)


def _wrong_type(spec: ParameterSpec, detail: str = "") -> ParameterError:
    """The error for a value of another type than ``spec.default``'s (``detail`` says what came)."""
    hint = " (write 0.0, not 0)" if isinstance(spec.default, float) else ""
    return ParameterError(
        f"parameter {spec.name!r} must be of type {type(spec.default).__name__}{hint}{detail}"
    )


def _apply_changes(
    parameters: Iterable[Parameter], dynamic: dict[str, ParameterSpec], settings: Any
) -> SetParametersResult:
    """All or nothing: every changed row is validated before any is applied. Read-only rows never get
    here (rclpy rejects them first); parameters outside the table are left to rclpy."""
    updates = {}
    for parameter in parameters:
        if parameter.name in dynamic:
            try:
                updates[parameter.name] = validate_parameter(dynamic[parameter.name], parameter.value)
            except ParameterError as error:
                return SetParametersResult(successful=False, reason=str(error))
    for name, value in updates.items():
        setattr(settings, name, value)
    return SetParametersResult(successful=True)


# ---------------------------------------------------------------- checks shared by the tables


def objects_file_path(name: str, value: str) -> Path:
    """The object registry file named by ``value`` (``""`` = the package's ``config/objects.yaml``),
    resolved; it must exist."""
    path = Path(value).expanduser() if value else default_objects_file()
    if not path.is_file():
        raise ParameterError(f"parameter {name!r}: {path} does not exist")
    return path.resolve()


def tf_frame_text(name: str, value: str) -> str:
    """A TF frame id or prefix: no leading ``/``, no white space."""
    if value.startswith("/") or any(c.isspace() for c in value):
        raise ParameterError(
            f"parameter {name!r} = {value!r}: TF frame ids may not start with '/' or contain spaces"
        )
    return value


# ---------------------------------------------------------------- what values mean


def _backend_by_weights(needs_weights: bool) -> str:
    """The first registered backend that does (or does not) need a weights file per object."""
    return next(info.name for info in BACKENDS.values() if info.needs_weights == needs_weights)


AUTO_BACKEND_RULE = (
    f"auto = {_backend_by_weights(True)} when every registered object has a weights file, else "
    f"{_backend_by_weights(False)}"
)


def resolve_backend(requested: str, registry: Any) -> str:
    """The backend name for the ``backend`` parameter value (:data:`AUTO_BACKEND_RULE` for ``auto``)."""
    if requested != "auto":
        return requested
    weighted = len(registry) > 0 and all(model.weights is not None for model in registry)
    return _backend_by_weights(weighted)


def resolve_device(requested: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch  # heavy: only once the cheap parameter checks passed

    available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if available else "cpu"
    if requested == "cuda" and not available:
        raise ParameterError("parameter 'device' = 'cuda' but torch sees no CUDA device (use auto or cpu)")
    return requested


def qos_profile(name: str, depth: int) -> QoSProfile:
    """QoS of an input subscription from an ``image_qos`` / ``detections_qos`` value (:data:`QOS_CHOICES`)."""
    if name == "sensor_data":
        base = qos_profile_sensor_data
    elif name == "reliable":
        base = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)
    else:
        base = qos_profile_system_default
    return QoSProfile(
        history=base.history, depth=depth, reliability=base.reliability, durability=base.durability
    )


# ---------------------------------------------------------------- the refiner node's table


PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec(
        "objects_file",
        "",
        "Object registry YAML (class_id -> mesh, scale, symmetric, weights). Empty = the package's "
        "config/objects.yaml.",
        check=objects_file_path,
    ),
    ParameterSpec(
        "device", "auto", "Torch device; auto = cuda when available, else cpu.", ("auto", "cuda", "cpu")
    ),
    ParameterSpec(
        "backend",
        "auto",
        f"Correspondence backend; {AUTO_BACKEND_RULE}. {backend_help()}.",
        ("auto", *BACKENDS),
    ),
    ParameterSpec(
        "num_threads",
        0,
        "CPU threads of the engine's tensor operations (applied at start); 0 = the cores this process may "
        "use. OpenMP threads wait passively unless OMP_WAIT_POLICY is set.",
        int_range=(0, 256),
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
        "mode",
        "detect",
        "detect = refine every synchronised image + camera_info + detections set (output per detections "
        "message); track = image + camera_info drive the output, every live track is refined from its "
        "previous pose with a short schedule, and detections (at their own rate) seed tracks.",
        ("detect", "track"),
    ),
    ParameterSpec(
        "track_iterations",
        1,
        "Track mode: render iterations per image and track (the last ones of the backend's schedule).",
        int_range=(1, 20),
    ),
    ParameterSpec(
        "track_lost_below_score",
        0.1,
        "Track mode: a tracking refinement that fails, scores below this, or scores below half the "
        "score of the full refinement that started the track is weak.",
        float_range=(0.0, 1.0),
    ),
    ParameterSpec(
        "track_lost_after_frames",
        3,
        "Track mode: consecutive weak images after which a track is lost (dropped from TF, reported).",
        int_range=(1, 100),
    ),
    ParameterSpec(
        "detection_tolerance",
        0.1,
        "Track mode: largest stamp difference (s) between a detections message and the image it seeds.",
        float_range=(0.0, 10.0),
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
        "tf_prefix",
        "",
        "Prefix of the object TF frames <tf_prefix><class_id>_<index>.",
        dynamic=True,
        check=tf_frame_text,
    ),
    ParameterSpec("publish_tf", True, "Broadcast one TF frame per refined detection on /tf.", dynamic=True),
    ParameterSpec(
        "output_frame",
        "",
        "Frame of the output poses, boxes and TF parents (e.g. base_link), looked up with tf2 at the image "
        "stamp; empty = the image frame. Needs tf2_ros (a ROS 2 distribution).",
        check=tf_frame_text,
    ),
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
        "max_detections_per_frame",
        16,
        "Detections refined per frame at most (the first ones, in input order); the rest are passed "
        "through with score 0, warned about and counted in /diagnostics.",
        int_range=(1, 1000),
    ),
    ParameterSpec(
        "image_qos",
        "sensor_data",
        "QoS of the image and camera_info subscriptions (sensor_data = best effort, accepts any publisher).",
        QOS_CHOICES,
    ),
    ParameterSpec(
        "detections_qos",
        "reliable",
        "QoS of the detections subscription (reliable does not match a best-effort publisher).",
        QOS_CHOICES,
    ),
    ParameterSpec(
        "use_depth",
        False,
        "Subscribe to depth (sensor_msgs/Image, 16UC1 mm or 32FC1 m, registered to the colour image) and "
        "refine with it; each frame waits up to depth_timeout for the depth image of its stamp (within "
        "sync_slop), then is refined RGB-only with a warning. false = RGB only, no depth subscription.",
    ),
    ParameterSpec(
        "depth_timeout",
        0.5,
        "Seconds a synchronised frame waits for its depth image when use_depth is true (0.0 = only a "
        "depth image that already arrived is used).",
        float_range=(0.0, 10.0),
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
        check=tf_frame_text,
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
    ParameterSpec(
        "autostart",
        True,
        "Configure and activate the (lifecycle) node at start; false = start unconfigured and wait for "
        "lifecycle transitions (configure, activate).",
    ),
    ParameterSpec(
        "max_pending_requests",
        16,
        "~/refine calls waiting for the worker at most; a call beyond them is refused with a message.",
        int_range=(1, 1000),
    ),
)


@dataclass
class Settings:
    """Validated values of the refiner node's :data:`PARAMETERS` (one field per row, same meaning).

    ``device`` and ``backend`` hold the requested values until the engine is built, then the resolved
    ones (:func:`resolve_device`, :func:`resolve_backend`).
    """

    objects_file: Path
    device: str
    backend: str
    num_threads: int
    outer_iterations: int
    inner_iterations: int
    restart_below_score: float
    mode: str
    track_iterations: int
    track_lost_below_score: float
    track_lost_after_frames: int
    detection_tolerance: float
    score_threshold: float
    tf_prefix: str
    publish_tf: bool
    output_frame: str
    sync_slop: float
    queue_size: int
    max_pending_frames: int
    max_detections_per_frame: int
    image_qos: str
    detections_qos: str
    use_depth: bool
    depth_timeout: float
    debug_image: bool
    frame_id_check: str
    expected_frame_id: str
    warmup: bool
    diagnostics_period: float
    autostart: bool
    max_pending_requests: int


# ---------------------------------------------------------------- the command line


def check_command_line(args: Sequence[str], specs: Sequence[ParameterSpec], node_name: str) -> None:
    """Check what ``--ros-args`` gives the node before rclpy reads it: every ``--params-file`` exists
    and is YAML, and every ``-p name:=value`` of a row of ``specs`` has the row's type.

    rclpy reports a missing or malformed parameters file as a wall of RCL errors, and silently drops a
    ``-p`` value whose type differs from the same parameter's value in a parameters file; both must
    instead stop the node with one line naming the file or the parameter.

    Raises:
        ParameterError: naming the file or the parameter.
    """
    import yaml

    rows = {spec.name: spec for spec in specs}
    for flag, value in _ros_arguments(args):
        if flag == "--params-file":
            path = Path(value).expanduser()
            if not path.is_file():
                raise ParameterError(f"--params-file {value}: no such file")
            try:
                yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                reason = str(error).splitlines()[0]
                raise ParameterError(
                    f"--params-file {value}: not a YAML parameters file ({reason})"
                ) from None
            continue
        name, separator, text = value.partition(":=")
        owner, _, name = name.rpartition(":")
        if not separator or owner not in ("", node_name) or name not in rows:
            continue
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = text
        if type(parsed) is not type(rows[name].default):
            raise _wrong_type(rows[name], f", got {text!r} from -p")


def _ros_arguments(args: Sequence[str]) -> list[tuple[str, str]]:
    """``(flag, value)`` of every ``-p``/``--param`` and ``--params-file`` inside ``--ros-args`` sections."""
    found, inside, tokens = [], False, list(args)
    for index, token in enumerate(tokens):
        if token == "--ros-args":
            inside = True
        elif token == "--":
            inside = False
        elif inside and token in ("-p", "--param", "--params-file") and index + 1 < len(tokens):
            found.append(("--params-file" if token == "--params-file" else "-p", tokens[index + 1]))
    return found
