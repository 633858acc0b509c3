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
Serves:
    ``~/refine`` and the object-registry services (:mod:`~rnnpose_ros.ros.services`), and the standard
    lifecycle services (it is a managed node; ``autostart`` configures and activates it at start).

The node is the adapter that joins the pieces: :mod:`~rnnpose_ros.ros.parameters` (the parameter
table and typed settings), :mod:`~rnnpose_ros.ros.inputs` (subscriptions and synchroniser),
:mod:`~rnnpose_ros.ros.frame_processor` (one frame through the engine, no ROS),
:mod:`~rnnpose_ros.ros.diagnostics` (counters, throttled warnings, ``/diagnostics``),
:mod:`~rnnpose_ros.ros.services` (the services). It owns the output publishers, the worker thread,
the warm-up and the lifecycle transitions. The README's "ROS API" section documents the
whole interface.

Threading: subscription callbacks only queue the synchronised set (bounded, ``max_pending_frames``,
oldest dropped with a throttled warning); one worker thread converts, refines and publishes, so the
executor is never blocked by refinement; service calls run their engine work on the same worker,
through the same queue. Bad input never stops the node: the frame's detections are
passed through with score 0 and the reason is logged (throttled per reason). Shutdown asks the engine
to stop between two of its stages and waits for the worker, so the process never exits while the
worker is inside native code (rendering, torch, OpenCV).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
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
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection3DArray
from visualization_msgs.msg import MarkerArray

from rnnpose_ros.core.observation import Observation
from rnnpose_ros.core.threads import prefer_passive_waiting
from rnnpose_ros.core.uris import display_uri
from rnnpose_ros.ros import compat
from rnnpose_ros.ros.conversions import (
    MeshMarker,
    OverlayObject,
    detection_array,
    mesh_markers,
    object_transforms,
    overlay_image,
    rgb_to_image,
    stamp_nanoseconds,
)
from rnnpose_ros.ros.diagnostics import Diagnostics, duplicate_nodes
from rnnpose_ros.ros.frame_processor import FrameOutcome, process_frame
from rnnpose_ros.ros.inputs import Frame, FrameInputs, FrameQueue
from rnnpose_ros.ros.output_frame import OutputFrame, express
from rnnpose_ros.ros.parameters import (
    PARAMETERS,
    ParameterError,
    Settings,
    check_command_line,
    declare_settings,
    resolve_backend,
    resolve_device,
)
from rnnpose_ros.ros.pose_memory import PoseMemory
from rnnpose_ros.ros.services import NodeServices
from rnnpose_ros.ros.tracking import NodeTracking

NODE_NAME = "rnnpose_refiner"
# Longest wait for the worker at shutdown: one engine stage (a render iteration of a full batch on a
# slow CPU) takes well under this.
SHUTDOWN_WAIT_S = 10.0
# How long the node looks for another node of its name before it starts (DDS discovery on one host).
DUPLICATE_CHECK_S = 1.0


class StartupError(RuntimeError):
    """The node cannot start for a reason other than a parameter value (the message says why)."""


