"""In-process tests of the node's lifecycle and services (``~/refine``, the object services) with real
rclpy and DDS and the stand-in engine of test_node.py (plus ``prepare``), spun by the same
multi-threaded executor as ``refine_node``. The cross-process acceptance runs are in
test_services_process.py.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("rnnpose_ros_interfaces")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rnnpose_ros_interfaces.msg import ObjectEntry  # noqa: E402
from rnnpose_ros_interfaces.srv import Refine, ReloadObjects, RemoveObject, SetObject  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from test_node import SHIFT_M, ShiftRefiner, inputs, pose  # noqa: E402

from rnnpose_ros.ros.conversions import pose_to_matrix  # noqa: E402
from rnnpose_ros.ros.node import RefinerNode, make_executor  # noqa: E402

TIMEOUT_S = 20.0


class PreparingRefiner(ShiftRefiner):
    """The stand-in engine with the engine's ``prepare``: records the class ids it prepared, and raises
    for those in ``fail_prepare`` like a learned backend whose weights file is missing."""

    def __init__(self, registry: Any):
        super().__init__(registry)
        self.prepared: list[str] = []
        self.fail_prepare: set[str] = set()

    def prepare(self, models: list | None = None) -> None:
        for model in models if models is not None else list(self.registry):
            if model.class_id in self.fail_prepare:
                raise RuntimeError(f"object {model.class_id!r} has no weights")
            self.prepared.append(model.class_id)


class Client:
    """The node under a multi-threaded executor in a background thread, and a client node."""

    def __init__(self, context: Any, **overrides: Any):
        parameters = [Parameter("diagnostics_period", value=0.2), Parameter("warmup", value=False)]
        parameters += [Parameter(name, value=value) for name, value in overrides.items()]
        self.node = RefinerNode(
            refiner_factory=lambda settings, registry: PreparingRefiner(registry),
            context=context,
            parameter_overrides=parameters,
        )
        self.client = rclpy.create_node("service_client", context=context)
        name = self.node.get_fully_qualified_name()
        self.refine = self.client.create_client(Refine, f"{name}/refine")
        self.add = self.client.create_client(SetObject, f"{name}/add_object")
        self.replace = self.client.create_client(SetObject, f"{name}/replace_object")
        self.remove = self.client.create_client(RemoveObject, f"{name}/remove_object")
        self.reload = self.client.create_client(ReloadObjects, f"{name}/reload_objects")
        self.diagnostics: list[DiagnosticArray] = []
        self.client.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.pub_image = self.client.create_publisher(Image, "image", 10)
        self.pub_info = self.client.create_publisher(CameraInfo, "camera_info", 10)
        self.executor = make_executor(self.node)
        self.executor.add_node(self.node)
        self.executor.add_node(self.client)
        self._spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self._spinner.start()
        assert self.refine.wait_for_service(timeout_sec=TIMEOUT_S)

    def call(self, client: Any, request: Any) -> Any:
        future = client.call_async(request)
        deadline = time.monotonic() + TIMEOUT_S
        while not future.done():
            assert time.monotonic() < deadline, "no answer"
            time.sleep(0.01)
        return future.result()

    def publish_image(self) -> Image:
        """One image + camera_info (no detections) for the node's latest-image cache."""
        image, info, _ = inputs([])
        before = self.node.node_services.latest.get()
        self.pub_image.publish(image)
        self.pub_info.publish(info)
        wait_until(lambda: self.node.node_services.latest.get() is not before)
        return image

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.client.destroy_node()


def wait_until(condition: Callable[[], Any], timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def worker_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "rnnpose_worker"]


def refine_request(*detections: tuple[str, np.ndarray | None, str], with_image: bool = False) -> Any:
    image, info, array = inputs(list(detections))
    request = Refine.Request(detections=array)
    if with_image:
        request.image, request.camera_info = image, info
    return request


def entry(class_id: str, mesh: str = "pkg://pybullet_data/duck.obj", scale: float = 0.1) -> Any:
    return SetObject.Request(object=ObjectEntry(class_id=class_id, mesh=mesh, scale=scale))


@pytest.fixture
def client(context: Any, request: pytest.FixtureRequest) -> Iterator[Client]:
    c = Client(context, **getattr(request, "param", {}))
    yield c
    c.close()


# ---------------------------------------------------------------- ~/refine


