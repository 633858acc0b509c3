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

The node is the adapter that joins the pieces: :mod:`~rnnpose_ros.ros.parameters` (the parameter
table and typed settings), :mod:`~rnnpose_ros.ros.inputs` (subscriptions and synchroniser),
:mod:`~rnnpose_ros.ros.frame_processor` (one frame through the engine, no ROS),
:mod:`~rnnpose_ros.ros.diagnostics` (counters, throttled warnings, ``/diagnostics``). It owns the
output publishers, the worker thread and the warm-up. The README's "ROS API" section documents the
whole interface.

Threading: subscription callbacks only queue the synchronised set (bounded, ``max_pending_frames``,
oldest dropped with a throttled warning); one worker thread converts, refines and publishes, so the
executor is never blocked by refinement. Bad input never stops the node: the frame's detections are
passed through with score 0 and the reason is logged (throttled per reason). Shutdown asks the engine
to stop between two of its stages and waits for the worker, so the process never exits while the
worker is inside native code (rendering, torch, OpenCV).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
import rclpy.executors
from rclpy._rclpy_pybind11 import RCLError
from rclpy.node import Node
from rclpy.qos import QoSProfile
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection3DArray
from visualization_msgs.msg import MarkerArray

from rnnpose_ros.core.observation import Observation
from rnnpose_ros.core.threads import prefer_passive_waiting
from rnnpose_ros.ros import compat
from rnnpose_ros.ros.conversions import (
    MeshMarker,
    OverlayObject,
    detection_array,
    mesh_markers,
    object_transforms,
    overlay_image,
    rgb_to_image,
)
from rnnpose_ros.ros.diagnostics import Diagnostics
from rnnpose_ros.ros.frame_processor import FrameOutcome, process_frame
from rnnpose_ros.ros.inputs import Frame, FrameInputs, FrameQueue
from rnnpose_ros.ros.parameters import (
    PARAMETERS,
    ParameterError,
    Settings,
    check_command_line,
    declare_settings,
    resolve_backend,
    resolve_device,
)

NODE_NAME = "rnnpose_refiner"
# Longest wait for the worker at shutdown: one engine stage (a render iteration of a full batch on a
# slow CPU) takes well under this.
SHUTDOWN_WAIT_S = 10.0
# How long the node looks for another node of its name before it starts (DDS discovery on one host).
DUPLICATE_CHECK_S = 1.0


class StartupError(RuntimeError):
    """The node cannot start for a reason other than a parameter value (the message says why)."""


