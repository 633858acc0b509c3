"""The refiner node's services: poses refined on request, and the object registry changed at run time.

:class:`NodeServices` attaches to a :class:`~rnnpose_ros.ros.node.RefinerNode` and serves

``~/refine`` (``rnnpose_ros_interfaces/srv/Refine``)
    the request's initial poses refined on the image given in the request, or on the latest image +
    camera_info pair with equal stamps (within ``sync_slop``) the node received; the answer holds what
    the node would publish on ``~/detections`` for that frame. Calls wait for the worker in arrival
    order, at most ``max_pending_requests`` of them; a call beyond them, a call while the node is not
    active, with no detections or without any image yet is answered at once with ``success: false``
    and the reason. Nothing is published for a call.
``~/add_object``, ``~/replace_object`` (``SetObject``), ``~/remove_object``, ``~/reload_objects``
    the registry with one object added, replaced or removed, or loaded again from ``objects_file``;
    entries are checked and loaded as at start (:meth:`~rnnpose_ros.core.objects.ObjectRegistry.with_object`,
    relative mesh paths relative to ``objects_file``), then the engine's caches of the new models are
    built and warmed up on the worker before the new registry replaces the old one. A refused request
    leaves the registry as it was. While an object is loaded and prepared, detections of its class are
    passed through with a throttled warning (``not ready``).

Threading: service callbacks run in executor threads (``~/refine`` in a reentrant group, so that
waiting calls do not block each other's admission; the object services in one mutually exclusive
group, so registry changes never interleave). Whatever touches the engine or the registry the worker
reads runs on the worker thread as a :class:`WorkerCall` through the node's
:class:`~rnnpose_ros.ros.inputs.FrameQueue`, between two frames, so that the worker never sees a
registry change in the middle of a frame. :class:`LatestImage` is fed from the executor and read by
the refine callback under its own lock.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import yaml
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rnnpose_ros_interfaces.msg import ObjectEntry
from rnnpose_ros_interfaces.srv import Refine, ReloadObjects, RemoveObject, SetObject
from sensor_msgs.msg import CameraInfo, Image
from vision_msgs.msg import Detection3DArray

from rnnpose_ros.ros.conversions import stamp_text
from rnnpose_ros.ros.inputs import Frame

if TYPE_CHECKING:
    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.ros.frame_processor import FrameOutcome
    from rnnpose_ros.ros.node import RefinerNode

T = TypeVar("T")
# Images (and camera_infos) kept to pair them by stamp: a camera_info may arrive a few images late.
PAIRING_DEPTH = 10
# How often a waiting service call checks that the node is still running, seconds.
POLL_S = 0.1


class WorkerCall(Generic[T]):
    """``work()`` to run on the worker thread, and its answer for the thread that waits (a
    :class:`~rnnpose_ros.ros.inputs.WorkerTask`). ``error`` is set instead of ``result`` when ``work``
    raised or the call was cancelled."""

    def __init__(self, work: Callable[[], T]):
        self._work = work
        self._done = threading.Event()
        self.result: T | None = None
        self.error: str | None = None

    def __call__(self) -> None:
        from rnnpose_ros.core.refiner import RefinementCancelledError  # heavy (torch): not at start-up

        try:
            self.result = self._work()
        except RefinementCancelledError:
            self.error = "cancelled: the node is stopping"
        except Exception as error:  # answered to the caller, never the worker's end
            self.error = f"{type(error).__name__}: {error}" if not str(error) else str(error)
        finally:
            self._done.set()

    def cancel(self, reason: str) -> None:
        self.error = reason
        self._done.set()

    def wait(self, still_running: Callable[[], bool]) -> bool:
        """Wait until done; False when ``still_running`` turned false first."""
        while not self._done.wait(POLL_S):
            if not still_running():
                return False
        return True


class LatestImage:
    """The newest image that has a camera_info of the same stamp (within ``slop_s`` seconds)."""

    def __init__(self, slop_s: float):
        self._slop_ns = round(slop_s * 1e9)
        self._images: deque[Image] = deque(maxlen=PAIRING_DEPTH)
        self._infos: deque[CameraInfo] = deque(maxlen=PAIRING_DEPTH)
        self._pair: tuple[Image, CameraInfo] | None = None
        self._lock = threading.Lock()

    def add_image(self, image: Image) -> None:
        with self._lock:
            self._images.append(image)
            self._pair_newest()

    def add_camera_info(self, info: CameraInfo) -> None:
        with self._lock:
            self._infos.append(info)
            self._pair_newest()

    def _pair_newest(self) -> None:
        newest = _nanoseconds(self._pair[0]) if self._pair is not None else None
        for image in reversed(self._images):
            stamp = _nanoseconds(image)
            if newest is not None and stamp <= newest:
                return
            info = next((i for i in self._infos if abs(_nanoseconds(i) - stamp) <= self._slop_ns), None)
            if info is not None:
                self._pair = (image, info)
                return

    def get(self) -> tuple[Image, CameraInfo] | None:
        with self._lock:
            return self._pair

    def clear(self) -> None:
        with self._lock:
            self._images.clear()
            self._infos.clear()
            self._pair = None


def _nanoseconds(message: Image | CameraInfo) -> int:
    return message.header.stamp.sec * 1_000_000_000 + message.header.stamp.nanosec


class NodeServices:
    """The services of the module docstring, on ``node`` (created with it, answering in every state)."""

    def __init__(self, node: RefinerNode):
        self._node = node
        self.latest = LatestImage(node.settings.sync_slop)
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        refine_group = ReentrantCallbackGroup()
        objects_group = MutuallyExclusiveCallbackGroup()
        for srv_type, name, handler, group in (
            (Refine, "~/refine", self._refine, refine_group),
            (SetObject, "~/add_object", lambda q, a: self._set_object(q, a, False), objects_group),
            (SetObject, "~/replace_object", lambda q, a: self._set_object(q, a, True), objects_group),
            (RemoveObject, "~/remove_object", self._remove_object, objects_group),
            (ReloadObjects, "~/reload_objects", self._reload_objects, objects_group),
        ):
            node.create_service(srv_type, name, self._guarded(name, handler), callback_group=group)

    def _guarded(self, name: str, handler: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """``handler`` that answers an unexpected exception (e.g. a cleanup racing the call) with
        ``success: false`` instead of letting it end the executor's spin."""

        def answer(request: Any, response: Any) -> Any:
            try:
                return handler(request, response)
            except Exception as error:
                self._node.get_logger().error(f"{name} failed: {error}\n{traceback.format_exc()}")
                response.success = False
                response.message = f"internal error: {type(error).__name__}: {error}"
                return response

        return answer

    def watch_inputs(self, image_subscriber: Any, camera_info_subscriber: Any) -> None:
        """Follow the node's image and camera_info subscriptions (message_filters-style subscribers)."""
        self.latest.clear()
        image_subscriber.registerCallback(self.latest.add_image)
        camera_info_subscriber.registerCallback(self.latest.add_camera_info)

    # --- ~/refine -------------------------------------------------------------------------------------

    def _refine(self, request: Refine.Request, response: Refine.Response) -> Refine.Response:
        node = self._node
        response.detections.header = request.detections.header
        refusal = self._refine_refusal(request)
        if refusal is not None:
            response.success, response.message = False, refusal
            return response
        if request.image.width or request.image.data:
            frame_image, frame_info = request.image, request.camera_info
        else:
            latest = self.latest.get()
            if latest is None:
                response.success = False
                response.message = (
                    f"no image yet: nothing received on {node.resolve_topic_name('image')} with a "
                    f"camera_info of the same stamp on {node.resolve_topic_name('camera_info')}; publish "
                    "them or give an image and camera_info in the request"
                )
                return response
            frame_image, frame_info = latest
        with self._waiting_lock:
            if self._waiting >= node.settings.max_pending_requests:
                response.success = False
                response.message = (
                    f"busy: {self._waiting} ~/refine calls are already waiting (max_pending_requests = "
                    f"{node.settings.max_pending_requests}); call again later"
                )
                return response
            self._waiting += 1
        try:
            frame = Frame(
                image=frame_image,
                camera_info=frame_info,
                detections=request.detections,
                queued=time.monotonic(),
            )
            call: WorkerCall[tuple[Detection3DArray, FrameOutcome, Any, Any]] = WorkerCall(
                lambda: node.refine_frame(frame, stream=False)
            )
            if not self._run_on_worker(call):
                response.success, response.message = False, call.error or "the node stopped"
                return response
        finally:
            with self._waiting_lock:
                self._waiting -= 1
        assert call.result is not None
        response.detections, outcome = call.result[:2]
        response.success, response.message = _refine_summary(outcome, frame_image)
        return response

    def _refine_refusal(self, request: Refine.Request) -> str | None:
        """Why ``request`` is answered without refinement, or None."""
        node = self._node
        if not node.is_active:
            return f"the node is {node.state_label}: ~/refine answers only while it is active"
        if not request.detections.detections:
            return "the request has no detections to refine"
        has_image = bool(request.image.width or request.image.data)
        if has_image and not any(request.camera_info.k) and not any(request.camera_info.p):
            return "the request has an image but no camera_info (K or P) for it"
        return None

    # --- the object registry --------------------------------------------------------------------------

    def _set_object(self, request: SetObject.Request, response: SetObject.Response, replace: bool) -> Any:
        node = self._node
        entry_msg: ObjectEntry = request.object
        class_id = entry_msg.class_id
        refusal = self._registry_refusal()
        if refusal is None:
            registered = class_id in node.registry
            if replace and not registered:
                refusal = (
                    f"no object {class_id!r} to replace (registered: {_names(node.registry)}); "
                    "use ~/add_object"
                )
            elif not replace and registered:
                refusal = f"object {class_id!r} is already registered: use ~/replace_object to change it"
        if refusal is not None:
            return _answer(response, False, refusal, node.registry)
        try:
            entry = _entry(entry_msg)
        except ValueError as error:
            return _answer(response, False, str(error), node.registry)
        verb = "replaced" if replace else "added"
        node.mark_not_ready([class_id], f"object {class_id!r} is being {verb} at run time")
        try:
            from rnnpose_ros.core.objects import ObjectModelError

            try:
                registry = node.registry.with_object(class_id, entry, node.settings.objects_file.parent)
            except ObjectModelError as error:
                return _answer(response, False, str(error), node.registry)
            call = WorkerCall(lambda: node.install_registry(registry, [registry[class_id]]))
            if not self._run_on_worker(call):
                return _answer(
                    response, False, f"object {class_id!r} not {verb}: {call.error}", node.registry
                )
        finally:
            node.mark_ready([class_id])
        node.get_logger().info(f"object {class_id!r} {verb} ({entry['mesh']})")
        return _answer(response, True, f"object {class_id!r} {verb}", node.registry)

    def _remove_object(self, request: RemoveObject.Request, response: RemoveObject.Response) -> Any:
        node = self._node
        refusal = self._registry_refusal()
        if refusal is None and request.class_id not in node.registry:
            refusal = f"no object {request.class_id!r} to remove (registered: {_names(node.registry)})"
        if refusal is not None:
            return _answer(response, False, refusal, node.registry)
        registry = node.registry.without(request.class_id)
        call = WorkerCall(lambda: node.install_registry(registry, []))
        if not self._run_on_worker(call):
            return _answer(
                response, False, f"object {request.class_id!r} not removed: {call.error}", node.registry
            )
        node.get_logger().info(f"object {request.class_id!r} removed")
        return _answer(response, True, f"object {request.class_id!r} removed", node.registry)

    def _reload_objects(self, request: ReloadObjects.Request, response: ReloadObjects.Response) -> Any:
        from rnnpose_ros.core.objects import ObjectModelError, ObjectRegistry

        node = self._node
        refusal = self._registry_refusal()
        if refusal is not None:
            return _answer(response, False, refusal, node.registry)
        path = node.settings.objects_file
        node.mark_not_ready(node.registry.class_ids, f"the objects are being reloaded from {path}")
        try:
            try:
                registry = ObjectRegistry.from_yaml(path)
            except ObjectModelError as error:
                return _answer(response, False, f"objects not reloaded: {error}", node.registry)
            node.mark_not_ready(registry.class_ids, f"the objects are being reloaded from {path}")
            call = WorkerCall(lambda: node.install_registry(registry, list(registry)))
            if not self._run_on_worker(call):
                return _answer(response, False, f"objects not reloaded: {call.error}", node.registry)
        finally:
            node.mark_ready(None)
        node.get_logger().info(f"objects reloaded from {path}: {_names(registry)}")
        return _answer(response, True, f"reloaded {len(registry)} object(s) from {path}", registry)

    def _registry_refusal(self) -> str | None:
        node = self._node
        if node.registry is None:
            return f"the node is {node.state_label}: the object registry exists once it is configured"
        return None

    # --- hand-over to the worker ----------------------------------------------------------------------

    def _run_on_worker(self, call: WorkerCall[Any]) -> bool:
        """Queue ``call`` for the worker and wait for it; False (``call.error`` says why) when it failed,
        was cancelled, or the node stopped first."""
        queue = self._node.queue
        if queue is None or not queue.submit(call):
            call.error = f"the node is {self._node.state_label}"
            return False
        if not call.wait(lambda: self._node.context.ok()):
            call.error = "the node is shutting down"
            return False
        return call.error is None


