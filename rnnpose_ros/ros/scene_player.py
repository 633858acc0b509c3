"""The ``scene_player`` node: synthetic camera frames with ground truth, for the demo and for trying the node.

Each frame is a scene from :func:`rnnpose_ros.core.synth.make_scene` (the real textured mesh, e.g.
pybullet's duck, rendered over a real ``skimage.data`` photograph) published as three messages with one
shared header (stamp = publish time, ``frame_id`` = ``camera_color_optical_frame`` by default):

    ``image``        sensor_msgs/Image, rgb8 (sensor-data QoS, like a camera driver)
    ``camera_info``  sensor_msgs/CameraInfo of the same image (K = P, no distortion: rectified)
    ``detections``   vision_msgs/Detection3DArray, one detection per object with a *noisy* pose, as a
                     detector would give it (:func:`~rnnpose_ros.core.synth.perturb_pose`: 15° per Euler
                     angle, 1 / 1 / 5 cm along x / y / z by default, seeded)
    ``depth``        with ``depth_encoding`` 16UC1 (mm) or 32FC1 (m): the registered depth image of the
                     scene with the sensor model of :mod:`~rnnpose_ros.core.depth_sensor` (noise,
                     quantisation, holes; background plane and occluders included), same header

It listens to the refiner's output (``result_topic``, default ``/rnnpose_refiner/detections``) and keeps
every frame's ground truth with the answer, so a caller can score the refinement
(:func:`score_frame`). Pacing: at most ``rate`` frames per second; with ``wait_for_result`` (default)
the next frame is published only once the previous one is *settled* (answered, or ``result_timeout``
seconds passed), so every frame is refined and the run measures accuracy; without it the player
free-runs at ``rate`` and shows the node's drop policy (frames the node skipped never get an answer).
A frame counts as answered when an output with its stamp arrives; an unanswered frame followed by an
answered later one was dropped by the node (it works on frames in order).

Scenes are generated ahead in a background thread (rendering never delays an answer's bookkeeping).
Frame ``i`` of seed ``s`` is always the same scene and the same noisy detection.

With ``record_dir`` set, every published message is also written to that directory, and
``scene_player --replay <dir>`` plays it back (:mod:`~rnnpose_ros.ros.recording`, for installs without
rosbag2).

Standalone: ``scene_player --ros-args -p frames:=20 -p rate:=1.0`` next to a running ``refine_node``
logs each frame's initial and refined ADD(-S) error. :mod:`rnnpose_ros.tools.demo` runs it in-process.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
import rclpy.executors
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose

from rnnpose_ros.core import metrics
from rnnpose_ros.core.depth_sensor import DepthSensorModel
from rnnpose_ros.core.objects import ObjectModel, ObjectRegistry
from rnnpose_ros.core.synth import Scene, SceneError, SceneSpec, make_scene
from rnnpose_ros.ros.conversions import (
    ConversionError,
    bounding_box,
    depth_to_image,
    matrix_to_pose,
    pose_to_matrix,
    rgb_to_image,
    stamp_nanoseconds,
)
from rnnpose_ros.ros.parameters import ParameterError, ParameterSpec, declare_settings, objects_file_path
from rnnpose_ros.ros.recording import Recorder, RecordingError, replay_main

NODE_NAME = "scene_player"
DEFAULT_FRAME_ID = "camera_color_optical_frame"
DEFAULT_RESULT_TOPIC = "/rnnpose_refiner/detections"
# Attempts at a scene for one frame index before giving up (make_scene can fail to place an object).
SCENE_ATTEMPTS = 5
# How often the pacing timer looks at the state (s); the publish rate itself is the ``rate`` parameter.
POLL_PERIOD_S = 0.02


# ---------------------------------------------------------------- frames and scoring


@dataclass
class PlayedFrame:
    """One published frame: its scene (ground truth included), header, and the refiner's answer.

    Attributes:
        index: frame number (0, 1, ...).
        scene: the synthetic scene; ``scene.instances[i]`` holds ``pose_gt`` and ``pose_init`` (the
            published noisy pose) of detection ``i``, (4, 4) float64 model→camera, metres.
        header: the header shared by the frame's image, camera_info and detections.
        published_at: ``time.monotonic()`` when the frame was published.
        result: the refiner's ``Detection3DArray`` for this stamp, or None (not yet / never).
        answered_at: ``time.monotonic()`` when ``result`` arrived, or None.
    """

    index: int
    scene: Scene
    header: Header
    published_at: float
    result: Detection3DArray | None = None
    answered_at: float | None = None

    @property
    def stamp_ns(self) -> int:
        return stamp_nanoseconds(self.header.stamp)

    @property
    def latency_s(self) -> float | None:
        """Seconds from publishing the frame to receiving its refined detections (None if unanswered)."""
        return None if self.answered_at is None else self.answered_at - self.published_at


@dataclass
class InstanceScore:
    """Initial (detector) and refined errors of one object of a frame.

    ``refined`` is None when the refiner's output lacks the detection or its pose cannot be read;
    ``score`` is the refiner's score in [0, 1] (0 = passed through unrefined).
    """

    class_id: str
    instance_id: str
    initial: metrics.PoseErrors
    refined: metrics.PoseErrors | None
    score: float
    symmetric: bool = False


def score_frame(frame: PlayedFrame, registry: ObjectRegistry) -> list[InstanceScore]:
    """Score every object of an answered ``frame``; output detection ``i`` answers input detection ``i``
    (the node keeps the order). Returns an empty list for an unanswered frame."""
    if frame.result is None:
        return []
    scores = []
    K = frame.scene.K
    for i, truth in enumerate(frame.scene.instances):
        model = registry[truth.class_id]
        refined, score = None, 0.0
        if i < len(frame.result.detections) and frame.result.detections[i].results:
            hypothesis = frame.result.detections[i].results[0]
            score = float(hypothesis.hypothesis.score)
            try:
                pose, _ = pose_to_matrix(hypothesis.pose.pose)
                refined = metrics.pose_errors(model, pose, truth.pose_gt, K)
            except (ConversionError, metrics.MetricsInputError):
                refined = None
        scores.append(
            InstanceScore(
                class_id=truth.class_id,
                instance_id=truth.instance_id,
                initial=metrics.pose_errors(model, truth.pose_init, truth.pose_gt, K),
                refined=refined,
                score=score,
                symmetric=model.symmetric,
            )
        )
    return scores


# ---------------------------------------------------------------- messages


def camera_info_message(K: np.ndarray, size: tuple[int, int], header: Header) -> CameraInfo:
    """``CameraInfo`` of a rectified (H, W) = ``size`` image with intrinsics K (3, 3): K = P[:, :3],
    identity R, plumb_bob with zero distortion."""
    height, width = size
    info = CameraInfo(header=header, height=int(height), width=int(width))
    info.distortion_model = "plumb_bob"
    info.d = [0.0] * 5
    info.k = [float(v) for v in np.asarray(K, dtype=np.float64).ravel()]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    P = np.zeros((3, 4))
    P[:, :3] = K
    info.p = [float(v) for v in P.ravel()]
    return info


def detections_message(scene: Scene, registry: ObjectRegistry, header: Header) -> Detection3DArray:
    """The detector's view of ``scene``: one ``Detection3D`` per instance with the noisy ``pose_init``
    (``results[0]``: class id, score 1, pose of the mesh origin), the mesh box at that pose, ``id`` = the
    instance's index so the refiner names it ``<class_id>_<index>``."""
    array = Detection3DArray(header=header)
    for index, instance in enumerate(scene.instances):
        model = registry[instance.class_id]
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = instance.class_id
        hypothesis.hypothesis.score = 1.0
        hypothesis.pose.pose = matrix_to_pose(instance.pose_init)
        array.detections.append(
            Detection3D(
                header=header,
                id=str(index),
                results=[hypothesis],
                bbox=bounding_box(instance.pose_init, model.center, model.extents),
            )
        )
    return array