class RefinerNode(LifecycleNode):
    """ROS 2 adapter around :class:`rnnpose_ros.core.refiner.Refiner` (module docstring).

    A managed (lifecycle) node: *configure* loads the registry, builds the engine and its per-object
    caches, creates the publishers and starts the worker, which warms up; *activate* subscribes;
    *deactivate* unsubscribes and drops waiting frames (caches kept); *cleanup* stops the worker and
    frees the engine and the publishers. With ``autostart`` (default) the constructor configures and
    activates, raising what configure raised.

    Args:
        refiner_factory: builds the engine from the validated settings and the registry; defaults to
            :func:`create_refiner`. Raises ParameterError (from the parameters) or the engine's errors.
        **kwargs: passed to :class:`rclpy.node.Node` (``context``, ``parameter_overrides``, ``cli_args``).
    """

    def __init__(self, refiner_factory: Callable[[Settings, Any], Any] | None = None, **kwargs: Any):
        super().__init__(NODE_NAME, **kwargs)
        self.settings = declare_settings(self, PARAMETERS, Settings)
        # before any slow start: a set output_frame without tf2_ros is an error at once
        self.output_frame = OutputFrame(
            self,
            self.settings.output_frame,
            lambda key, text: self.diagnostics and self.diagnostics.warn(key, text),
        )
        self.pose_memory = PoseMemory()  # symmetric objects: the previous output per instance
        self._refiner_factory = refiner_factory or create_refiner
        # What configure creates (None while unconfigured).
        self.registry: Any = None
        self.refiner: Any = None
        self.queue: FrameQueue | None = None
        self.diagnostics: Diagnostics | None = None
        self.inputs: FrameInputs | None = None
        self._worker: threading.Thread | None = None
        self.warmed_up = threading.Event()
        self._stopping = threading.Event()
        self._not_ready: dict[str, str] = {}  # class id -> why its detections are passed through
        self._configure_error: Exception | None = None
        self._starting = False
        self.tracking: NodeTracking | None = None
        self.node_services = NodeServices(self)
        if self.settings.autostart:
            self._start_up()

    def _start_up(self) -> None:
        """configure + activate now (``autostart``); raises what configure raised. The warm-up goes on
        in the worker meanwhile (frames wait in the queue), as ``/diagnostics`` reports."""
        self._starting = True
        try:
            configured = self.trigger_configure() == TransitionCallbackReturn.SUCCESS
        finally:
            self._starting = False
        if not configured:
            error = self._configure_error or StartupError("configure failed")
            self._configure_error = None
            raise error
        if self.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            raise StartupError("activate failed")

    # --- lifecycle transitions (executor thread) -------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as error:  # a configure that fails leaves the node unconfigured, never half-built
            self._release()
            if self._starting:
                self._configure_error = error  # raised by the constructor (main reports it)
            else:
                self.get_logger().error(f"configure failed: {error}")
            return TransitionCallbackReturn.FAILURE
        if not self._starting:
            self._wait_for_warm_up()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        s = self.settings
        assert self.diagnostics is not None
        assert self.tracking is not None
        self.inputs = FrameInputs(self, s, self._on_frame, self.diagnostics, self.tracking.on_detections)
        by_name = self.inputs.by_name
        self.node_services.watch_inputs(by_name["image"], by_name["camera_info"])
        self.get_logger().info(
            f"ready: mode {s.mode}, backend {s.backend}, device {s.device}, "
            f"objects {', '.join(self.registry.class_ids)} "
            f"from {s.objects_file}; sync {'exact stamps' if s.sync_slop == 0 else f'slop {s.sync_slop} s'} "
            f"({compat.IMPLEMENTATION['synchronizer']}), TF via {compat.IMPLEMENTATION['tf_broadcaster']}"
        )
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._unsubscribe()
        if self.queue is not None:
            self.queue.clear()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    @property
    def state_label(self) -> str:
        """The lifecycle state: unconfigured, inactive, active or finalized."""
        return self._state_machine.current_state[1]  # rclpy has no public accessor

    @property
    def is_active(self) -> bool:
        return self.inputs is not None

    def _configure(self) -> None:
        s = self.settings
        self.registry = load_registry(s.objects_file)
        self.refiner = self._refiner_factory(s, self.registry)
        self.pub_detections = self.create_publisher(Detection3DArray, "~/detections", 10)
        self.pub_markers = self.create_publisher(MarkerArray, "~/markers", 10)
        self.pub_debug = self.create_publisher(Image, "~/debug_image", QoSProfile(depth=2))
        self.tf_broadcaster = compat.TransformBroadcaster(self)
        self._markers_shown: set[str] = set()
        self.queue = FrameQueue(s.max_pending_frames)
        self.warmed_up = threading.Event()
        self._stopping = threading.Event()
        self.diagnostics = Diagnostics(self, s, self.queue, self.warmed_up, lambda: self.is_active)
        self.tracking = NodeTracking(self, s, self.refiner, self.registry, self.diagnostics.warn)
        self.diagnostics.add_values(self.tracking.values)
        self._worker = threading.Thread(target=self._work, name="rnnpose_worker", daemon=True)
        self._worker.start()

    def _wait_for_warm_up(self) -> None:
        """Block the transition until the worker's warm-up is over (or the node stops)."""
        while not self.warmed_up.wait(0.1):
            if self._stopping.is_set() or not self.context.ok() or not self._worker.is_alive():
                return

    def _unsubscribe(self) -> None:
        """Destroy the input subscriptions (the synchroniser goes with them)."""
        if self.inputs is not None:
            self.inputs.destroy()
            self.inputs = None

    def _release(self) -> None:
        """Stop the worker (at its next engine stage boundary; waiting service calls are answered) and
        free the engine, its caches and the publishers; the node is then as after construction."""
        self._unsubscribe()
        self._stopping.set()
        if self.queue is not None:
            for task in self.queue.close():
                task.cancel(f"not run: the node left the {self.state_label} state")
        worker, self._worker = self._worker, None
        if worker is not None and worker.is_alive() and threading.current_thread() is not worker:
            worker.join(timeout=SHUTDOWN_WAIT_S)
            if worker.is_alive():
                self.get_logger().error(f"the worker did not stop within {SHUTDOWN_WAIT_S:g} s")
        if self.diagnostics is not None:
            self.diagnostics.close()
        for name in ("pub_detections", "pub_markers", "pub_debug"):
            publisher = self.__dict__.pop(name, None)
            if publisher is not None:
                self.destroy_publisher(publisher)
        broadcaster = self.__dict__.pop("tf_broadcaster", None)
        if broadcaster is not None:
            self.destroy_publisher(broadcaster.pub_tf)
        self.registry = self.refiner = self.queue = self.diagnostics = self.tracking = None
        self._not_ready = {}
        release_freed_memory()

    def _on_frame(self, frame: Frame) -> None:
        """Executor thread: queue a synchronised set for the worker (never blocks)."""
        assert self.queue is not None and self.diagnostics is not None
        self.diagnostics.frame_queued(self.queue.put(frame))

    # --- worker thread ------------------------------------------------------------------------------

    def _work(self) -> None:
        from rnnpose_ros.core.refiner import RefinementCancelledError  # heavy (torch): after start-up

        queue, diagnostics = self.queue, self.diagnostics
        assert queue is not None and diagnostics is not None
        try:
            if self.settings.warmup:
                self._warm_up(list(self.registry))
        except RefinementCancelledError:
            return
        self.warmed_up.set()
        while (item := queue.get()) is not None:
            try:
                if isinstance(item, Frame):
                    self.process(item)
                else:
                    item()
            except RefinementCancelledError:
                return  # shutting down: the frame is abandoned between two engine stages
            except Exception as error:  # never let one frame end the worker
                if queue.closed or not self.context.ok():
                    return  # shutting down: the node's publishers may already be gone
                diagnostics.frame_failed(f"internal error: {error}")
                self.get_logger().error(f"frame processing failed: {error}\n{traceback.format_exc()}")

    def _warm_up(self, models: list[Any]) -> None:
        """One engine call on a grey 320×240 image with each of ``models`` 3 diameters ahead (results
        unused); with ``use_depth`` also a depth image (a plane 1 m away), so that the depth path is warm
        too."""
        from rnnpose_ros.core.refiner import (  # heavy (torch): after the cheap start-up checks
            Instance,
            RefinementCancelledError,
        )

        start = time.monotonic()
        K = np.array([[300.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0.0, 0.0, 1.0]])
        instances = []
        for model in models:
            pose = np.eye(4)
            pose[:3, 3] = -model.center + (0.0, 0.0, 3.0 * model.diameter)
            instances.append(Instance(model.class_id, pose, "warmup"))
        depth = np.ones((240, 320), np.float32) if self.settings.use_depth else None
        try:
            self.refiner.refine(
                Observation(np.full((240, 320, 3), 128, np.uint8), K, depth=depth),
                instances,
                stop=self._stopping.is_set,
            )
        except RefinementCancelledError:
            raise
        except Exception as error:  # a failed warm-up only costs first-frame latency
            self.get_logger().warning(f"warm-up failed (the first frame will be slower): {error}")
            return
        if not self._stopping.is_set():
            self.get_logger().info(f"warm-up done in {time.monotonic() - start:.2f} s")

    def refine_frame(
        self, frame: Frame, stream: bool = True
    ) -> tuple[Detection3DArray, FrameOutcome, Header, np.ndarray | None]:
        """Worker thread: one frame through the engine, its warnings logged; the detections message the
        node publishes for it (in ``output_frame`` when set), the outcome, the output header and the
        (4, 4) camera → output transform (None: outputs stay in the image frame). Publishes nothing.

        ``stream``: a frame of the input topics, which advances the node's state across frames (tracks
        in track mode, stable ids, the symmetric objects' previous poses); a ``~/refine`` call is not
        (``stream=False``): refined from its own poses, named as the detector named them."""
        assert self.diagnostics is not None and self.tracking is not None
        header = frame.image.header
        stamp_ns = stamp_nanoseconds(header.stamp)
        if stream and self.tracking.tracking:
            outcome, message = self.tracking.track(frame, stop=self._stopping.is_set)
        else:
            outcome = process_frame(
                frame,
                self.refiner,
                self.settings,
                self.registry,
                stop=self._stopping.is_set,
                references=self.pose_memory.references(stamp_ns),
                not_ready=self._not_ready,
            )
            if stream:
                self.tracking.name_detections(frame, outcome)
            message = detection_array(header, frame.detections, outcome.detections, outcome.outputs)
        if stream:
            self.pose_memory.update(stamp_ns, outcome.refined_poses())
        if outcome.engine_failure is not None:
            self.get_logger().error(outcome.engine_failure, throttle_duration_sec=5.0)
        for key, text in outcome.warnings.items():
            self.diagnostics.warn(key, text)
        output_header, to_output = self.output_frame.resolve(header)
        return express(message, output_header, to_output), outcome, output_header, to_output

    def process(self, frame: Frame) -> Detection3DArray:
        """Refine (detect mode) or track (track mode) and publish one synchronised frame; returns the
        published detections."""
        assert self.diagnostics is not None
        start = time.monotonic()
        message, outcome, output_header, to_output = self.refine_frame(frame)
        processed = time.monotonic()
        if not self.is_active:
            return message  # deactivated while the frame was refined: no output any more
        self.pub_detections.publish(message)
        self._publish_extras(frame.image.header, outcome, output_header, to_output)
        done = time.monotonic()
        latency_s = {
            "queue": start - frame.queued,
            "convert": outcome.convert_s,
            "refine": outcome.refine_s,
            "publish": done - processed,
            "total": done - frame.queued,
        }
        self.diagnostics.frame_processed(
            latency_s,
            outcome.refined_count,
            outcome.failed_count,
            outcome.problem,
            outcome.over_limit,
            depth=outcome.depth_status,
        )
        return message

    def install_registry(self, registry: Any, changed: list[Any]) -> None:
        """Worker thread: build the engine's caches of the ``changed`` models and warm them up, then make
        ``registry`` the one every later frame uses. Raises (registry unchanged) when a model cannot be
        prepared (e.g. the learned backend without its weights file)."""
        if changed:
            self.refiner.prepare(changed)
        self.refiner.registry = registry  # the warm-up refines the new models through it
        if changed and self.settings.warmup:
            self._warm_up(changed)
        self.registry = registry
        self.tracking.use_registry(registry)

    def mark_not_ready(self, class_ids: list[str], reason: str) -> None:
        """Pass detections of ``class_ids`` through (``reason`` in the warning) until :meth:`mark_ready`."""
        text = f"{reason} (passed through until it is ready)"
        self._not_ready = {**self._not_ready, **dict.fromkeys(class_ids, text)}  # one atomic swap

    def mark_ready(self, class_ids: list[str] | None) -> None:
        """Refine ``class_ids`` (None: every class) again."""
        keep = {} if class_ids is None else {k: v for k, v in self._not_ready.items() if k not in class_ids}
        self._not_ready = keep

    def _publish_extras(
        self, header: Header, outcome: FrameOutcome, output_header: Header, to_output: np.ndarray | None
    ) -> None:
        """TF and markers under ``output_header`` (poses premultiplied by the (4, 4) ``to_output`` unless
        None) and, when subscribed, the debug overlay in the image (``header``) for one frame."""
        s = self.settings
        placed = (lambda T: T) if to_output is None else (lambda T: to_output @ T)
        pairs = list(zip(outcome.detections, outcome.outputs, strict=True))
        shown = [
            (item, result)
            for item, result in pairs
            if result.pose is not None and result.score >= s.score_threshold
        ]
        if s.publish_tf and shown:
            if output_header.frame_id:
                frames = [(s.tf_prefix + item.instance_id, placed(result.pose)) for item, result in shown]
                self.tf_broadcaster.sendTransform(object_transforms(output_header, frames))
            else:
                self.diagnostics.warn("tf-no-frame", "image header.frame_id is empty: no TF published")
        meshes = [
            MeshMarker(
                item.instance_id,
                placed(result.pose),
                display_uri(self.registry[item.class_id].mesh_path),
                self.registry[item.class_id].mesh_scale,
            )
            for item, result in shown
        ]
        current = {mesh.instance_id for mesh in meshes}
        if meshes or self._markers_shown:
            self.pub_markers.publish(
                mesh_markers(output_header, meshes, sorted(self._markers_shown - current))
            )
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
        """Stop the worker in any state: the engine stops at its next stage boundary (the frame in
        progress or the warm-up is abandoned, unpublished), and the worker is joined, so that no thread
        is left inside native code when the process exits."""
        if "node_services" in self.__dict__:  # absent when the constructor failed before the services
            self._release()
        super().destroy_node()
        # rclpy's LifecycleNode leaves its state machine alive, and with it the rcl node, which then
        # stays in the ROS graph (a later node of this name would be reported as a duplicate).
        self._state_machine.destroy_when_not_in_use()

    def refuse_duplicate(self, wait_s: float = DUPLICATE_CHECK_S) -> None:
        """Raise StartupError if, within ``wait_s`` of discovery, another node of this fully qualified
        name shows up in the domain (both would answer every frame, with duplicate TF)."""
        deadline = time.monotonic() + wait_s
        while self.context.ok():
            try:
                duplicates = duplicate_nodes(self)
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


def release_freed_memory() -> None:
    """Free the released engine now (tensors, OpenGL context) rather than at some later collection, and
    give the freed heap pages back to the system: glibc keeps them otherwise (measured: 700 → 440 MiB
    after one classical engine was dropped), and a lifecycle cleanup would not show in the RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
        refiner.config.use_one_restart_threshold(settings.restart_below_score)
    return refiner


def make_executor(node: RefinerNode) -> rclpy.executors.MultiThreadedExecutor:
    """The executor the node needs: one thread per ``~/refine`` call that may wait for the worker, and
    more for the inputs, timers, lifecycle and object services (each callback group of the node keeps
    its own ordering)."""
    return rclpy.executors.MultiThreadedExecutor(
        num_threads=node.settings.max_pending_requests + 3, context=node.context
    )


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
        executor = make_executor(node)
        node.refuse_duplicate()
        rclpy.spin(node, executor=executor)
    except (ParameterError, StartupError) as error:
        logger.fatal(str(error))
        return 2
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    except RCLError:
        if rclpy.ok():
            raise
        # a signal shut the context down while the node was still creating entities: a normal stop
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