def _refine_summary(outcome: FrameOutcome, image: Image) -> tuple[bool, str]:
    """``(success, message)`` of a refine answer: every detection refined, or why not."""
    where = f"image {stamp_text(image.header.stamp)}"
    if outcome.problem is not None:
        return False, f"{where} not refined: {outcome.problem}"
    total, refined = len(outcome.outputs), outcome.refined_count
    text = f"refined {refined} of {total} detection(s) on {where} in {outcome.refine_s:.2f} s"
    if refined == total:
        return True, text
    return False, text + "; " + "; ".join(outcome.warnings.values())


def _entry(msg: ObjectEntry) -> dict[str, Any]:
    """The ``objects.yaml`` entry that ``msg`` describes (empty strings = key absent). Raises
    ValueError for symmetries that are not YAML."""
    entry: dict[str, Any] = {"mesh": msg.mesh, "scale": msg.scale, "symmetric": msg.symmetric}
    if msg.weights:
        entry["weights"] = msg.weights
    if msg.symmetries.strip():
        try:
            entry["symmetries"] = yaml.safe_load(msg.symmetries)
        except yaml.YAMLError as error:
            raise ValueError(f"object {msg.class_id!r}: symmetries is not YAML: {error}") from None
    return entry


def _names(registry: ObjectRegistry) -> str:
    return ", ".join(registry.class_ids) or "(none)"


def _answer(response: Any, success: bool, message: str, registry: ObjectRegistry | None) -> Any:
    response.success, response.message = success, message
    response.class_ids = [] if registry is None else registry.class_ids
    return response
