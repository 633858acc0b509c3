"""The node's depth input without a node: :func:`parse_depth` / :func:`depth_to_image` on real message
classes (depth rendered from the duck mesh), a property-based check that ``parse_depth`` never raises,
and :class:`DepthPairing` (stamp matching, waiting, order) on a stand-in clock."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection3DArray

from rnnpose_ros.ros.conversions import DEPTH_ENCODINGS, ImageConversionError, depth_to_image, parse_depth
from rnnpose_ros.ros.depth_input import DepthPairing
from rnnpose_ros.ros.inputs import Frame

SIZE = (60, 80)
K = np.array([[150.0, 0.0, 39.5], [0.0, 150.0, 29.5], [0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def depth_m(renderer: Any, duck_registry: Any) -> np.ndarray:
    """(60, 80) float32 metres: the duck 0.4 m ahead, 0 around it."""
    pose = np.eye(4)
    pose[:3, 3] = -duck_registry["duck"].center + (0.0, 0.0, 0.4)
    depth = renderer.render([duck_registry["duck"]], pose, K, SIZE).depth[0]
    assert (depth > 0).mean() > 0.1
    return depth


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize(("encoding", "tolerance_m"), [("16UC1", 0.0005), ("32FC1", 0.0)])
def test_depth_round_trip_in_metres(depth_m: np.ndarray, encoding: str, tolerance_m: float) -> None:
    msg = depth_to_image(depth_m, Header(frame_id="cam"), encoding)
    assert (msg.encoding, msg.height, msg.width, msg.is_bigendian) == (encoding, *SIZE, 0)
    parsed = parse_depth(msg, SIZE)
    assert parsed.error is None and parsed.reason is None
    assert parsed.metres.dtype == np.float32 and parsed.metres.shape == SIZE
    np.testing.assert_allclose(parsed.metres, depth_m, atol=tolerance_m, rtol=1e-6)
    np.testing.assert_array_equal(parsed.metres == 0, depth_m == 0)  # unknown stays unknown


def test_32fc1_nan_and_inf_are_unknown_16uc1_is_millimetres(depth_m: np.ndarray) -> None:
    msg = depth_to_image(depth_m, encoding="32FC1")
    raw = np.frombuffer(msg.data, "<f4").reshape(SIZE).copy()
    assert np.isnan(raw[depth_m == 0]).all()  # REP 118: NaN = no reading
    raw[0, :3] = (np.inf, -np.inf, -1.0)
    msg.data = raw.tobytes()
    assert (parse_depth(msg, SIZE).metres[0, :3] == 0).all()
    millimetres = np.frombuffer(depth_to_image(depth_m, encoding="16UC1").data, "<u2").reshape(SIZE)
    np.testing.assert_array_equal(millimetres, np.round(depth_m * 1000.0).astype(np.uint16))


@pytest.mark.parametrize("encoding", sorted(DEPTH_ENCODINGS))
def test_row_padding_and_big_endian_are_honoured(depth_m: np.ndarray, encoding: str) -> None:
    kind, _ = DEPTH_ENCODINGS[encoding]
    packed = np.frombuffer(depth_to_image(depth_m, encoding=encoding).data, "<" + kind).reshape(SIZE)
    padded = np.zeros((SIZE[0], SIZE[1] + 3), ">" + kind)  # 3 samples of padding per row, big-endian
    padded[:, : SIZE[1]] = packed
    msg = Image(height=SIZE[0], width=SIZE[1], encoding=encoding, is_bigendian=1)
    msg.step, msg.data = padded.strides[0], padded.tobytes()
    expected = parse_depth(depth_to_image(depth_m, encoding=encoding), SIZE).metres
    np.testing.assert_array_equal(parse_depth(msg, SIZE).metres, expected)


def _bad(depth_m: np.ndarray, change: str) -> Image:
    msg = depth_to_image(depth_m, encoding="16UC1")
    if change == "encoding":
        msg.encoding = "mono8"
    elif change == "size":
        msg = depth_to_image(depth_m[::2, ::2], encoding="16UC1")
    elif change == "step":
        msg.step = msg.step - 2
    elif change == "truncated":
        msg.data = msg.data[: len(msg.data) // 2]
    elif change == "odd-step":
        msg.step, msg.data = msg.step + 1, bytes(msg.data) + bytes(SIZE[0])
    elif change == "all-zero":
        msg = depth_to_image(np.zeros_like(depth_m), encoding="16UC1")
    elif change == "all-nan":
        msg = depth_to_image(np.full_like(depth_m, np.nan), encoding="32FC1")
    return msg


@pytest.mark.parametrize(
    ("change", "reason", "text"),
    [
        ("encoding", "encoding", "unsupported depth encoding 'mono8'; supported: 16UC1, 32FC1"),
        ("size", "size", "depth image is 40×30 but the colour image is 80×60"),
        ("step", "layout", "step 158"),
        ("truncated", "layout", "4800 bytes"),
        ("odd-step", "layout", "multiple of 2"),
        ("all-zero", "no-valid-depth", "no valid pixel"),
        ("all-nan", "no-valid-depth", "no valid pixel"),
    ],
)
def test_unusable_depth_carries_its_reason(depth_m: np.ndarray, change: str, reason: str, text: str) -> None:
    parsed = parse_depth(_bad(depth_m, change), SIZE)
    assert parsed.metres is None and parsed.reason == reason and text in parsed.error


def test_depth_to_image_rejects_what_it_cannot_encode(depth_m: np.ndarray) -> None:
    with pytest.raises(ImageConversionError, match="cannot encode depth as 'mono16'"):
        depth_to_image(depth_m, encoding="mono16")
    with pytest.raises(ImageConversionError, match=r"expected \(H, W\) depth"):
        depth_to_image(depth_m[None], encoding="16UC1")


@st.composite
def depth_images(draw: Any) -> Image:
    encoding = draw(st.one_of(st.sampled_from(sorted(DEPTH_ENCODINGS)), st.text(max_size=8)))
    msg = Image(encoding=encoding, height=draw(st.integers(0, 5)), width=draw(st.integers(0, 5)))
    msg.step = draw(st.integers(0, 40))
    msg.is_bigendian = draw(st.integers(0, 1))
    msg.data = draw(st.binary(max_size=120))
    return msg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depth_images(), st.integers(1, 5), st.integers(1, 5))
def test_parse_depth_never_raises(msg: Image, height: int, width: int) -> None:
    parsed = parse_depth(msg, (height, width))
    if parsed.metres is None:
        assert parsed.reason and parsed.error
    else:
        assert parsed.metres.shape == (height, width) and parsed.metres.dtype == np.float32
        assert np.isfinite(parsed.metres).all() and (parsed.metres >= 0).all() and (parsed.metres > 0).any()


# ---------------------------------------------------------------- pairing


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _header(stamp_ns: int) -> Header:
    header = Header(frame_id="cam")
    header.stamp.sec, header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    return header


def frame(stamp_ns: int, queued: float) -> Frame:
    header = _header(stamp_ns)
    return Frame(
        Image(header=header), CameraInfo(header=copy.deepcopy(header)), Detection3DArray(), queued=queued
    )


def depth(stamp_ns: int) -> Image:
    return Image(header=_header(stamp_ns), encoding="16UC1")


def pairing(
    slop_s: float = 0.0, timeout_s: float = 0.5, capacity: int = 4
) -> tuple[DepthPairing, list, Clock]:
    clock = Clock()
    emitted: list[Frame] = []
    return DepthPairing(emitted.append, capacity, slop_s, timeout_s, clock), emitted, clock


def stamp_of(msg: Image | None) -> int | None:
    return None if msg is None else msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def test_a_frame_whose_depth_is_here_goes_at_once_with_it() -> None:
    pairs, emitted, _ = pairing()
    pairs.add_depth(depth(10**9))
    pairs.add_frame(frame(10**9, queued=0.0))
    (got,) = emitted
    assert stamp_of(got.depth) == 10**9 and len(pairs) == 0


def test_a_frame_waits_for_its_depth_then_goes_without_it() -> None:
    pairs, emitted, clock = pairing(timeout_s=0.5)
    pairs.add_frame(frame(1 * 10**9, queued=0.0))
    pairs.add_depth(depth(5 * 10**9))  # another frame's depth
    assert emitted == [] and len(pairs) == 1
    clock.now = 0.3
    pairs.release()
    assert emitted == []
    pairs.add_frame(frame(2 * 10**9, queued=0.3))
    pairs.add_depth(depth(1 * 10**9))  # late, within the wait
    assert [stamp_of(f.depth) for f in emitted] == [1 * 10**9]
    clock.now = 0.8
    pairs.release()
    assert [stamp_of(f.depth) for f in emitted] == [1 * 10**9, None]  # waited its 0.5 s


def test_frames_leave_in_order_behind_a_waiting_frame() -> None:
    pairs, emitted, clock = pairing(timeout_s=0.5)
    pairs.add_depth(depth(2 * 10**9))
    pairs.add_frame(frame(1 * 10**9, queued=0.0))
    pairs.add_frame(frame(2 * 10**9, queued=0.1))  # has its depth, but frame 1 is older
    assert emitted == []
    clock.now = 0.5
    pairs.release()
    assert [(stamp_of(f.image), stamp_of(f.depth)) for f in emitted] == [
        (10**9, None),
        (2 * 10**9, 2 * 10**9),
    ]


def test_slop_pairs_the_nearest_depth_within_it() -> None:
    pairs, emitted, _ = pairing(slop_s=0.02)
    for offset_ms in (-30, -15, 5, 25):
        pairs.add_depth(depth(10**9 + offset_ms * 1_000_000))
    pairs.add_frame(frame(10**9, queued=0.0))
    assert stamp_of(emitted[0].depth) == 10**9 + 5_000_000
    exact, emitted_exact, _ = pairing(slop_s=0.0, timeout_s=0.0)
    exact.add_depth(depth(10**9 + 1))
    exact.add_frame(frame(10**9, queued=0.0))
    assert emitted_exact[0].depth is None  # one nanosecond off, no slop, no wait


def test_capacity_bounds_depth_images_and_waiting_frames() -> None:
    pairs, emitted, _ = pairing(capacity=2, timeout_s=10.0)
    for second in (1, 2, 3):
        pairs.add_depth(depth(second * 10**9))
    pairs.add_frame(frame(1 * 10**9, queued=0.0))  # its depth was forgotten: waits
    assert emitted == []
    pairs.add_frame(frame(4 * 10**9, queued=0.0))
    pairs.add_frame(frame(5 * 10**9, queued=0.0))  # three waiting > 2: the oldest goes without depth
    assert [(stamp_of(f.image), f.depth) for f in emitted] == [(10**9, None)]
    assert len(pairs) == 2