def test_refine_on_the_latest_image(client: Client) -> None:
    image = client.publish_image()
    T0 = pose(0.02)
    answer = client.call(client.refine, refine_request(("duck", T0, ""), ("duck", pose(-0.03), "7")))
    assert answer.success, answer.message
    assert answer.detections.header == image.header
    assert [d.id for d in answer.detections.detections] == ["duck_0", "duck_7"]
    T = pose_to_matrix(answer.detections.detections[0].results[0].pose.pose)[0]
    np.testing.assert_allclose(T[:3, 3], T0[:3, 3] + (SHIFT_M, 0.0, 0.0), atol=1e-9)
    assert answer.detections.detections[0].results[0].hypothesis.score == pytest.approx(0.8)


def test_refine_on_the_image_of_the_request(client: Client) -> None:
    request = refine_request(("duck", pose(), ""), with_image=True)
    answer = client.call(client.refine, request)
    assert answer.success, answer.message
    assert answer.detections.header == request.image.header


def test_refine_refusals_say_why(client: Client) -> None:
    answer = client.call(client.refine, refine_request(("duck", pose(), "")))
    assert not answer.success and "no image yet" in answer.message
    assert not client.call(client.refine, Refine.Request()).success
    request = refine_request(("duck", pose(), ""), with_image=True)
    request.camera_info.k = [0.0] * 9
    answer = client.call(client.refine, request)
    assert not answer.success and "camera_info" in answer.message
    assert client.node.refiner.calls == []


def test_malformed_content_is_an_error_answer_and_the_node_goes_on(client: Client) -> None:
    client.publish_image()
    request = refine_request(("duck", pose(0.02), ""), ("duck", pose(), ""))
    request.detections.detections[1].results[0].pose.pose.orientation.x = math.nan
    answer = client.call(client.refine, request)
    assert not answer.success and "quaternion" in answer.message, answer.message
    scores = [d.results[0].hypothesis.score for d in answer.detections.detections]
    assert scores == pytest.approx([0.8, 0.0])  # the bad detection costs only itself
    request = refine_request(("duck", pose(), ""), with_image=True)
    request.image.encoding = "yuv422"
    answer = client.call(client.refine, request)
    assert not answer.success and "not refined" in answer.message
    assert client.call(client.refine, refine_request(("duck", pose(), ""))).success


