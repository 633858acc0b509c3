"""Cross-process reliability of the ``refine_node`` executable: start-up errors are one line and exit
2, stopping in any state exits 0 promptly, a second node of the same name is refused, and a hostile
publisher (hundreds of malformed messages) never costs a frame or a detection."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from geometry_msgs.msg import Pose  # noqa: E402
from node_harness import (  # noqa: E402
    FRAME,
    PARAMS_FILE,
    SIZE,
    Camera,
    K,
    NodeProcess,
    detection,
    free_domain_id,
    run_node,
)
from sensor_msgs.msg import CameraInfo, Image, RegionOfInterest  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from vision_msgs.msg import Detection3D, Detection3DArray  # noqa: E402

from rnnpose_ros.ros.conversions import rgb_to_image  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402

FAST = ("outer_iterations:=1", "inner_iterations:=1", "restart_below_score:=0.0")


@pytest.fixture(scope="module")
def duck_scene() -> Any:
    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.render import Renderer
    from rnnpose_ros.core.synth import SceneSpec, make_scene

    duck = ObjectRegistry.from_yaml(REPO_ROOT / "config" / "objects.yaml")["duck"]
    return make_scene([duck, duck, duck, duck], 3, Renderer(), SceneSpec(size=SIZE, K=K, min_visible=0.2))


# ---------------------------------------------------------------- start-up errors


def _one_fatal_line(output: str) -> str:
    assert "Traceback" not in output and "RCLError" not in output, output
    fatal = [line for line in output.splitlines() if "FATAL" in line]
    assert len(fatal) == 1, output
    return fatal[0]


@pytest.mark.parametrize(
    ("override", "parameter"),
    [("outer_iterations:=2.5", "outer_iterations"), ("outer_iterations:='3'", "outer_iterations"),
     ("publish_tf:=maybe", "publish_tf"), ("score_threshold:=1", "score_threshold")],
)  # fmt: skip
def test_wrongly_typed_override_with_the_params_file_exits_2(override: str, parameter: str) -> None:
    code, output = run_node("--params-file", str(PARAMS_FILE), "-p", override)
    assert code == 2, output
    assert parameter in _one_fatal_line(output)


def test_params_file_missing_or_malformed_exits_2(tmp_path: Path) -> None:
    code, output = run_node("--params-file", str(tmp_path / "nope.yaml"))
    assert code == 2 and "no such file" in _one_fatal_line(output)
    bad = tmp_path / "bad.yaml"
    bad.write_text("/**:\n  ros__parameters: [\n")
    code, output = run_node("--params-file", str(bad))
    assert code == 2 and "bad.yaml" in _one_fatal_line(output)


def test_unusable_files_exit_2_with_the_reason(tmp_path: Path) -> None:
    latin1 = tmp_path / "objects.yaml"
    latin1.write_bytes(b"objects:\n  duck: {mesh: caf\xe9.obj}\n")
    code, output = run_node("-p", f"objects_file:={latin1}")
    assert code == 2 and "not UTF-8" in _one_fatal_line(output)

    weights = tmp_path / "random.tckpt"
    weights.write_bytes(np.random.default_rng(0).bytes(4096))
    objects = tmp_path / "weighted.yaml"
    objects.write_text(
        f"objects:\n  duck: {{mesh: pkg://pybullet_data/duck.obj, scale: 0.1, weights: {weights}}}\n"
    )
    code, output = run_node("-p", f"objects_file:={objects}", "-p", "backend:=rnnpose", "-p", "device:=cpu")
    line = _one_fatal_line(output)
    assert code == 2 and "random.tckpt" in line and "weights_only" not in line


# ---------------------------------------------------------------- stopping


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_during_a_refinement_exits_0_promptly(sig: int, duck_scene: Any) -> None:
    """Default schedule, four ducks: the signal arrives while the worker is inside the engine."""
    domain_id = free_domain_id()
    node = NodeProcess(domain_id, "warmup:=false")
    camera = Camera(domain_id)
    try:
        camera.wait_until_ready(node)
        camera.publish(duck_scene.image, [detection("duck", i.pose_init) for i in duck_scene.instances], 7)
        time.sleep(1.5)
        assert not camera.outputs, "the frame was refined before the signal: the test proves nothing"
        code, seconds, output = node.stop(sig)
    finally:
        camera.close()
    print(f"exit {code} {seconds:.2f} s after {signal.Signals(sig).name}")
    assert code == 0, output
    assert "terminate called" not in output and "Traceback" not in output, output
    assert seconds < 6.0, output


def test_stopping_during_the_warm_up_exits_0_promptly() -> None:
    node = NodeProcess(free_domain_id(), "warmup:=true")
    node.wait_for_line("ready:")
    code, seconds, output = node.stop(signal.SIGINT)
    print(f"exit {code} {seconds:.2f} s after SIGINT during the warm-up")
    assert code == 0 and "terminate called" not in output and "Traceback" not in output, output
    assert seconds < 6.0, output


# ---------------------------------------------------------------- two nodes of one name


def test_a_second_node_of_the_same_name_is_refused() -> None:
    domain_id = free_domain_id()
    first = NodeProcess(domain_id, "warmup:=false")
    try:
        first.wait_for_line("ready:")
        time.sleep(1.0)  # discovery
        second = NodeProcess(domain_id, "warmup:=false")
        deadline = time.monotonic() + 60.0
        while second.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        code, _, output = second.stop(signal.SIGINT)
        assert code == 2 and "already runs" in _one_fatal_line(output), output
        assert first.poll() is None, first.output
    finally:
        code, _, output = first.stop(signal.SIGINT)
    assert code == 0, output


# ---------------------------------------------------------------- a hostile publisher


def _pose(values: tuple[float, ...]) -> Pose:
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = values[:3]
    q = pose.orientation
    q.x, q.y, q.z, q.w = values[3:]
    return pose


def _same_pose(a: Any, b: Any) -> bool:
    """Bit for bit, NaN included: two PoseWithCovariance messages."""

    def values(p: Any) -> np.ndarray:
        pose = p.pose
        return np.array(
            [pose.position.x, pose.position.y, pose.position.z, pose.orientation.x, pose.orientation.y,
             pose.orientation.z, pose.orientation.w, *p.covariance]
        )  # fmt: skip

    return np.array_equal(values(a), values(b), equal_nan=True)


def _odd_detections(valid: np.ndarray) -> list[tuple[Detection3D, bool]]:
    """(detection, whether it can be refined) for every kind of bad or odd detection."""
    t = valid[:3, 3]
    behind = valid.copy()
    behind[2, 3] = -0.5
    outside = valid.copy()
    outside[0, 3] = 5.0
    far = valid.copy()
    far[:3, 3] *= 1e17 / far[2, 3]
    cases: list[tuple[Detection3D, bool]] = [
        (Detection3D(id="no-results"), False),
        (detection("", valid), False),
        (detection("teapot", valid), False),
        (detection("duck", behind), False),
        (detection("duck", outside), False),
        (detection("duck", far), False),
        (detection("duck", valid, "ünïcödé"), True),
        (detection("duck", valid, "same"), True),
        (detection("duck", valid, "same"), True),
    ]
    for values in (
        (math.nan, t[1], t[2], 0.0, 0.0, 0.0, 1.0),
        (math.inf, t[1], t[2], 0.0, 0.0, 0.0, 1.0),
        (*t, 0.0, 0.0, 0.0, 0.0),
        (*t, math.nan, 0.0, 0.0, 1.0),
        (*t, 0.0, 0.0, 0.0, 1e-300),
    ):
        item = detection("duck", valid)
        item.results[0].pose.pose = _pose(values)
        cases.append((item, False))
    huge = detection("duck", valid)
    q = huge.results[0].pose.pose.orientation
    q.x, q.y, q.z, q.w = (component * 1e200 for component in (q.x, q.y, q.z, q.w))
    cases.append((huge, True))
    return cases


def _bad_frames(image: np.ndarray, valid: np.ndarray) -> list[tuple[Image, CameraInfo, list[Detection3D]]]:
    """Frames that are wrong as a whole (every detection in them must be passed through)."""
    frames = []

    def frame(edit_image=None, edit_info=None) -> None:
        header = Header(frame_id=FRAME)
        msg = rgb_to_image(image, header)
        info = CameraInfo(header=header, height=SIZE[0], width=SIZE[1])
        info.k = K.ravel().tolist()
        if edit_image:
            edit_image(msg)
        if edit_info:
            edit_info(info)
        frames.append((msg, info, [detection("duck", valid), detection("duck", valid)]))

    frame(edit_image=lambda m: setattr(m, "encoding", "yuv422_weird"))
    frame(edit_image=lambda m: setattr(m, "encoding", "16UC1"))
    frame(edit_image=lambda m: setattr(m, "data", bytes(m.data[:1000])))
    frame(edit_image=lambda m: setattr(m, "step", 5))
    frame(edit_image=lambda m: (setattr(m, "width", 0), setattr(m, "step", 0)))
    frame(edit_image=lambda m: setattr(m.header, "frame_id", "other_frame"))
    frame(edit_info=lambda i: setattr(i, "k", [0.0] * 9))
    frame(edit_info=lambda i: setattr(i, "k", [math.nan] * 9))
    frame(edit_info=lambda i: setattr(i, "binning_x", 2))
    frame(edit_info=lambda i: setattr(i, "roi", RegionOfInterest(x_offset=8, width=SIZE[1], height=SIZE[0])))
    frame(edit_info=lambda i: (setattr(i, "width", 640), setattr(i, "height", 480)))
    return frames


@pytest.fixture(scope="module")
def hostile_run(duck_scene: Any) -> Iterator[dict[str, Any]]:
    """≥ 500 messages, frame by frame (each answered before the next), to a fast-schedule node."""
    domain_id = free_domain_id()
    node = NodeProcess(domain_id, *FAST, "warmup:=false")
    camera = Camera(domain_id)
    sent: dict[tuple[int, int], tuple[Detection3DArray, list[bool]]] = {}
    valid = duck_scene.instances[0].pose_init
    try:
        camera.wait_until_ready(node)
        odd = _odd_detections(valid)
        bad = _bad_frames(duck_scene.image, valid)
        messages, stamp = 0, 1000
        while messages < 510:
            stamp += 1
            header = Header(frame_id=FRAME)
            header.stamp.sec = stamp
            if stamp % 3 == 0:
                image, info, items = bad[(stamp // 3) % len(bad)]
                refinable = [False] * len(items)
            else:
                chosen = [odd[(stamp * 5 + k) % len(odd)] for k in range(5)]
                items, refinable = [d for d, _ in chosen], [r for _, r in chosen]
                image = rgb_to_image(duck_scene.image)
                info = CameraInfo(height=SIZE[0], width=SIZE[1])
                info.k = K.ravel().tolist()
            image.header = Header(frame_id=image.header.frame_id or FRAME, stamp=header.stamp)
            info.header = header
            array = Detection3DArray(header=header, detections=items)
            key = camera.publish_messages(image, info, array)
            messages += 3
            sent[key] = (array, refinable)
            camera.spin_until(lambda key=key: key in camera.outputs, 60.0, node)
        # Detections alone, without images: the node must say so in /diagnostics.
        camera.diagnostics.clear()
        for extra in range(6):
            lonely = Detection3DArray(header=Header(frame_id=FRAME))
            lonely.header.stamp.sec = 5000 + extra
            camera.pub_detections.publish(lonely)
            camera.spin_until(lambda count=extra: len(camera.diagnostics) > count, 10.0, node)
        yield {"camera": camera, "sent": sent, "node": node, "messages": messages}
    finally:
        camera.close()
        node.stop_cleanly()


def test_every_frame_and_detection_of_a_hostile_publisher_is_answered(hostile_run: dict[str, Any]) -> None:
    camera, sent = hostile_run["camera"], hostile_run["sent"]
    assert hostile_run["messages"] >= 500
    assert hostile_run["node"].poll() is None
    refined = passed = 0
    for key, (array, refinable) in sent.items():
        out, _ = camera.outputs[key]
        assert len(out.detections) == len(array.detections)
        assert len({d.id for d in out.detections}) == len(out.detections)
        for given, answer, can_refine in zip(array.detections, out.detections, refinable, strict=True):
            score = answer.results[0].hypothesis.score
            if score == 0.0:
                passed += 1
                if given.results:
                    assert _same_pose(answer.results[0].pose, given.results[0].pose)  # verbatim
            else:
                refined += 1
                assert can_refine and 0.0 < score <= 1.0
            assert answer.id.isascii()
    print(f"{len(sent)} frames, {refined} detections refined, {passed} passed through")
    assert refined > 0 and passed > 0


def test_detections_without_images_are_reported(hostile_run: dict[str, Any]) -> None:
    messages = [d.status[0].message for d in hostile_run["camera"].diagnostics]
    assert any("no image arrived" in m for m in messages), messages


def test_a_4k_image_arrives(hostile_run: dict[str, Any]) -> None:
    """A 4K rgb8 image (24.9 MB) gets through the project's DDS profile."""
    camera: Camera = hostile_run["camera"]
    before = int(camera.last_diagnostics()["received_image"])
    big = rgb_to_image(np.zeros((2160, 3840, 3), np.uint8), Header(frame_id=FRAME))
    for _ in range(3):
        camera.pub_image.publish(big)
        time.sleep(0.3)
    camera.diagnostics.clear()
    camera.spin_until(lambda: len(camera.diagnostics) >= 2, 10.0, hostile_run["node"])
    assert int(camera.last_diagnostics()["received_image"]) > before