# ---------------------------------------------------------------- scene generation


class SceneSource:
    """Scenes generated ahead in a background thread, in frame order, at most ``prefetch`` waiting.

    Frame ``i`` uses ``numpy.random.default_rng([seed, i, attempt])`` (attempt > 0 only when the scene
    could not be placed), so a run is reproducible frame by frame. ``frames = 0`` generates forever.
    """

    def __init__(
        self,
        models: Sequence[ObjectModel],
        seed: int,
        frames: int,
        spec: SceneSpec,
        prefetch: int = 2,
    ):
        self.models = list(models)
        self.seed = seed
        self.frames = frames
        self.spec = spec
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[Scene, np.ndarray | None]] = queue.Queue(maxsize=max(prefetch, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._generate, name="scene_source", daemon=True)
        self._thread.start()

    def _generate(self) -> None:
        from rnnpose_ros.core.render import Renderer  # heavy (OpenGL): only in the thread that renders

        renderer = None
        try:
            renderer = Renderer()
            index = 0
            while not self._stop.is_set() and (self.frames == 0 or index < self.frames):
                scene = self._scene(renderer, index)
                depth = scene.depth  # when the spec asks for a depth sensor
                while not self._stop.is_set():
                    try:
                        self._queue.put((scene, depth), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                index += 1
        except Exception as error:  # reported by the player, which then stops
            self.error = error
        finally:
            if renderer is not None:
                renderer.close()

    def _scene(self, renderer: Any, index: int) -> Scene:
        for attempt in range(SCENE_ATTEMPTS):
            rng = np.random.default_rng([self.seed, index, attempt])
            try:
                return make_scene(self.models, rng, renderer, self.spec)
            except SceneError as error:
                last = error
        raise SceneError(f"frame {index}: {last}")

    def get(self) -> tuple[Scene, np.ndarray | None] | None:
        """The next scene and its depth image ((H, W) float32 metres, None unless ``depth``) if one is
        ready, else None (never blocks)."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)


# ---------------------------------------------------------------- the node


def _class_ids(name: str, value: Sequence[str]) -> list[str]:
    if not value:
        raise ParameterError(f"parameter {name!r} must name at least one class id")
    return list(value)


def _translation_sigma(name: str, value: Sequence[float]) -> list[float]:
    if len(value) != 3 or any(s < 0 for s in value):
        raise ParameterError(f"parameter {name!r} must be 3 non-negative numbers (m)")
    return [float(s) for s in value]


PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("frames", 10, "Frames to publish; 0 = forever.", int_range=(0, 1_000_000)),
    ParameterSpec(
        "seed",
        0,
        "Seed of the scenes and of the detector noise (frame i is always the same).",
        int_range=(0, 2**31 - 1),
    ),
    ParameterSpec("rate", 2.0, "Most frames per second.", float_range=(0.01, 100.0)),
    ParameterSpec(
        "wait_for_result",
        True,
        "Publish the next frame only once the refiner answered the previous one (or it timed out).",
    ),
    ParameterSpec(
        "result_timeout",
        60.0,
        "Seconds a frame may wait for its answer before it counts as unanswered.",
        float_range=(0.1, 3600.0),
    ),
    ParameterSpec("result_topic", DEFAULT_RESULT_TOPIC, "The refiner's output detections."),
    ParameterSpec(
        "frame_id", DEFAULT_FRAME_ID, "frame_id of every published header (the camera optical frame)."
    ),
    ParameterSpec(
        "objects_file",
        "",
        "Object registry YAML; empty = the package's config/objects.yaml.",
        check=objects_file_path,
    ),
    ParameterSpec(
        "objects",
        ["duck"],
        "Class ids placed in every scene (repeat one for several copies).",
        check=_class_ids,
    ),
    ParameterSpec("width", 640, "Image width (px).", int_range=(32, 4096)),
    ParameterSpec("height", 480, "Image height (px).", int_range=(32, 4096)),
    ParameterSpec("min_distance", 0.3, "Nearest object centre depth (m).", float_range=(0.05, 100.0)),
    ParameterSpec("max_distance", 1.0, "Farthest object centre depth (m).", float_range=(0.05, 100.0)),
    ParameterSpec("occluders", 0, "Random occluder patches tried per scene.", int_range=(0, 20)),
    ParameterSpec(
        "rot_sigma_deg", 15.0, "Detector noise: std of each Euler angle (degrees).", float_range=(0.0, 90.0)
    ),
    ParameterSpec(
        "max_angle_deg",
        45.0,
        "Detector noise: largest total rotation error (degrees).",
        float_range=(0.1, 180.0),
    ),
    ParameterSpec(
        "trans_sigma",
        [0.01, 0.01, 0.05],
        "Detector noise: std along camera x, y, z (m).",
        check=_translation_sigma,
    ),
    ParameterSpec(
        "depth_encoding",
        "none",
        "Also publish the registered depth image on 'depth' in this encoding (16UC1 = millimetres, "
        "32FC1 = metres); none = no depth.",
        ("none", "16UC1", "32FC1"),
    ),
    ParameterSpec(
        "autostart", True, "Start publishing as soon as the refiner subscribes (False: call start())."
    ),
    ParameterSpec(
        "record_dir",
        "",
        "Also write every published message to this new directory, replayable with "
        "`scene_player --replay <dir>` (where rosbag2 is not installed); empty = do not record.",
    ),
)


@dataclass
class PlayerSettings:
    """Validated values of the scene player's :data:`PARAMETERS` (one field per row, same meaning)."""

    frames: int
    seed: int
    rate: float
    wait_for_result: bool
    result_timeout: float
    result_topic: str
    frame_id: str
    objects_file: Path
    objects: list[str]
    width: int
    height: int
    min_distance: float
    max_distance: float
    occluders: int
    rot_sigma_deg: float
    max_angle_deg: float
    trans_sigma: list[float]
    depth_encoding: str
    autostart: bool
    record_dir: str


class ScenePlayer(Node):
    """Publishes synthetic frames with noisy detections and records the refiner's answers (module docstring).

    Attributes:
        frames: every published frame, in order (ground truth + answer).
        registry: the objects (for scoring with :func:`score_frame`).
        on_published / on_answered: callbacks ``f(frame)`` run in the executor thread.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(NODE_NAME, **kwargs)
        p = self.settings = declare_settings(self, PARAMETERS, PlayerSettings)
        if p.min_distance > p.max_distance:
            raise ParameterError("parameter 'min_distance' must be <= 'max_distance'")
        self.registry = ObjectRegistry.from_yaml(p.objects_file)
        models = [self.registry[class_id] for class_id in p.objects]
        self.frames: list[PlayedFrame] = []
        self._by_stamp: dict[int, PlayedFrame] = {}
        self.on_published: list[Callable[[PlayedFrame], None]] = []
        self.on_answered: list[Callable[[PlayedFrame], None]] = []
        self.started = False
        self.source = SceneSource(
            models,
            p.seed,
            p.frames,
            SceneSpec(
                size=(p.height, p.width),
                distance=(p.min_distance, p.max_distance),
                occluders=p.occluders,
                rot_sigma_deg=p.rot_sigma_deg,
                trans_sigma=tuple(p.trans_sigma),
                max_angle_deg=p.max_angle_deg,
                depth=None if p.depth_encoding == "none" else DepthSensorModel(),
            ),
        )
        self.pub_image = self.create_publisher(Image, "image", qos_profile_sensor_data)
        self.pub_info = self.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pub_detections = self.create_publisher(Detection3DArray, "detections", reliable)
        self.pub_depth = (
            None
            if p.depth_encoding == "none"
            else self.create_publisher(Image, "depth", qos_profile_sensor_data)
        )
        self.create_subscription(Detection3DArray, p.result_topic, self._on_result, reliable)
        self.recorder = None
        if p.record_dir:
            topics = {"image": (Image, "sensor_data"), "camera_info": (CameraInfo, "sensor_data")}
            try:
                self.recorder = Recorder(
                    Path(p.record_dir), topics | {"detections": (Detection3DArray, "reliable")}
                )
            except RecordingError as error:
                raise ParameterError(f"parameter 'record_dir': {error}") from None
        self._last_publish = -math.inf
        self._timer = self.create_timer(POLL_PERIOD_S, self._tick)
        self.get_logger().info(
            f"{p.frames or 'endless'} frames of {', '.join(p.objects)} (seed {p.seed}) at most "
            f"{p.rate:g} Hz, {'waiting for each answer' if p.wait_for_result else 'free-running'} on "
            f"{p.result_topic}"
        )

    # --- state ----------------------------------------------------------------------------------------

    @property
    def refiner_subscribed(self) -> bool:
        """Whether the refiner's input subscriptions (depth too when published) and its output publisher
        are matched."""
        return (
            self.pub_image.get_subscription_count() > 0
            and self.pub_info.get_subscription_count() > 0
            and self.pub_detections.get_subscription_count() > 0
            and (self.pub_depth is None or self.pub_depth.get_subscription_count() > 0)
            and self.count_publishers(self.settings.result_topic) > 0
        )

    def settled(self, frame: PlayedFrame, now: float | None = None) -> bool:
        """Answered, skipped by the node (a later frame was answered), or older than ``result_timeout``."""
        if frame.result is not None:
            return True
        if any(later.result is not None for later in self.frames[frame.index + 1 :]):
            return True
        now = time.monotonic() if now is None else now
        return now - frame.published_at > self.settings.result_timeout

    @property
    def finished(self) -> bool:
        """Every frame published (``frames`` > 0) and settled."""
        total = self.settings.frames
        now = time.monotonic()
        return total > 0 and len(self.frames) >= total and all(self.settled(f, now) for f in self.frames)

    def start(self) -> None:
        """Begin publishing (with ``autostart`` the player starts by itself once the refiner subscribes)."""
        self.started = True

    # --- callbacks ------------------------------------------------------------------------------------

    def _tick(self) -> None:
        if self.source.error is not None:
            raise self.source.error
        p = self.settings
        if not self.started:
            if not (p.autostart and self.refiner_subscribed):
                return
            self.started = True
        now = time.monotonic()
        if (p.frames and len(self.frames) >= p.frames) or now - self._last_publish < 1.0 / p.rate:
            return
        if p.wait_for_result and self.frames and not self.settled(self.frames[-1], now):
            return
        generated = self.source.get()
        if generated is not None:
            self.publish(*generated)

    def publish(self, scene: Scene, depth: np.ndarray | None = None) -> PlayedFrame:
        """Publish one scene's image, camera_info, detections and (when given and ``depth_encoding`` is
        set) its (H, W) metric ``depth`` with one header; returns its record."""
        header = Header(frame_id=self.settings.frame_id, stamp=self.get_clock().now().to_msg())
        info = camera_info_message(scene.K, scene.image.shape[:2], header)
        detections = detections_message(scene, self.registry, header)
        image = rgb_to_image(scene.image, header)
        frame = PlayedFrame(index=len(self.frames), scene=scene, header=header, published_at=time.monotonic())
        self.frames.append(frame)
        self._by_stamp[frame.stamp_ns] = frame
        self._last_publish = frame.published_at
        if self.pub_depth is not None and depth is not None:
            self.pub_depth.publish(depth_to_image(depth, header, self.settings.depth_encoding))
        self.pub_detections.publish(detections)
        self.pub_info.publish(info)
        self.pub_image.publish(image)
        if self.recorder is not None:
            for topic, message in (("detections", detections), ("camera_info", info), ("image", image)):
                self.recorder.write(topic, message, frame.stamp_ns)
        for callback in self.on_published:
            callback(frame)
        return frame

    def _on_result(self, msg: Detection3DArray) -> None:
        frame = self._by_stamp.get(stamp_nanoseconds(msg.header.stamp))
        if frame is None or frame.result is not None:
            return  # not ours (another publisher) or a duplicate
        frame.answered_at = time.monotonic()
        frame.result = msg
        for callback in self.on_answered:
            callback(frame)

    def destroy_node(self) -> None:
        if hasattr(self, "source"):  # absent when __init__ failed
            self.source.close()
        if getattr(self, "recorder", None) is not None:
            self.recorder.close()
        super().destroy_node()


def describe(frame: PlayedFrame, scores: Sequence[InstanceScore]) -> str:
    """One line per object: initial → refined ADD(-S) (mm and fraction of the diameter), rotation and
    translation errors, score, and the frame's latency."""
    latency = "no answer" if frame.latency_s is None else f"{frame.latency_s * 1000:.0f} ms"
    lines = []
    for s in scores:
        name = metrics.add_name(s.symmetric)
        initial = f"{s.initial.add_m * 1000:6.1f} mm ({s.initial.add_fraction:.2f} d)"
        if s.refined is None:
            lines.append(
                f"frame {frame.index:3d} {s.instance_id}: {name} {initial} -> not refined; {latency}"
            )
            continue
        lines.append(
            f"frame {frame.index:3d} {s.instance_id}: {name} {initial} -> {s.refined.add_m * 1000:6.1f} mm "
            f"({s.refined.add_fraction:.2f} d) | rot {s.initial.rotation_deg:5.1f}° -> "
            f"{s.refined.rotation_deg:5.1f}° | trans {s.initial.translation_m * 100:5.1f} -> "
            f"{s.refined.translation_m * 100:5.1f} cm | score {s.score:.2f} | {latency}"
        )
    return "\n".join(lines) if lines else f"frame {frame.index:3d}: {latency}"


def main(args: list[str] | None = None) -> int:
    """Console entry point ``scene_player``: publish the frames, log each answer, exit when done;
    ``scene_player --replay <dir> ...`` replays a recording instead
    (:func:`~rnnpose_ros.ros.recording.replay_main`)."""
    argv = sys.argv if args is None else args
    if "--replay" in rclpy.utilities.remove_ros_args(argv):
        return replay_main(argv)
    rclpy.init(args=args)
    node = None
    try:
        node = ScenePlayer()
        logger = node.get_logger()
        node.on_answered.append(lambda frame: logger.info(describe(frame, score_frame(frame, node.registry))))
        while rclpy.ok() and not node.finished:
            rclpy.spin_once(node, timeout_sec=0.1)
        answered = sum(f.result is not None for f in node.frames)
        logger.info(f"done: {answered} of {len(node.frames)} frames answered")
        return 0 if answered else 1
    except ParameterError as error:
        rclpy.logging.get_logger(NODE_NAME).fatal(str(error))
        return 2
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        return 0
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