class RefinerNode(Node):
    """ROS 2 adapter around :class:`rnnpose_ros.core.refiner.Refiner` (module docstring).

    Args:
        refiner_factory: builds the engine from the validated settings and the registry; defaults to
            :func:`create_refiner`. Raises ParameterError (from the parameters) or the engine's errors.
        **kwargs: passed to :class:`rclpy.node.Node` (``context``, ``parameter_overrides``, ``cli_args``).
    """

    def __init__(self, refiner_factory: Callable[[Settings, Any], Any] | None = None, **kwargs: Any):
        super().__init__(NODE_NAME, **kwargs)
        s = self.settings = declare_settings(self, PARAMETERS, Settings)
        self.registry = load_registry(s.objects_file)
        self.refiner = (refiner_factory or create_refiner)(s, self.registry)

        self.pub_detections = self.create_publisher(Detection3DArray, "~/detections", 10)
        self.pub_markers = self.create_publisher(MarkerArray, "~/markers", 10)
        self.pub_debug = self.create_publisher(Image, "~/debug_image", QoSProfile(depth=2))
        self.tf_broadcaster = compat.TransformBroadcaster(self)
        self._markers_shown: set[str] = set()

        self.queue = FrameQueue(s.max_pending_frames)
        self.warmed_up = threading.Event()
        self._stopping = threading.Event()
        self.diagnostics = Diagnostics(self, s, self.queue, self.warmed_up)
        self.inputs = FrameInputs(self, s, self._on_frame, self.diagnostics)
        self._worker = threading.Thread(target=self._work, name="rnnpose_worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"ready: backend {s.backend}, device {s.device}, objects {', '.join(self.registry.class_ids)} "
            f"from {s.objects_file}; sync {'exact stamps' if s.sync_slop == 0 else f'slop {s.sync_slop} s'} "
            f"({compat.IMPLEMENTATION['synchronizer']}), TF via {compat.IMPLEMENTATION['tf_broadcaster']}"
        )

    def _on_frame(self, frame: Frame) -> None:
        """Executor thread: queue a synchronised set for the worker (never blocks)."""
        self.diagnostics.frame_queued(self.queue.put(frame))

    # --- worker thread ------------------------------------------------------------------------------

    def _work(self) -> None:
        from rnnpose_ros.core.refiner import RefinementCancelledError  # heavy (torch): after start-up

        try:
            if self.settings.warmup:
                self._warm_up()
        except RefinementCancelledError:
            return
        self.warmed_up.set()
        while (frame := self.queue.get()) is not None:
            try:
                self.process(frame)
            except RefinementCancelledError:
                return  # shutting down: the frame is abandoned between two engine stages
            except Exception as error:  # never let one frame end the worker
                if self.queue.closed or not self.context.ok():
                    return  # shutting down: the node's publishers may already be gone
                self.diagnostics.frame_failed(f"internal error: {error}")
                self.get_logger().error(f"frame processing failed: {error}\n{traceback.format_exc()}")

    def _warm_up(self) -> None:
        """One engine call on a grey 320×240 image with each class 3 diameters ahead (results unused)."""
        from rnnpose_ros.core.refiner import (  # heavy (torch): after the cheap start-up checks
            Instance,
            RefinementCancelledError,
        )

        start = time.monotonic()
        K = np.array([[300.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0.0, 0.0, 1.0]])
        instances = []
        for model in self.registry:
            pose = np.eye(4)
            pose[:3, 3] = -model.center + (0.0, 0.0, 3.0 * model.diameter)
            instances.append(Instance(model.class_id, pose, "warmup"))
        try:
            self.refiner.refine(
                Observation(np.full((240, 320, 3), 128, np.uint8), K), instances, stop=self._stopping.is_set
            )
        except RefinementCancelledError:
            raise
        except Exception as error:  # a failed warm-up only costs first-frame latency
            self.get_logger().warning(f"warm-up failed (the first frame will be slower): {error}")
            return
        if not self.queue.closed:
            self.get_logger().info(f"warm-up done in {time.monotonic() - start:.2f} s")

    def process(self, frame: Frame) -> Detection3DArray:
        """Refine and publish one synchronised frame; returns the published detections."""
        start = time.monotonic()
        outcome = process_frame(frame, self.refiner, self.settings, self.registry, stop=self._stopping.is_set)
        processed = time.monotonic()
        if outcome.engine_failure is not None:
            self.get_logger().error(outcome.engine_failure, throttle_duration_sec=5.0)
        for key, text in outcome.warnings.items():
            self.diagnostics.warn(key, text)
        header = frame.image.header
        message = detection_array(header, frame.detections, outcome.detections, outcome.outputs)
        self.pub_detections.publish(message)
        self._publish_extras(header, outcome)
        done = time.monotonic()
        latency_s = {
            "queue": start - frame.queued,
            "convert": outcome.convert_s,
            "refine": outcome.refine_s,
            "publish": done - processed,
            "total": done - frame.queued,
        }
        self.diagnostics.frame_processed(
            latency_s, outcome.refined_count, outcome.failed_count, outcome.problem, outcome.over_limit
        )
        return message

    def _publish_extras(self, header: Header, outcome: FrameOutcome) -> None:
        """TF, markers and (when subscribed) the debug overlay for one frame."""
        s = self.settings
        pairs = list(zip(outcome.detections, outcome.outputs, strict=True))
        shown = [
            (item, result)
            for item, result in pairs
            if result.pose is not None and result.score >= s.score_threshold
        ]
        if s.publish_tf and shown:
            if header.frame_id:
                frames = [(s.tf_prefix + item.instance_id, result.pose) for item, result in shown]
                self.tf_broadcaster.sendTransform(object_transforms(header, frames))
            else:
                self.diagnostics.warn("tf-no-frame", "image header.frame_id is empty: no TF published")
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
        observation = outcome.observation
        if s.debug_image and observation is not None and self.pub_debug.get_subscription_count() > 0:
            drawings = [
                OverlayObject(model.vertices, model.faces, item.pose, result.pose)
                for item, result in pairs
                if item.pose is not None and (model := self.registry.models.get(item.class_id)) is not None
            ]
            overlay = overlay_image(observation.image, observation.K, drawings)
            self.pub_debug.publish(rgb_to_image(overlay, header))

    def destroy_node(self) -> None:
        """Stop the worker: the engine stops at its next stage boundary (the frame in progress or the
        warm-up is abandoned, unpublished), and the worker is joined, so that no thread is left inside
        native code when the process exits."""
        if hasattr(self, "_worker"):  # absent when the constructor failed
            self._stopping.set()
            self.queue.close()
            if self._worker.is_alive() and threading.current_thread() is not self._worker:
                self._worker.join(timeout=SHUTDOWN_WAIT_S)
                if self._worker.is_alive():
                    self.get_logger().error(f"the worker did not stop within {SHUTDOWN_WAIT_S:g} s")
        super().destroy_node()

    def refuse_duplicate(self, wait_s: float = DUPLICATE_CHECK_S) -> None:
        """Raise StartupError if, within ``wait_s`` of discovery, another node of this fully qualified
        name shows up in the domain (both would answer every frame, with duplicate TF)."""
        deadline = time.monotonic() + wait_s
        while self.context.ok():
            try:
                duplicates = self.diagnostics.duplicates()
            except Exception:  # a signal shut the context down while the graph was queried
                if self.context.ok():
                    raise
                return
            if duplicates > 0:
                raise StartupError(
                    f"another node named {self.get_fully_qualified_name()} already runs in ROS_DOMAIN_ID "
                    f"{self.context.get_domain_id()}: start this one in another namespace (-r __ns:=/name) "
                    "or with another name (-r __node:=name)"
                )
            if time.monotonic() >= deadline:
                return
            time.sleep(0.1)


