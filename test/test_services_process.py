"""Cross-process acceptance of the node's services and lifecycle: the real ``refine_node`` (classical
engine, a short schedule) in a child process, clients in this one, over DDS on loopback.

* ``~/refine``: 50 sequential and 10 concurrent calls on a synthetic duck scene, each answered with what
  the node published on ``~/detections`` for the same image; malformed calls answered with the reason.
* objects at run time: add an object, refine it, replace its mesh, remove it, while frames keep coming
  (none lost); bad requests refused with the reason and the registry unchanged.
* lifecycle: configure / activate / deactivate / cleanup twice, then shutdown, through the standard
  lifecycle services; subscriptions, threads and memory (RSS) of the node process after each cleanup.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("rnnpose_ros_interfaces")

from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from node_harness import SIZE, Camera, K, NodeProcess, detection, free_domain_id  # noqa: E402
from rnnpose_ros_interfaces.msg import ObjectEntry  # noqa: E402
from rnnpose_ros_interfaces.srv import Refine, RemoveObject, SetObject  # noqa: E402
from vision_msgs.msg import Detection3DArray  # noqa: E402

from rnnpose_ros.ros.conversions import pose_to_matrix  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402

NODE = "/rnnpose_refiner"
SHORT = ("outer_iterations:=1", "inner_iterations:=1", "restart_below_score:=0.0")
CALL_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def duck_scene() -> Any:
    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.render import Renderer
    from rnnpose_ros.core.synth import SceneSpec, make_scene

    duck = ObjectRegistry.from_yaml(REPO_ROOT / "config" / "objects.yaml")["duck"]
    return make_scene([duck, duck], 5, Renderer(), SceneSpec(size=SIZE, K=K, min_visible=0.3))


class Session:
    """A running ``refine_node`` and a camera + service client node in this process."""

    def __init__(self, *params: str):
        domain_id = free_domain_id()
        self.node = NodeProcess(domain_id, *params)
        self.camera = Camera(domain_id)
        client_node = self.camera.node
        self.refine = client_node.create_client(Refine, f"{NODE}/refine")
        self.add = client_node.create_client(SetObject, f"{NODE}/add_object")
        self.replace = client_node.create_client(SetObject, f"{NODE}/replace_object")
        self.remove = client_node.create_client(RemoveObject, f"{NODE}/remove_object")
        self.change_state = client_node.create_client(ChangeState, f"{NODE}/change_state")
        self.get_state = client_node.create_client(GetState, f"{NODE}/get_state")

    def wait_for(self, client: Any) -> None:
        self.camera.spin_until(client.service_is_ready, 60.0, self.node)

    def call(self, client: Any, request: Any) -> Any:
        return self.call_all(client, [request])[0]

    def call_all(self, client: Any, requests: list[Any]) -> list[Any]:
        """All ``requests`` sent at once; their answers in order."""
        futures = [client.call_async(request) for request in requests]
        self.camera.spin_until(lambda: all(f.done() for f in futures), CALL_TIMEOUT_S, self.node)
        return [f.result() for f in futures]

    def close(self) -> tuple[int, str]:
        self.camera.close()
        code, _, output = self.node.stop()
        return code, output


def detections_of(scene: Any) -> Detection3DArray:
    array = Detection3DArray()
    array.detections = [detection("duck", instance.pose_init) for instance in scene.instances]
    return array


def poses(message: Detection3DArray) -> list[np.ndarray]:
    return [pose_to_matrix(d.results[0].pose.pose)[0] for d in message.detections]


def assert_same_content(answer: Detection3DArray, published: Detection3DArray) -> None:
    assert answer.header == published.header
    assert [d.id for d in answer.detections] == [d.id for d in published.detections]
    for a, b in zip(poses(answer), poses(published), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert [d.results[0].hypothesis.score for d in answer.detections] == pytest.approx(
        [d.results[0].hypothesis.score for d in published.detections], abs=1e-6
    )


@pytest.fixture(scope="module")
def session(duck_scene: Any) -> Iterator[Session]:
    s = Session("warmup:=true", "max_pending_frames:=20", *SHORT)
    s.camera.wait_until_ready(s.node)
    s.wait_for(s.refine)
    yield s
    code, output = s.close()
    assert code == 0, output


def test_refine_calls_over_dds(session: Session, duck_scene: Any) -> None:
    request = Refine.Request(detections=detections_of(duck_scene))
    answer = session.call(session.refine, request)
    assert not answer.success and "no image yet" in answer.message

    # One frame on the topics: the node's published answer is the reference for every call.
    key = session.camera.publish(duck_scene.image, detections_of(duck_scene).detections, 100)
    session.camera.spin_until(lambda: key in session.camera.outputs, 60.0, session.node)
    published = session.camera.outputs[key][0]

    start = time.monotonic()
    for _ in range(50):
        answer = session.call(session.refine, request)
        assert answer.success, answer.message
        assert_same_content(answer.detections, published)
    sequential_s = time.monotonic() - start
    start = time.monotonic()
    answers = session.call_all(session.refine, [copy.deepcopy(request) for _ in range(10)])
    print(
        f"~/refine, {len(request.detections.detections)} detections per call: 50 sequential calls "
        f"{sequential_s:.1f} s ({sequential_s / 50 * 1000:.0f} ms per call), 10 concurrent calls "
        f"{time.monotonic() - start:.1f} s"
    )
    for answer in answers:
        assert answer.success, answer.message
        assert_same_content(answer.detections, published)

    malformed = copy.deepcopy(request)
    q = malformed.detections.detections[1].results[0].pose.pose.orientation
    q.x = q.y = q.z = q.w = 0.0
    answer = session.call(session.refine, malformed)
    assert not answer.success and "quaternion" in answer.message, answer.message
    refined = pose_to_matrix(answer.detections.detections[0].results[0].pose.pose)[0]
    np.testing.assert_allclose(refined, poses(published)[0], atol=1e-6)  # its neighbour is refined
    assert answer.detections.detections[1].results[0].hypothesis.score == 0.0
    bad_image = copy.deepcopy(request)
    bad_image.image = copy.deepcopy(published_image(duck_scene))
    bad_image.image.encoding = "yuv422"
    bad_image.camera_info.header = bad_image.image.header
    bad_image.camera_info.k = K.ravel().tolist()
    answer = session.call(session.refine, bad_image)
    assert not answer.success and "not refined" in answer.message, answer.message
    assert session.call(session.refine, request).success  # the node keeps going
    assert session.node.poll() is None


def published_image(scene: Any) -> Any:
    from std_msgs.msg import Header

    from rnnpose_ros.ros.conversions import rgb_to_image

    return rgb_to_image(scene.image, Header(frame_id="camera_color_optical_frame"))


def test_objects_at_run_time_over_dds(session: Session, duck_scene: Any) -> None:
    camera = session.camera
    sent: list[tuple[int, int]] = []

    def frame() -> None:
        sent.append(camera.publish(duck_scene.image, detections_of(duck_scene).detections, 200 + len(sent)))

    def entry(class_id: str, mesh: str = "pkg://pybullet_data/duck.obj", scale: float = 0.1) -> Any:
        return SetObject.Request(object=ObjectEntry(class_id=class_id, mesh=mesh, scale=scale))

    def refine(class_id: str) -> Any:
        array = Detection3DArray()
        array.detections = [detection(class_id, duck_scene.instances[0].pose_init)]
        return session.call(session.refine, Refine.Request(detections=array))

    frame()
    answer = session.call(session.add, entry("duck2"))
    assert answer.success and answer.class_ids == ["duck", "duck2"], answer.message
    frame()
    answer = refine("duck2")
    assert answer.success and answer.detections.detections[0].results[0].hypothesis.score > 0, answer.message

    refusals = {
        "already registered": session.call(session.add, entry("duck2")),
        "/nonexistent/mesh.obj": session.call(session.add, entry("cat", mesh="/nonexistent/mesh.obj")),
        "scale": session.call(session.add, entry("cat", scale=0.0)),
        "no object 'cat' to replace": session.call(session.replace, entry("cat")),
        "no object 'cat' to remove": session.call(session.remove, RemoveObject.Request(class_id="cat")),
    }
    for reason, refused in refusals.items():
        assert not refused.success and reason in refused.message, (reason, refused.message)
        assert refused.class_ids == ["duck", "duck2"]
    frame()

    sphere = "pkg://pybullet_data/textured_sphere_smooth.obj"
    answer = session.call(session.replace, entry("duck2", mesh=sphere, scale=0.05))
    assert answer.success, answer.message
    frame()
    answer = refine("duck2")
    assert len(answer.detections.detections) == 1, answer.message  # answered, with whatever the sphere fits
    answer = session.call(session.remove, RemoveObject.Request(class_id="duck2"))
    assert answer.success and answer.class_ids == ["duck"], answer.message
    frame()
    answer = refine("duck2")
    assert not answer.success and "unknown object class 'duck2'" in answer.message, answer.message
    camera.spin_until(lambda: all(key in camera.outputs for key in sent), 60.0, session.node)  # none lost


# ---------------------------------------------------------------- lifecycle


def process_figures(pid: int) -> tuple[int, float]:
    """(threads, resident memory in MiB) of a process, from /proc."""
    threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return threads, rss_kib / 1024.0


def test_lifecycle_cycles_over_dds(duck_scene: Any) -> None:
    s = Session("autostart:=false", "warmup:=true", *SHORT)
    try:
        s.wait_for(s.change_state)
        s.wait_for(s.refine)
        pid = s.node.process.pid

        def transition(transition_id: int) -> None:
            assert s.call(
                s.change_state, ChangeState.Request(transition=Transition(id=transition_id))
            ).success

        def state() -> str:
            return s.call(s.get_state, GetState.Request()).current_state.label

        def subscriptions() -> int:
            return sum(
                s.camera.node.count_subscribers(topic) for topic in ("image", "camera_info", "detections")
            )

        request = Refine.Request(detections=detections_of(duck_scene))
        request.image = published_image(duck_scene)
        request.camera_info.header = request.image.header
        request.camera_info.k = K.ravel().tolist()
        assert state() == "unconfigured"
        answer = s.call(s.refine, request)
        assert not answer.success and "unconfigured" in answer.message
        figures = {"unconfigured": process_figures(pid)}
        for cycle in (1, 2):
            transition(Transition.TRANSITION_CONFIGURE)
            assert state() == "inactive" and subscriptions() == 0
            figures[f"configured {cycle}"] = process_figures(pid)
            transition(Transition.TRANSITION_ACTIVATE)
            s.camera.spin_until(lambda: subscriptions() == 3, 10.0, s.node)
            answer = s.call(s.refine, request)
            assert answer.success, answer.message
            transition(Transition.TRANSITION_DEACTIVATE)
            s.camera.spin_until(lambda: subscriptions() == 0, 10.0, s.node)
            answer = s.call(s.refine, request)
            assert not answer.success and "inactive" in answer.message
            transition(Transition.TRANSITION_CLEANUP)
            assert state() == "unconfigured"
            assert s.camera.node.count_publishers(f"{NODE}/detections") == 0
            figures[f"cleaned up {cycle}"] = process_figures(pid)
        transition(Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
        assert state() == "finalized"
        for name, (threads, rss) in figures.items():
            print(f"{name}: {threads} threads, RSS {rss:.0f} MiB")
        (threads_1, rss_1), (threads_2, rss_2) = figures["cleaned up 1"], figures["cleaned up 2"]
        assert threads_2 <= threads_1, figures  # the second cycle leaves no thread behind
        assert rss_2 <= 1.1 * rss_1, figures  # nor memory
    finally:
        code, output = s.close()
    assert code == 0, output
