"""``process_frame`` without a node: real ROS message classes, a scripted stand-in engine, no rclpy.init.

Each test builds one synchronised :class:`~rnnpose_ros.ros.inputs.Frame`, breaks something, and checks
the :class:`~rnnpose_ros.ros.frame_processor.FrameOutcome`: one output per detection in input order,
the reason a frame was not refined, and the warnings keyed by reason.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Header
from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose

from rnnpose_ros.core.objects import ObjectRegistry
from rnnpose_ros.core.observation import InputError, Observation
from rnnpose_ros.core.refiner import Instance, RefineResult, RefineStatus
from rnnpose_ros.package_files import default_objects_file
from rnnpose_ros.ros.conversions import depth_to_image, matrix_to_pose, rgb_to_image
from rnnpose_ros.ros.frame_processor import process_frame
from rnnpose_ros.ros.inputs import Frame
from rnnpose_ros.ros.parameters import PARAMETERS, Settings

FRAME_ID = "camera_color_optical_frame"
K = np.array([[572.0, 0.0, 160.0], [0.0, 572.0, 120.0], [0.0, 0.0, 1.0]])
SIZE = (240, 320)
SHIFT_M = 0.01


class ScriptedRefiner:
    """Stand-in engine with the engine's ``refine(observation, instances)``: OK, 1 cm along x and
    score 0.8 per instance unless ``statuses`` names another status for its instance id; raises
    ``error`` instead when given. Records every call."""

    def __init__(self, statuses: dict[str, RefineStatus] | None = None, error: Exception | None = None):
        self.statuses = statuses or {}
        self.error = error
        self.calls: list[tuple[Observation, list[Instance]]] = []

    def refine(
        self, observation: Observation, instances: list[Instance], stop: Any = None
    ) -> list[RefineResult]:
        self.calls.append((observation, instances))
        if self.error is not None:
            raise self.error
        results = []
        for instance in instances:
            status = self.statuses.get(instance.instance_id, RefineStatus.OK)
            pose = np.array(instance.pose, dtype=np.float64)
            refined = pose.copy()
            if status is RefineStatus.OK:
                refined[0, 3] += SHIFT_M
            score = 0.8 if status is RefineStatus.OK else 0.0
            results.append(
                RefineResult(instance.class_id, instance.instance_id, refined, pose, score, status, "why")
            )
        return results


@pytest.fixture(scope="module")
def registry() -> ObjectRegistry:
    return ObjectRegistry.from_yaml(default_objects_file())


def settings(**overrides: Any) -> Settings:
    return Settings(**({spec.name: spec.default for spec in PARAMETERS} | overrides))


def pose(x: float = 0.0, z: float = 0.5) -> np.ndarray:
    T = np.eye(4)
    T[:3, 3] = (x, 0.0, z)
    return T


def frame(*poses: np.ndarray) -> Frame:
    """One frame of a grey image with one duck detection per pose (ids duck_0, duck_1, ...)."""
    header = Header(frame_id=FRAME_ID)
    header.stamp.sec, header.stamp.nanosec = 1000, 5
    info = CameraInfo(header=copy.deepcopy(header), height=SIZE[0], width=SIZE[1])
    info.k = K.ravel().tolist()
    detections = Detection3DArray(header=copy.deepcopy(header))
    for T in poses:
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = "duck"
        hypothesis.pose.pose = matrix_to_pose(T)
        detections.detections.append(Detection3D(header=copy.deepcopy(header), results=[hypothesis]))
    image = rgb_to_image(np.full((*SIZE, 3), 90, np.uint8), header)
    return Frame(image=image, camera_info=info, detections=detections, queued=0.0)


def test_usable_detections_are_refined_in_one_engine_call(registry: ObjectRegistry) -> None:
    engine = ScriptedRefiner()
    initial = [pose(-0.05), pose(0.05, 0.6)]
    outcome = process_frame(frame(*initial), engine, settings(), registry)
    ((observation, instances),) = engine.calls
    assert observation.image.shape == (*SIZE, 3)
    np.testing.assert_allclose(observation.K, K)
    assert [i.instance_id for i in instances] == ["duck_0", "duck_1"]
    assert outcome.problem is None and outcome.warnings == {} and outcome.engine_failure is None
    assert (outcome.refined_count, outcome.failed_count) == (2, 0)
    for output, T0 in zip(outcome.outputs, initial, strict=True):
        np.testing.assert_allclose(output.pose[:3, 3], T0[:3, 3] + (SHIFT_M, 0.0, 0.0))
        assert output.score == pytest.approx(0.8)
        np.testing.assert_allclose(output.extents, registry["duck"].extents)
    assert outcome.convert_s >= 0.0 and outcome.refine_s >= 0.0


def test_empty_detections_do_not_call_the_engine(registry: ObjectRegistry) -> None:
    engine = ScriptedRefiner()
    outcome = process_frame(frame(), engine, settings(), registry)
    assert engine.calls == [] and outcome.outputs == [] and outcome.problem is None


def test_unusable_and_failed_detections_pass_through_with_one_warning_per_reason(
    registry: ObjectRegistry,
) -> None:
    f = frame(pose(-0.05), pose(0.0), pose(0.05), pose(0.1))
    f.detections.detections[0].results.clear()
    f.detections.detections[1].results.clear()  # the same reason again: one warning
    engine = ScriptedRefiner({"duck_1": RefineStatus.BEHIND_CAMERA})  # the 4th detection is duck_1
    outcome = process_frame(f, engine, settings(), registry)
    ((_, instances),) = engine.calls
    assert [i.instance_id for i in instances] == ["duck_0", "duck_1"]  # ids count the usable ones
    assert [o.score for o in outcome.outputs] == pytest.approx([0.0, 0.0, 0.8, 0.0])
    assert [o.pose is None for o in outcome.outputs] == [True, True, False, True]
    assert (outcome.refined_count, outcome.failed_count) == (1, 3)
    assert outcome.problem is None
    detection_keys = [key for key in outcome.warnings if key.startswith("detection:")]
    assert len(detection_keys) == 1
    assert outcome.warnings[detection_keys[0]].startswith("detection unknown_0 passed through: ")
    assert outcome.warnings["status:behind_camera"] == (
        "detection duck_1 (duck) passed through: behind_camera: why"
    )


def _other_camera_frame(f: Frame) -> None:
    f.camera_info.header.frame_id = "other_frame"


def _other_size(f: Frame) -> None:
    f.camera_info.width = 640


def _truncated_image(f: Frame) -> None:
    f.image.data = bytes(f.image.data)[:100]


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        (_other_camera_frame, "mismatched frame ids: camera_info frame 'other_frame' != image frame"),
        (_other_size, "camera_info is for 640×240 but the image is 320×240"),
        (_truncated_image, "truncated image data"),
    ],
)
def test_a_bad_frame_passes_every_detection_through_without_an_engine_call(
    registry: ObjectRegistry, breakage: Any, reason: str
) -> None:
    f = frame(pose(-0.05), pose(0.05))
    breakage(f)
    engine = ScriptedRefiner()
    outcome = process_frame(f, engine, settings(), registry)
    assert engine.calls == [] and outcome.observation is None
    assert outcome.problem is not None and outcome.problem.startswith(reason)
    assert [(o.pose, o.score) for o in outcome.outputs] == [(None, 0.0), (None, 0.0)]
    assert outcome.failed_count == 2
    assert list(outcome.warnings.values()) == [f"frame 1000.000000005 not refined: {outcome.problem}"]


def test_frame_id_check_warn_refines_and_warns(registry: ObjectRegistry) -> None:
    f = frame(pose())
    f.detections.header.frame_id = "detector_frame"
    outcome = process_frame(f, ScriptedRefiner(), settings(frame_id_check="warn"), registry)
    assert outcome.problem is None and outcome.refined_count == 1
    assert "detections frame 'detector_frame' != image frame" in outcome.warnings["frame-ids"]
    outcome = process_frame(f, ScriptedRefiner(), settings(frame_id_check="off"), registry)
    assert outcome.warnings == {} and outcome.refined_count == 1


def test_expected_frame_id_is_checked(registry: ObjectRegistry) -> None:
    outcome = process_frame(frame(pose()), ScriptedRefiner(), settings(expected_frame_id="cam"), registry)
    assert "image frame 'camera_color_optical_frame' != expected_frame_id 'cam'" in outcome.problem


def test_fixable_input_is_refined_with_warnings(registry: ObjectRegistry) -> None:
    f = frame(pose())
    f.camera_info.d = [0.1, 0.0, 0.0, 0.0, 0.0]
    f.detections.detections[0].results[0].pose.pose.orientation.w = 2.0  # normalised, with a warning
    outcome = process_frame(f, ScriptedRefiner(), settings(), registry)
    assert outcome.refined_count == 1 and outcome.problem is None
    assert outcome.warnings["distortion"].startswith("camera_info has non-zero distortion")
    assert outcome.warnings["detection-warning:quaternion"].startswith("detection duck_0: quaternion norm 2")


def test_engine_errors_pass_the_frame_through_and_keep_the_image(registry: ObjectRegistry) -> None:
    outcome = process_frame(frame(pose()), ScriptedRefiner(error=InputError("fx bad")), settings(), registry)
    assert outcome.problem == "engine rejected the input: fx bad" and outcome.engine_failure is None
    assert outcome.outputs[0].pose is None

    outcome = process_frame(frame(pose()), ScriptedRefiner(error=RuntimeError("boom")), settings(), registry)
    assert outcome.problem == "engine failed: RuntimeError: boom"
    assert outcome.engine_failure.startswith("engine failed: boom\nTraceback")
    assert outcome.outputs[0].pose is None and outcome.outputs[0].score == 0.0
    assert outcome.observation is not None  # the debug overlay still shows the input poses
    assert outcome.failed_count == 1


def test_detections_beyond_the_limit_pass_through_and_are_counted(registry: ObjectRegistry) -> None:
    engine = ScriptedRefiner()
    f = frame(*[pose(0.01 * k) for k in range(20)])
    outcome = process_frame(f, engine, settings(max_detections_per_frame=16), registry)
    ((_, instances),) = engine.calls
    assert len(instances) == 16 and outcome.over_limit == 4
    assert [o.pose is None for o in outcome.outputs] == [False] * 16 + [True] * 4
    assert "first 16 are refined, 4 passed through" in outcome.warnings["too-many-detections"]


def test_warnings_are_keyed_by_reason_not_by_text(registry: ObjectRegistry) -> None:
    """Frames that fail for one reason with different details share one throttle key."""
    keys = set()
    for encoding in ("yuv422", "nv12", "foo"):
        f = frame(pose())
        f.image.encoding = encoding
        keys |= set(process_frame(f, ScriptedRefiner(), settings(), registry).warnings)
    for length in (10, 1000, 5000):
        f = frame(pose())
        f.image.data = bytes(f.image.data[:length])
        keys |= set(process_frame(f, ScriptedRefiner(), settings(), registry).warnings)
    for position in ((float("nan"), 0.0, 0.5), (float("inf"), 1.0, 0.5)):
        f = frame(pose())
        p = f.detections.detections[0].results[0].pose.pose.position
        p.x, p.y, p.z = position
        keys |= set(process_frame(f, ScriptedRefiner(), settings(), registry).warnings)
    assert keys == {"frame:ImageConversionError", "detection:invalid-pose"}


# ---------------------------------------------------------------- depth


@pytest.fixture(scope="module")
def depth_m(renderer: Any, registry: ObjectRegistry) -> np.ndarray:
    """(240, 320) float32 metres: the duck rendered at ``pose()``, 0 around it."""
    depth = renderer.render([registry["duck"]], pose(), K, SIZE).depth[0]
    assert (depth > 0).any()
    return depth


def with_depth(f: Frame, depth: np.ndarray, encoding: str = "16UC1") -> Frame:
    f.depth = depth_to_image(depth, copy.deepcopy(f.image.header), encoding)
    return f


@pytest.mark.parametrize(("encoding", "tolerance_m"), [("16UC1", 0.0005), ("32FC1", 0.0)])
def test_depth_goes_into_the_observation_in_metres(
    registry: ObjectRegistry, depth_m: np.ndarray, encoding: str, tolerance_m: float
) -> None:
    engine = ScriptedRefiner()
    f = with_depth(frame(pose(), pose(0.05)), depth_m, encoding)
    outcome = process_frame(f, engine, settings(use_depth=True), registry)
    ((observation, _),) = engine.calls
    assert observation.depth.dtype == np.float32
    np.testing.assert_allclose(observation.depth, depth_m, atol=tolerance_m, rtol=1e-6)
    assert outcome.depth_status == "used" and outcome.warnings == {} and outcome.refined_count == 2


def test_depth_is_not_read_without_use_depth(registry: ObjectRegistry, depth_m: np.ndarray) -> None:
    engine = ScriptedRefiner()
    outcome = process_frame(with_depth(frame(pose()), depth_m), engine, settings(), registry)
    ((observation, _),) = engine.calls
    assert observation.depth is None and outcome.depth_status is None and outcome.warnings == {}


def _no_depth(f: Frame, depth: np.ndarray) -> None:
    f.depth = None


def _half_size(f: Frame, depth: np.ndarray) -> None:
    with_depth(f, depth[::2, ::2])


def _mono8(f: Frame, depth: np.ndarray) -> None:
    with_depth(f, depth).depth.encoding = "mono8"


def _nothing_valid(f: Frame, depth: np.ndarray) -> None:
    with_depth(f, np.full_like(depth, np.nan), "32FC1")


def _short_step(f: Frame, depth: np.ndarray) -> None:
    with_depth(f, depth).depth.step = 2 * SIZE[1] - 2


def _truncated(f: Frame, depth: np.ndarray) -> None:
    with_depth(f, depth)
    f.depth.data = bytes(f.depth.data)[:1000]


def _other_frame(f: Frame, depth: np.ndarray) -> None:
    with_depth(f, depth).depth.header.frame_id = "camera_depth_optical_frame"


@pytest.mark.parametrize(
    ("breakage", "reason", "text"),
    [
        (_no_depth, "missing", "no depth image with its stamp (within sync_slop = 0 s) arrived within"),
        (_half_size, "size", "depth image is 160×120 but the colour image is 320×240"),
        (_mono8, "encoding", "unsupported depth encoding 'mono8'"),
        (_nothing_valid, "no-valid-depth", "no valid pixel"),
        (_short_step, "layout", "step 638"),
        (_truncated, "layout", "1000 bytes"),
        (_other_frame, "frame-id", "depth frame 'camera_depth_optical_frame' != image frame"),
    ],
)
def test_unusable_depth_refines_the_frame_rgb_only_with_a_warning(
    registry: ObjectRegistry, depth_m: np.ndarray, breakage: Any, reason: str, text: str
) -> None:
    f = frame(pose(-0.05), pose(0.05))
    breakage(f, depth_m)
    engine = ScriptedRefiner()
    outcome = process_frame(f, engine, settings(use_depth=True), registry)
    ((observation, instances),) = engine.calls
    assert observation.depth is None and len(instances) == 2
    assert outcome.refined_count == 2 and outcome.problem is None  # no detection lost
    assert outcome.depth_status == reason
    assert list(outcome.warnings) == [f"depth:{reason}"]
    assert outcome.warnings[f"depth:{reason}"].startswith("frame 1000.000000005 refined RGB-only: ")
    assert text in outcome.warnings[f"depth:{reason}"]


def test_depth_of_another_frame_is_used_with_frame_id_check_warn(
    registry: ObjectRegistry, depth_m: np.ndarray
) -> None:
    f = frame(pose())
    _other_frame(f, depth_m)
    engine = ScriptedRefiner()
    outcome = process_frame(f, engine, settings(use_depth=True, frame_id_check="warn"), registry)
    assert engine.calls[0][0].depth is not None and outcome.depth_status == "used"
    assert "depth frame 'camera_depth_optical_frame' != image frame" in outcome.warnings["depth:frame-id"]


def test_detections_of_a_class_not_ready_pass_through_with_the_reason(registry: ObjectRegistry) -> None:
    engine = ScriptedRefiner()
    outcome = process_frame(
        frame(pose(-0.05), pose(0.05)), engine, settings(), registry, not_ready={"duck": "duck is loading"}
    )
    assert engine.calls == []
    assert [output.score for output in outcome.outputs] == [0.0, 0.0]
    assert outcome.problem is None and outcome.warnings == {
        "not-ready:duck": "detection duck_0 passed through: duck is loading"
    }