# ---------------------------------------------------------------- engine construction


def load_registry(objects_file: Path) -> Any:
    """The object registry in ``objects_file``; an unusable file is a ParameterError."""
    from rnnpose_ros.core.objects import ObjectModelError, ObjectRegistry  # heavy: after the cheap checks

    try:
        return ObjectRegistry.from_yaml(objects_file)
    except ObjectModelError as error:
        raise ParameterError(f"parameter 'objects_file' ({objects_file}): {error}") from None


def create_refiner(settings: Settings, registry: Any) -> Any:
    """The engine for ``settings``; resolves ``device``/``backend`` in place and applies iteration counts."""
    from rnnpose_ros.core.backends import BackendError
    from rnnpose_ros.core.refiner import Refiner
    from rnnpose_ros.core.threads import configure_threads

    settings.device = resolve_device(settings.device)
    settings.backend = resolve_backend(settings.backend, registry)
    configure_threads(settings.num_threads)
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
    """Console entry point ``refine_node``: spin the node until shut down (exit 2, with one line saying
    why, when it cannot start; 0 after SIGINT / SIGTERM)."""
    prefer_passive_waiting()  # before anything imports torch
    logger = rclpy.logging.get_logger(NODE_NAME)
    try:
        check_command_line(sys.argv if args is None else args, PARAMETERS, NODE_NAME)
        rclpy.init(args=args)
    except ParameterError as error:
        logger.fatal(str(error))
        return 2
    except RCLError as error:  # what the command-line check cannot see, in rcl's words
        logger.fatal(f"cannot start: {str(error).splitlines()[0]}")
        return 2
    node = None
    try:
        node = RefinerNode()
        node.refuse_duplicate()
        rclpy.spin(node)
    except (ParameterError, StartupError) as error:
        logger.fatal(str(error))
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