@pytest.mark.parametrize("client", [{"max_pending_requests": 1}], indirect=True)
def test_calls_beyond_max_pending_requests_are_refused_the_others_wait(client: Client) -> None:
    client.publish_image()
    entered, release = threading.Event(), threading.Event()
    original = client.node.refiner.refine

    def blocking(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(timeout=TIMEOUT_S)
        return original(*args, **kwargs)

    client.node.refiner.refine = blocking
    try:
        first = client.refine.call_async(refine_request(("duck", pose(), "")))
        wait_until(entered.is_set)
        second = client.call(client.refine, refine_request(("duck", pose(), "")))
        assert not second.success and "busy" in second.message and "max_pending_requests" in second.message
        assert not first.done()
    finally:
        release.set()
    wait_until(first.done)
    assert first.result().success


def test_nothing_is_published_for_a_call(client: Client) -> None:
    outputs: list[Any] = []
    from vision_msgs.msg import Detection3DArray

    client.client.create_subscription(
        Detection3DArray, f"{client.node.get_fully_qualified_name()}/detections", outputs.append, 10
    )
    client.publish_image()
    assert client.call(client.refine, refine_request(("duck", pose(), ""))).success
    time.sleep(0.3)
    assert outputs == []


# ---------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("client", [{"autostart": False}], indirect=True)
def test_lifecycle_transitions(client: Client) -> None:
    node = client.node
    assert node.state_label == "unconfigured" and node.refiner is None
    answer = client.call(client.refine, refine_request(("duck", pose(), ""), with_image=True))
    assert not answer.success and "unconfigured" in answer.message
    assert not client.call(client.add, entry("duck2")).success
    for cycle in range(2):
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.state_label == "inactive" and node.warmed_up.is_set() and len(worker_threads()) == 1
        assert client.pub_image.get_subscription_count() == 0
        answer = client.call(client.refine, refine_request(("duck", pose(), ""), with_image=True))
        assert not answer.success and "inactive" in answer.message
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        wait_until(lambda: client.pub_image.get_subscription_count() == 1)
        answer = client.call(client.refine, refine_request(("duck", pose(), ""), with_image=True))
        assert answer.success, answer.message
        # runtime parameters stay tunable in every state; read-only ones are refused with a reason
        assert node.set_parameters([Parameter("score_threshold", value=0.1 * (cycle + 1))])[0].successful
        refused = node.set_parameters([Parameter("device", value="cpu")])[0]
        assert not refused.successful and "read-only" in refused.reason
        refiner = node.refiner
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        wait_until(lambda: client.pub_image.get_subscription_count() == 0)
        assert node.refiner is refiner  # caches kept
        client.diagnostics.clear()
        wait_until(lambda: any("inactive" in d.status[0].message for d in client.diagnostics))
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert node.refiner is None and node.registry is None and node.queue is None
        assert node.settings.score_threshold == pytest.approx(0.1 * (cycle + 1))
        assert worker_threads() == []  # joined by cleanup
    assert node.set_parameters([Parameter("score_threshold", value=0.5)])[0].successful
    assert node.trigger_shutdown() == TransitionCallbackReturn.SUCCESS
    assert node.state_label == "finalized"


def test_configure_failure_leaves_the_node_unconfigured(context: Any, tmp_path: Any) -> None:
    objects = tmp_path / "objects.yaml"
    objects.write_text("objects: {duck: {mesh: pkg://pybullet_data/duck.obj, scale: 0.1}}\n")
    c = Client(context, autostart=False, objects_file=str(objects))
    try:
        objects.write_text("objects: {duck: {mesh: missing.obj}}\n")
        assert c.node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert c.node.state_label == "unconfigured" and c.node.queue is None
        objects.write_text("objects: {duck: {mesh: pkg://pybullet_data/duck.obj, scale: 0.1}}\n")
        assert c.node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    finally:
        c.close()


# ---------------------------------------------------------------- the object registry at run time


def test_add_refine_replace_remove_an_object(client: Client) -> None:
    client.publish_image()
    node = client.node
    answer = client.call(client.add, entry("duck2"))
    assert answer.success, answer.message
    assert answer.class_ids == ["duck", "duck2"] and node.refiner.registry is node.registry
    assert node.refiner.prepared == ["duck2"]
    answer = client.call(client.refine, refine_request(("duck2", pose(), "")))
    assert answer.success, answer.message

    first = node.registry["duck2"]
    answer = client.call(client.add, entry("duck2"))
    assert not answer.success and "already registered" in answer.message
    answer = client.call(client.replace, entry("duck2", scale=-1.0))
    assert not answer.success and "scale" in answer.message
    answer = client.call(client.replace, entry("duck2", mesh="/nonexistent/mesh.obj"))
    assert not answer.success and "/nonexistent/mesh.obj" in answer.message
    assert node.registry["duck2"] is first  # refused: unchanged
    answer = client.call(
        client.replace, entry("duck2", mesh="pkg://pybullet_data/textured_sphere_smooth.obj", scale=0.05)
    )
    assert answer.success, answer.message
    assert node.registry["duck2"] is not first and node.registry["duck2"].diameter < first.diameter
    node.refiner.fail_prepare.add("duck3")
    answer = client.call(client.add, entry("duck3"))
    assert not answer.success and "no weights" in answer.message and "duck3" not in node.registry

    answer = client.call(client.remove, RemoveObject.Request(class_id="duck2"))
    assert answer.success and answer.class_ids == ["duck"]
    answer = client.call(client.refine, refine_request(("duck2", pose(), "")))
    assert not answer.success and "unknown" in answer.message
    answer = client.call(client.remove, RemoveObject.Request(class_id="duck2"))
    assert not answer.success and "no object 'duck2'" in answer.message
    answer = client.call(client.replace, entry("cat"))
    assert not answer.success and "add_object" in answer.message

    answer = client.call(client.reload, ReloadObjects.Request())
    assert answer.success and answer.class_ids == ["duck"], answer.message
    assert client.call(client.refine, refine_request(("duck", pose(), ""))).success


def test_detections_of_an_object_not_ready_are_passed_through(client: Client) -> None:
    client.publish_image()
    client.node.mark_not_ready(["duck"], "object 'duck' is being replaced at run time")
    answer = client.call(client.refine, refine_request(("duck", pose(), "")))
    assert not answer.success and "being replaced" in answer.message
    assert answer.detections.detections[0].results[0].hypothesis.score == 0.0
    client.node.mark_ready(["duck"])
    assert client.call(client.refine, refine_request(("duck", pose(), ""))).success


def test_a_destroyed_node_leaves_the_ros_graph(context: Any) -> None:
    """rclpy's LifecycleNode alone would keep the rcl node alive after destroy_node."""
    Client(context).close()
    observer = rclpy.create_node("observer", context=context)
    try:
        wait_until(lambda: ("rnnpose_refiner", "/") not in observer.get_node_names_and_namespaces())
    finally:
        observer.destroy_node()
