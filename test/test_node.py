"""In-process tests of the ``rnnpose_refiner`` node with real rclpy and DDS (no mocked ROS).

Most tests run the node with a CPU stand-in engine (:class:`ShiftRefiner`, moves every refinable
instance 1 cm along x) so that they check the node's plumbing deterministically and fast; the last
tests run the real :class:`~rnnpose_ros.core.refiner.Refiner` (classical backend, one iteration).
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402
from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from rnnpose_ros.core.observation import InputError, Observation  # noqa: E402
from rnnpose_ros.core.refiner import RefineResult, RefineStatus  # noqa: E402
from rnnpose_ros.ros.conversions import instance_ids, matrix_to_pose, pose_to_matrix, rgb_to_image  # noqa: E402
from rnnpose_ros.ros.node import RefinerNode  # noqa: E402
from rnnpose_ros.ros.parameters import PARAMETERS, ParameterError  # noqa: E402

FRAME = "camera_color_optical_frame"
K = np.array([[572.0, 0.0, 160.0], [0.0, 572.0, 120.0], [0.0, 0.0, 1.0]])
SIZE = (240, 320)
SHIFT_M = 0.01
TIMEOUT_S = 20.0


class ShiftRefiner:
    """Stand-in engine with the engine's API: OK + 1 cm shift along x and score 0.8 per instance,
    UNKNOWN_CLASS / BEHIND_CAMERA like the engine, InputError for a non-positive focal length."""

    def __init__(self, registry: Any):
        self.registry = registry
        self.calls: list[int] = []

    def refine(self, observation: Observation, instances: list, stop: Any = None) -> list[RefineResult]:
        if observation.K[0, 0] <= 0:
            raise InputError("fx must be > 0")
        self.calls.append(len(instances))
        results = []
        for instance in instances:
            pose = np.array(instance.pose, dtype=np.float64)
            status, score = RefineStatus.OK, 0.8
            if instance.class_id not in self.registry:
                status, score = RefineStatus.UNKNOWN_CLASS, 0.0
            elif pose[2, 3] <= 0:
                status, score = RefineStatus.BEHIND_CAMERA, 0.0
            refined = pose.copy()
            if status is RefineStatus.OK:
                refined[0, 3] += SHIFT_M
            results.append(
                RefineResult(
                    instance.class_id, instance.instance_id, refined, pose, score, status, status.value
                )
            )
        return results


class Harness:
    """A client node publishing inputs and collecting the refiner's outputs, spun with the refiner."""

    def __init__(self, context: Any, node: RefinerNode):
        self.node = node
        self.client = rclpy.create_node("test_client", context=context)
        self.outputs: list[Detection3DArray] = []
        self.tf: list[TFMessage] = []
        self.markers: list[MarkerArray] = []
        self.debug: list[Image] = []
        self.diagnostics: list[DiagnosticArray] = []
        name = node.get_fully_qualified_name()
        self.client.create_subscription(Detection3DArray, f"{name}/detections", self.outputs.append, 10)
        self.client.create_subscription(TFMessage, "/tf", self.tf.append, 100)
        self.client.create_subscription(MarkerArray, f"{name}/markers", self.markers.append, 10)
        self.client.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.pub_image = self.client.create_publisher(Image, "image", 10)
        self.pub_info = self.client.create_publisher(CameraInfo, "camera_info", 10)
        self.pub_detections = self.client.create_publisher(Detection3DArray, "detections", 10)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(node)
        self.executor.add_node(self.client)
        self.spin_until(
            lambda: (
                self.pub_detections.get_subscription_count() > 0
                and self.pub_image.get_subscription_count() > 0
            )
        )

    def subscribe_debug(self) -> None:
        self.client.create_subscription(
            Image, f"{self.node.get_fully_qualified_name()}/debug_image", self.debug.append, 2
        )
        self.spin_until(lambda: self.node.pub_debug.get_subscription_count() > 0)

    def spin_until(self, condition: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out waiting for the node"
            self.executor.spin_once(timeout_sec=0.02)

    def send(
        self, image: Image, info: CameraInfo, detections: Detection3DArray, expect: bool = True
    ) -> Detection3DArray | None:
        before = len(self.outputs)
        self.pub_image.publish(image)
        self.pub_info.publish(info)
        self.pub_detections.publish(detections)
        if not expect:
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                self.executor.spin_once(timeout_sec=0.02)
            return None
        self.spin_until(lambda: len(self.outputs) > before)
        return self.outputs[-1]

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.client.destroy_node()


_stamp_counter = iter(range(1, 10_000))


def header(frame: str = FRAME) -> Header:
    h = Header(frame_id=frame)
    h.stamp.sec, h.stamp.nanosec = 1000 + next(_stamp_counter), 123_456_789
    return h


def pose(x: float = 0.0, z: float = 0.5, angle: float = 0.3) -> np.ndarray:
    T = np.eye(4)
    c, s = math.cos(angle), math.sin(angle)
    T[:3, :3] = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    T[:3, 3] = (x, 0.0, z)
    return T


def inputs(
    detections: list[tuple[str, np.ndarray | None, str]], frame: str = FRAME, image: np.ndarray | None = None
) -> tuple[Image, CameraInfo, Detection3DArray]:
    """(image, camera_info, detections) with one shared header; detections = (class, pose, id)."""
    h = header(frame)
    rgb = image if image is not None else np.full((*SIZE, 3), 90, np.uint8)
    info = CameraInfo(header=copy.deepcopy(h), height=rgb.shape[0], width=rgb.shape[1])
    info.k = K.ravel().tolist()
    array = Detection3DArray(header=copy.deepcopy(h))
    for class_id, T, det_id in detections:
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = class_id
        hypothesis.hypothesis.score = 0.5
        if T is not None:
            hypothesis.pose.pose = matrix_to_pose(T)
        array.detections.append(Detection3D(header=copy.deepcopy(h), id=det_id, results=[hypothesis]))
    return rgb_to_image(rgb, h), info, array


def make_node(context: Any, engine: str = "stand-in", **overrides: Any) -> RefinerNode:
    parameters = [Parameter("diagnostics_period", value=0.2), Parameter("warmup", value=False)]
    parameters += [Parameter(name, value=value) for name, value in overrides.items()]
    factory = (lambda settings, registry: ShiftRefiner(registry)) if engine == "stand-in" else None
    return RefinerNode(refiner_factory=factory, context=context, parameter_overrides=parameters)


@pytest.fixture
def harness(context: Any, request: pytest.FixtureRequest) -> Iterator[Harness]:
    overrides = getattr(request, "param", {})
    h = Harness(context, make_node(context, **overrides))
    yield h
    h.close()


# ---------------------------------------------------------------- parameters


def test_parameters_are_declared_with_descriptors(context: Any) -> None:
    node = make_node(context)
    try:
        for spec in PARAMETERS:
            (descriptor,) = node.describe_parameters([spec.name])
            assert descriptor.description, spec.name
            assert descriptor.read_only == (not spec.dynamic), spec.name
        assert node.get_parameter("sync_slop").value == 0.0
        assert node.get_parameter("image_qos").value == "sensor_data"
        (queue,) = node.describe_parameters(["queue_size"])
        assert (queue.integer_range[0].from_value, queue.integer_range[0].to_value) == (1, 1000)
        (threshold,) = node.describe_parameters(["score_threshold"])
        assert threshold.floating_point_range[0].to_value == 1.0
        assert node.settings.backend == "auto"  # the stand-in factory leaves it unresolved
    finally:
        node.destroy_node()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device": "gpu"}, "'device' = 'gpu' is not one of: auto, cuda, cpu"),
        ({"backend": "magic"}, "'backend'"),
        ({"queue_size": 0}, "'queue_size'"),
        ({"sync_slop": -0.5}, "'sync_slop'"),
        ({"sync_slop": 0}, "'sync_slop' must be of type float (write 0.0, not 0)"),
        ({"score_threshold": 1.5}, "'score_threshold'"),
        ({"tf_prefix": "/objects/"}, "'tf_prefix'"),
        ({"image_qos": "fast"}, "'image_qos'"),
        (
            {"objects_file": "/nonexistent/objects.yaml"},
            "'objects_file': /nonexistent/objects.yaml does not exist",
        ),
        ({"outer_iterations": -1}, "'outer_iterations'"),
    ],
)
def test_invalid_parameters_name_the_parameter(context: Any, overrides: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_node(context, **overrides)


def test_cuda_without_gpu_is_a_parameter_error(context: Any) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ParameterError, match="'device' = 'cuda'"):
        make_node(context, engine="real", device="cuda")


def test_parameter_errors_come_before_torch_is_imported() -> None:
    """The cheap checks stay cheap: a bad parameter stops the node before the engine's imports."""
    code = (
        "import sys, rclpy\n"
        "from rclpy.parameter import Parameter\n"
        "from rnnpose_ros.ros.node import RefinerNode\n"
        "from rnnpose_ros.ros.parameters import ParameterError\n"
        "rclpy.init()\n"
        "try:\n"
        "    RefinerNode(parameter_overrides=[Parameter('device', value='gpu')])\n"
        "except ParameterError:\n"
        "    assert 'torch' not in sys.modules, 'torch imported'\n"
        "else:\n"
        "    raise AssertionError('no ParameterError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_runtime_parameters_are_validated(context: Any) -> None:
    node = make_node(context)
    try:
        assert node.set_parameters([Parameter("score_threshold", value=0.5)])[0].successful
        assert node.settings.score_threshold == 0.5
        result = node.set_parameters([Parameter("tf_prefix", value="/bad")])[0]
        assert not result.successful and "tf_prefix" in result.reason
        assert not node.set_parameters([Parameter("device", value="cpu")])[0].successful  # read-only
    finally:
        node.destroy_node()


# ---------------------------------------------------------------- frames


@pytest.mark.parametrize("harness", [{"tf_prefix": "obj_"}], indirect=True)
def test_one_frame_in_one_message_out(harness: Harness) -> None:
    initial = [pose(-0.05), pose(0.0, 0.6), pose(0.05, 0.4)]
    image, info, detections = inputs(
        [("duck", initial[0], ""), ("duck", initial[1], "7"), ("duck", initial[2], "")]
    )
    out = harness.send(image, info, detections)
    assert out.header == image.header
    assert [d.id for d in out.detections] == ["duck_0", "duck_7", "duck_1"]
    model = harness.node.registry["duck"]
    for detection, T0 in zip(out.detections, initial, strict=True):
        assert detection.header == image.header
        (result,) = detection.results
        assert result.hypothesis.class_id == "duck" and result.hypothesis.score == pytest.approx(0.8)
        T = pose_to_matrix(result.pose.pose)[0]
        np.testing.assert_allclose(T[:3, 3], T0[:3, 3] + (SHIFT_M, 0.0, 0.0), atol=1e-9)
        np.testing.assert_allclose(T[:3, :3], T0[:3, :3], atol=1e-9)
        np.testing.assert_allclose(
            [detection.bbox.size.x, detection.bbox.size.y, detection.bbox.size.z], model.extents
        )
    harness.spin_until(lambda: harness.tf and harness.markers)
    transforms = harness.tf[-1].transforms
    assert [t.child_frame_id for t in transforms] == ["obj_duck_0", "obj_duck_7", "obj_duck_1"]
    assert all(t.header.frame_id == FRAME and t.header.stamp == image.header.stamp for t in transforms)
    markers = harness.markers[-1].markers
    assert [(m.ns, m.type, m.action) for m in markers] == [
        (f"rnnpose/{i}", Marker.MESH_RESOURCE, Marker.ADD) for i in ("duck_0", "duck_7", "duck_1")
    ]
    # the default registry's duck lives in this package: rviz elsewhere loads it from its own install
    assert markers[0].mesh_resource == "package://rnnpose_ros/meshes/duck.obj"
    assert markers[0].scale.x == pytest.approx(0.1, rel=1e-3)  # the registry's scale of the duck file

    # the next frame with one duck: the vanished ones are deleted
    image, info, detections = inputs([("duck", initial[0], "")])
    harness.send(image, info, detections)
    harness.spin_until(lambda: len(harness.markers) >= 2)
    actions = {m.ns: m.action for m in harness.markers[-1].markers}
    assert actions == {
        "rnnpose/duck_0": Marker.ADD,
        "rnnpose/duck_7": Marker.DELETE,
        "rnnpose/duck_1": Marker.DELETE,
    }


def test_empty_detections_give_an_empty_message_with_the_image_header(harness: Harness) -> None:
    image, info, detections = inputs([])
    out = harness.send(image, info, detections)
    assert out.header == image.header and len(out.detections) == 0
    assert harness.node.refiner.calls == []  # nothing to refine: the engine is not called


@pytest.mark.parametrize("harness", [{"score_threshold": 0.9}], indirect=True)
def test_score_threshold_gates_tf_but_not_detections(harness: Harness) -> None:
    image, info, detections = inputs([("duck", pose(), "")])
    out = harness.send(image, info, detections)
    assert out.detections[0].results[0].hypothesis.score == pytest.approx(0.8)
    harness.send(*inputs([], frame=FRAME))
    assert harness.tf == []


def test_debug_image_only_when_subscribed(harness: Harness) -> None:
    harness.send(*inputs([("duck", pose(), "")]))
    harness.spin_until(lambda: harness.node.diagnostics.stats.processed == 1)  # frame fully handled
    harness.subscribe_debug()
    assert harness.debug == []
    image, info, detections = inputs([("duck", pose(), "")])
    harness.send(image, info, detections)
    harness.spin_until(lambda: harness.debug)
    overlay = harness.debug[-1]
    assert (
        overlay.header == image.header
        and (overlay.height, overlay.width) == SIZE
        and overlay.encoding == "rgb8"
    )
    pixels = np.frombuffer(overlay.data, np.uint8).reshape(*SIZE, 3)
    assert (pixels == 255).all(axis=2).any()  # the initial pose in white
    assert ((pixels[..., 0] == 255) & (pixels[..., 1] == 0)).any()  # the refined pose in red


def _truncate(image: Image) -> None:
    image.data = bytes(image.data)[: len(image.data) // 2]


def _nan_quaternion(detections: Detection3DArray) -> None:
    detections.detections[1].results[0].pose.pose.orientation.x = math.nan


def _zero_quaternion(detections: Detection3DArray) -> None:
    q = detections.detections[1].results[0].pose.pose.orientation
    q.x = q.y = q.z = q.w = 0.0


# Each bad input: (what to break, where, which detections stay refined, reason logged).
FRAME_PROBLEMS: dict[str, Callable[[Image, CameraInfo, Detection3DArray], None]] = {
    "truncated image": lambda image, info, dets: _truncate(image),
    "unsupported encoding": lambda image, info, dets: setattr(image, "encoding", "yuv422"),
    "zero intrinsics": lambda image, info, dets: setattr(info, "k", [0.0] * 9),
    "NaN intrinsics": lambda image, info, dets: setattr(info, "k", [math.nan] * 9),
    "camera_info frame mismatch": lambda image, info, dets: setattr(info.header, "frame_id", "other_frame"),
    "detections frame mismatch": lambda image, info, dets: setattr(dets.header, "frame_id", "other_frame"),
    "camera_info for another size": lambda image, info, dets: setattr(info, "width", 640),
}
DETECTION_PROBLEMS: dict[str, Callable[[Image, CameraInfo, Detection3DArray], None]] = {
    "NaN quaternion": lambda image, info, dets: _nan_quaternion(dets),
    "zero quaternion": lambda image, info, dets: _zero_quaternion(dets),
    "unknown class": lambda image, info, dets: setattr(
        dets.detections[1].results[0].hypothesis, "class_id", "cat"
    ),
    "behind camera": lambda image, info, dets: setattr(
        dets.detections[1].results[0].pose.pose.position, "z", -0.5
    ),
    "no results": lambda image, info, dets: dets.detections[1].results.clear(),
}


POSELESS_IDS = {
    "NaN quaternion": ["duck_0", "duck_1_1", "duck_1"],
    "zero quaternion": ["duck_0", "duck_1_1", "duck_1"],
    "no results": ["duck_0", "unknown_0", "duck_1"],
}


@pytest.mark.parametrize("problem", list(FRAME_PROBLEMS) + list(DETECTION_PROBLEMS))
def test_bad_input_is_passed_through_and_the_node_keeps_going(harness: Harness, problem: str) -> None:
    image, info, detections = inputs(
        [("duck", pose(-0.05), ""), ("duck", pose(0.0), ""), ("duck", pose(0.05), "")]
    )
    source_pose = detections.detections[1].results[0].pose
    (FRAME_PROBLEMS | DETECTION_PROBLEMS)[problem](image, info, detections)
    out = harness.send(image, info, detections)
    assert out.header == image.header and len(out.detections) == 3
    # A fresh node remembers no instance: the detections with a usable pose are numbered per class in
    # input order; one without keeps its per-frame id, suffixed with its index when a usable one took it.
    assert [d.id for d in out.detections] == POSELESS_IDS.get(
        problem,
        instance_ids(
            [d.results[0].hypothesis.class_id if d.results else "" for d in detections.detections],
            ["", "", ""],
        ),
    )
    scores = [d.results[0].hypothesis.score for d in out.detections]
    if problem in FRAME_PROBLEMS:
        assert scores == [0.0, 0.0, 0.0]
    else:
        assert scores == pytest.approx([0.8, 0.0, 0.8])
        assert len(out.detections[1].results) == 1  # never an empty results list
        if problem not in ("no results", "NaN quaternion"):  # (NaN != NaN)
            assert out.detections[1].results[0].pose == source_pose  # passed through verbatim
    # the node is still alive and refines the next good frame
    out = harness.send(*inputs([("duck", pose(), "")]))
    assert out.detections[0].results[0].hypothesis.score == pytest.approx(0.8)
    harness.spin_until(lambda: harness.node.diagnostics.stats.processed == 2)  # recorded after publishing


@pytest.mark.parametrize("harness", [{"frame_id_check": "warn"}], indirect=True)
def test_frame_id_check_warn_refines_anyway(harness: Harness) -> None:
    image, info, detections = inputs([("duck", pose(), "")])
    detections.header.frame_id = "detector_frame"
    out = harness.send(image, info, detections)
    assert out.detections[0].results[0].hypothesis.score == pytest.approx(0.8)


@pytest.mark.parametrize("harness", [{"sync_slop": 0.05}], indirect=True)
def test_approximate_sync_accepts_restamped_detections(harness: Harness) -> None:
    image, info, detections = inputs([("duck", pose(), "")])
    detections.header.stamp.nanosec += 20_000_000
    out = harness.send(image, info, detections)
    assert out.header == image.header and len(out.detections) == 1


def test_unmatched_stamps_produce_nothing_and_diagnostics_say_why(harness: Harness) -> None:
    image, info, detections = inputs([("duck", pose(), "")])
    detections.header.stamp.sec += 1
    harness.send(image, info, detections, expect=False)
    assert harness.outputs == []
    harness.spin_until(lambda: harness.diagnostics)
    values = {kv.key: kv.value for kv in harness.diagnostics[-1].status[0].values}
    assert values["received_detections"] == "1" and values["frames_synchronised"] == "0"


def test_incompatible_detections_qos_is_reported(harness: Harness) -> None:
    best_effort = QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)
    harness.client.create_publisher(Detection3DArray, "detections", best_effort)
    harness.spin_until(lambda: harness.node.diagnostics.stats.incompatible_qos.get("detections", 0) >= 1)
    assert "detections_qos" in harness.node.diagnostics.stats.last_problem


def test_diagnostics_report_counts_and_latency(harness: Harness) -> None:
    harness.send(*inputs([("duck", pose(), ""), ("cat", pose(), "")]))
    harness.spin_until(lambda: harness.node.diagnostics.stats.processed == 1)
    harness.diagnostics.clear()
    harness.spin_until(lambda: harness.diagnostics)
    (status,) = harness.diagnostics[-1].status
    values = {kv.key: kv.value for kv in status.values}
    assert status.name == "rnnpose_refiner: refinement"
    assert values["frames_processed"] == "1" and values["detections_refined"] == "1"
    assert values["detections_failed"] == "1" and values["frames_dropped"] == "0"
    for key in ("input_rate_hz", "queue_length", "queue_capacity", "synchronizer"):
        assert key in values


def test_frame_queue_drops_the_oldest(context: Any) -> None:
    """A busy engine: frames beyond max_pending_frames are dropped (counted), the newest is refined."""
    node = make_node(context, max_pending_frames=1)
    harness = Harness(context, node)
    entered, release = threading.Event(), threading.Event()
    original = node.refiner.refine

    def blocking(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(timeout=TIMEOUT_S)
        return original(*args, **kwargs)

    node.refiner.refine = blocking
    try:
        sent = []
        for count in range(1, 5):
            frame = inputs([("duck", pose(), "")])
            sent.append(frame[0].header.stamp)
            harness.pub_image.publish(frame[0])
            harness.pub_info.publish(frame[1])
            harness.pub_detections.publish(frame[2])
            harness.spin_until(lambda count=count: node.diagnostics.stats.synchronised >= count)
            if count == 1:
                harness.spin_until(entered.is_set)  # frame 1 is in the engine, the queue is empty
        release.set()
        harness.spin_until(lambda: len(harness.outputs) >= 2)
        assert [out.header.stamp for out in harness.outputs] == [sent[0], sent[3]]  # 2 and 3 dropped
        assert node.diagnostics.stats.dropped == 2
    finally:
        release.set()
        harness.close()


# ---------------------------------------------------------------- the real engine


def real_engine_harness(context: Any) -> Harness:
    """The classical engine on the CPU with the shortest schedule (1 × 1 steps, no restarts)."""
    return Harness(
        context,
        make_node(
            context,
            engine="real",
            device="cpu",
            outer_iterations=1,
            inner_iterations=1,
            restart_below_score=0.0,
        ),
    )


def test_real_engine_reports_failures_per_detection(context: Any) -> None:
    """The classical engine (1 iteration): unknown class and behind-camera detections pass through."""
    harness = real_engine_harness(context)
    try:
        assert harness.node.settings.backend == "classical"
        assert harness.node.refiner.config.restart_below_score is None  # 0 = never
        behind = pose(z=-0.5)
        out = harness.send(*inputs([("cat", pose(), ""), ("duck", behind, "")]))
        assert [d.results[0].hypothesis.score for d in out.detections] == [0.0, 0.0]
        np.testing.assert_allclose(
            pose_to_matrix(out.detections[1].results[0].pose.pose)[0], behind, atol=1e-9
        )
    finally:
        harness.close()


def test_real_engine_refines_a_synthetic_frame(context: Any) -> None:
    synth = pytest.importorskip("rnnpose_ros.core.synth")
    from rnnpose_ros.core.render import Renderer

    harness = real_engine_harness(context)
    try:
        scene = synth.make_scene(
            [harness.node.registry["duck"]], 7, Renderer(), synth.SceneSpec(size=SIZE, K=K)
        )
        truth = scene.instances[0]
        out = harness.send(*inputs([("duck", truth.pose_init, "")], image=scene.image))
        (detection,) = out.detections
        score = detection.results[0].hypothesis.score
        assert 0.0 <= score <= 1.0
        assert np.isfinite(pose_to_matrix(detection.results[0].pose.pose)[0]).all()
    finally:
        harness.close()
