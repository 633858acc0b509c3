"""Tests of rnnpose_ros.core.geometry: SE(3), projection, crop windows (docs/method.md §1.3, §1.4, §1.7)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from rnnpose_ros.core.geometry import (
    CropStatus,
    GeometryInputError,
    backproject_depth,
    crop_sampling_grid,
    first_crop_window,
    make_pose,
    pixel_grid,
    project_points,
    sample_crop,
    se3_compose,
    se3_exp,
    se3_inverse,
    se3_log,
    skew,
    so3_log,
    transform_points,
    zoom_crop_window,
)
from rnnpose_ros.tools.parity_common import load_fixture

K_LM = torch.tensor([[572.4114, 0.0, 325.2611], [0.0, 573.57043, 242.04899], [0.0, 0.0, 1.0]])
IMAGE_SIZE = (480, 640)


def _rotation(axis, angle: float, dtype=torch.float64) -> torch.Tensor:
    axis = torch.as_tensor(axis, dtype=dtype)
    return se3_exp(torch.cat((torch.zeros(3, dtype=dtype), axis / axis.norm() * angle)))[:3, :3]


def _pose(axis, angle: float, t) -> torch.Tensor:
    return make_pose(_rotation(axis, angle), torch.as_tensor(t, dtype=torch.float64)).float()


def _cube(half: float = 0.04, n: int = 5) -> torch.Tensor:
    """(1, n³, 3) grid of points filling a cube of the given half side, metres."""
    s = torch.linspace(-half, half, n)
    return torch.stack(torch.meshgrid(s, s, s, indexing="ij"), -1).reshape(1, -1, 3)


# ------------------------------------------------------------------ SE(3)


def test_se3_golden_exp_and_inverse(golden):
    fixture = load_fixture(golden / "lm_step.pt")
    torch.testing.assert_close(se3_exp(fixture["se3_xi"]), fixture["se3_exp"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        se3_inverse(fixture["se3_exp"]), fixture["se3_inverse_of_exp"], atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(se3_log(fixture["se3_exp"]), fixture["se3_xi"], atol=1e-5, rtol=0.0)


def test_skew_is_cross_product():
    a, b = torch.randn(2, 7, 3, dtype=torch.float64)
    torch.testing.assert_close((skew(a) @ b[..., None])[..., 0], torch.linalg.cross(a, b))


def test_exp_of_pure_translation_and_rotation():
    T = se3_exp(torch.tensor([0.1, -0.2, 0.3, 0.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(T[:3, :3], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(T[:3, 3], torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    R = se3_exp(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, math.pi / 2], dtype=torch.float64))[:3, :3]
    expected = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(R, expected, atol=1e-15, rtol=0)


@pytest.mark.parametrize(
    "angle", [0.0, 1e-9, 3e-5, 1.5e-4, 1e-3, 0.5, 1.5, 2.5, math.pi - 1e-3, math.pi - 1e-7]
)
def test_log_exp_round_trip_float64(angle):
    gen = torch.Generator().manual_seed(int(angle * 1e6) % 1000)
    axis = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    omega = axis / axis.norm(dim=-1, keepdim=True) * angle
    xi = torch.cat((torch.randn(8, 3, generator=gen, dtype=torch.float64), omega), -1)
    T = se3_exp(xi)
    torch.testing.assert_close(se3_exp(se3_log(T)), T, atol=1e-9, rtol=0)
    if angle < math.pi - 1e-3:  # away from π the twist itself is unique
        torch.testing.assert_close(se3_log(T), xi, atol=1e-8, rtol=0)


def test_log_at_exactly_pi_and_float32():
    for axis in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 2.0, -2.0]):
        R = _rotation(axis, math.pi)
        omega = so3_log(R)
        assert torch.isfinite(omega).all()
        assert abs(float(omega.norm()) - math.pi) < 1e-9
        torch.testing.assert_close(se3_exp(torch.cat((torch.zeros(3, dtype=R.dtype), omega)))[:3, :3], R)
    xi = torch.tensor([[0.05, -0.01, 0.2, 0.3, -0.2, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0, 3.1]])
    assert se3_log(se3_exp(xi)).dtype == torch.float32
    torch.testing.assert_close(se3_log(se3_exp(xi)), xi, atol=1e-5, rtol=0)


def test_inverse_compose_transform():
    xi = torch.randn(4, 6, dtype=torch.float64)
    T = se3_exp(xi)
    eye = torch.eye(4, dtype=torch.float64).expand(4, 4, 4)
    torch.testing.assert_close(se3_compose(T, se3_inverse(T)), eye)
    points = torch.randn(4, 10, 3, dtype=torch.float64)
    back = transform_points(se3_inverse(T), transform_points(T, points))
    torch.testing.assert_close(back, points)


def test_exp_log_gradients_are_finite_at_zero():
    xi = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    se3_exp(xi).sum().backward()
    assert torch.isfinite(xi.grad).all()
    T = torch.eye(4, dtype=torch.float64, requires_grad=True)
    se3_log(T).sum().backward()
    assert torch.isfinite(T.grad).all()
    torch.autograd.gradcheck(se3_exp, (torch.randn(3, 6, dtype=torch.float64, requires_grad=True),))


# ------------------------------------------------------------------ projection


def test_project_backproject_round_trip():
    depth = 0.3 + torch.rand(2, 6, 8, dtype=torch.float64)
    K = K_LM.to(torch.float64).expand(2, 3, 3).clone()
    K[1, 0, 0] = 400.0
    points = backproject_depth(depth, K)
    torch.testing.assert_close(points[..., 2], depth)
    pixels = project_points(points.reshape(2, -1, 3), K).reshape(2, 6, 8, 2)
    torch.testing.assert_close(pixels, pixel_grid(6, 8, torch.float64).expand(2, 6, 8, 2))


def test_project_clamps_depth():
    points = torch.tensor([[[0.1, 0.0, 0.0], [0.1, 0.0, -1.0]]])
    pixels = project_points(points, K_LM[None])
    assert torch.isfinite(pixels).all()
    torch.testing.assert_close(pixels[0, 0, 0], K_LM[0, 0] * 10.0 + K_LM[0, 2])


# ------------------------------------------------------------------ first crop (§1.3)


def _opencv_first_crop(
    image: np.ndarray, x0: int, y0: int, side: int, size: int, interpolation
) -> np.ndarray:
    """Reference: copy the in-image part into a zero side×side canvas, then cv2.resize."""
    canvas = np.zeros((side, side, *image.shape[2:]), image.dtype)
    part = image[y0 : y0 + side, x0 : x0 + side]
    canvas[: part.shape[0], : part.shape[1]] = part
    return cv2.resize(canvas, (size, size), interpolation=interpolation)


def test_first_crop_bbox_side_and_intrinsics():
    vertices = _cube()
    pose = _pose([0, 0, 1], 0.0, [0.0, 0.0, 0.5])[None]
    window = first_crop_window(vertices, pose, K_LM[None], IMAGE_SIZE, published_conventions=True)
    pixels = torch.round(project_points(transform_points(pose, vertices), K_LM[None]))
    low, high = pixels.amin(1)[0], pixels.amax(1)[0]
    extent = high - low + 1
    side = math.floor(float(extent.max()) * 2.7)
    centre = low + extent / 2
    assert float(window.side[0]) == side
    torch.testing.assert_close(window.top_left[0], torch.floor(centre - side / 2))
    s = 320 / side
    x0, y0 = window.top_left[0].tolist()
    expected = torch.tensor(
        [[s * K_LM[0, 0], 0, s * (K_LM[0, 2] - x0)], [0, s * K_LM[1, 1], s * (K_LM[1, 2] - y0)]]
    )
    torch.testing.assert_close(window.K[0, :2], expected)
    assert int(window.status[0]) == CropStatus.OK


@pytest.mark.parametrize("published", [True, False])
def test_first_crop_sampling_matches_opencv_canvas_resize(published):
    # Right edge of the image: the window leaves the image there and must be zero padded.
    vertices = _cube(0.03)
    poses = torch.stack((_pose([0, 1, 0], 0.3, [0.25, 0.05, 0.6]), _pose([1, 0, 0], 0.2, [-0.02, 0.0, 0.9])))
    K = K_LM.expand(2, 3, 3)
    window = first_crop_window(vertices, poses, K, IMAGE_SIZE, published_conventions=published)
    rng = np.random.default_rng(0)
    image = rng.random((480, 640, 3), dtype=np.float32)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
    crops = sample_crop(tensor, window)
    depth = sample_crop(tensor[:, :1], window, mode="nearest")
    for b in range(2):
        x0, y0 = (int(v) for v in window.top_left[b])
        side = int(window.side[b])
        reference = _opencv_first_crop(image, x0, y0, side, 320, cv2.INTER_LINEAR)
        np.testing.assert_allclose(
            crops[b].permute(1, 2, 0).numpy(), reference, atol=1e-4
        )  # cv2 weight precision
        if published:  # OpenCV's nearest uses ⌊j·L/size⌋
            reference = _opencv_first_crop(image[..., 0], x0, y0, side, 320, cv2.INTER_NEAREST)
            np.testing.assert_array_equal(depth[b, 0].numpy(), reference)
    assert float(window.top_left[0, 0]) + float(window.side[0]) > 640  # really padded on the right


def test_first_crop_default_intrinsics_match_sampling():
    vertices = _cube()
    pose = _pose([1, 1, 0], 0.4, [0.03, -0.02, 0.7])[None]
    window = first_crop_window(vertices, pose, K_LM[None], IMAGE_SIZE)
    points = transform_points(pose, vertices)
    in_image = project_points(points, K_LM[None])
    in_crop = project_points(points, window.K)
    expected = (in_image - window.origin[:, None]) / window.step[:, None, None]
    torch.testing.assert_close(in_crop, expected, atol=1e-3, rtol=0)
    published = first_crop_window(vertices, pose, K_LM[None], IMAGE_SIZE, published_conventions=True)
    offset = 0.5 * (320 / window.side - 1)  # the published half-pixel slip
    torch.testing.assert_close(
        window.K[0, :2, 2] - published.K[0, :2, 2], offset.expand(2), atol=1e-4, rtol=0
    )


def test_first_crop_window_clamped_at_top_left():
    vertices = _cube()
    pose = _pose([0, 0, 1], 0.0, [-0.27, -0.2, 0.5])[None]  # near the top-left corner, partly outside
    window = first_crop_window(vertices, pose, K_LM[None], IMAGE_SIZE)
    assert int(window.status[0]) == CropStatus.OK
    torch.testing.assert_close(window.top_left[0], torch.zeros(2))


def test_first_crop_degenerate_cases():
    vertices = _cube()
    poses = torch.stack(
        (
            _pose([0, 0, 1], 0.0, [0.0, 0.0, -0.5]),  # behind the camera
            _pose([0, 0, 1], 0.0, [3.0, 0.0, 0.5]),  # fully outside (right)
            _pose([0, 0, 1], 0.0, [0.0, 0.0, 0.05]),  # 5 cm away: front face at 1 cm
            _pose([0, 0, 1], 0.0, [0.0, 0.0, 0.0]),  # camera inside the object
            _pose([0, 0, 1], 0.0, [0.0, 0.0, 0.6]),  # ordinary
        )
    )
    K = K_LM.expand(5, 3, 3)
    window = first_crop_window(vertices, poses, K, IMAGE_SIZE)
    expected = [
        CropStatus.BEHIND_CAMERA,
        CropStatus.OUTSIDE_IMAGE,
        CropStatus.OK,
        CropStatus.OK,
        CropStatus.OK,
    ]
    assert window.status.tolist() == [int(s) for s in expected]
    assert window.valid.tolist() == [False, False, True, True, True]
    for tensor in (window.top_left, window.side, window.K, crop_sampling_grid(window)):
        assert torch.isfinite(tensor).all()
    crops = sample_crop(torch.rand(1, 3, *IMAGE_SIZE), window)
    assert crops.shape == (5, 3, 320, 320) and torch.isfinite(crops).all()


def test_first_crop_batch_equals_singles_and_padding_mask():
    vertices = torch.cat((_cube(), torch.full((1, 5, 3), 50.0)), 1)  # 5 far-away padding vertices
    mask = torch.ones(3, vertices.shape[1], dtype=torch.bool)
    mask[:, -5:] = False
    poses = torch.stack([_pose([1, 0, 0], 0.1 * i, [0.05 * i, 0.0, 0.5 + 0.1 * i]) for i in range(3)])
    K = K_LM.expand(3, 3, 3)
    batch = first_crop_window(vertices, poses, K, IMAGE_SIZE, vertex_mask=mask)
    for i in range(3):
        single = first_crop_window(_cube(), poses[i : i + 1], K[:1], IMAGE_SIZE)
        torch.testing.assert_close(batch.top_left[i], single.top_left[0])
        torch.testing.assert_close(batch.side[i], single.side[0])
        torch.testing.assert_close(batch.K[i], single.K[0])


def test_crop_input_errors():
    with pytest.raises(GeometryInputError):
        first_crop_window(_cube(), torch.eye(4)[None], torch.eye(3)[None].expand(2, 3, 3), IMAGE_SIZE)
    window = first_crop_window(_cube(), _pose([0, 0, 1], 0.0, [0, 0, 0.5])[None], K_LM[None], IMAGE_SIZE)
    with pytest.raises(GeometryInputError):
        sample_crop(torch.zeros(1, 3, 100, 100), window)
    with pytest.raises(GeometryInputError):
        crop_sampling_grid(window, mode="bicubic")


# ------------------------------------------------------------------ zoom crop (§1.4)


def _first_crop_intrinsics(pose: torch.Tensor) -> torch.Tensor:
    return first_crop_window(_cube(), pose, K_LM[None], IMAGE_SIZE).K


def test_zoom_window_centre_side_and_published_intrinsics():
    vertices = _cube()
    pose = _pose([0, 1, 1], 0.3, [0.01, 0.02, 0.6])[None]
    K320 = _first_crop_intrinsics(pose)
    window = zoom_crop_window(vertices, pose, K320, published_conventions=True)
    centre = project_points(pose[:, None, :3, 3], K320)[0, 0]
    pixels = torch.round(project_points(transform_points(pose, vertices), K320))[0]
    low, high = pixels.amin(0), pixels.amax(0) + 1
    half = torch.cat((centre - low, high - centre)).max()
    side = 2 * half * 1.4
    torch.testing.assert_close(window.side[0], side)
    torch.testing.assert_close(window.top_left[0], centre - side / 2)
    fx = K320[0, 0, 0] * 239 / side
    cx = (K320[0, 0, 2] - (centre[0] - side / 2)) * 239 / side
    torch.testing.assert_close(window.K[0, 0, 0], fx)
    torch.testing.assert_close(window.K[0, 0, 2], cx)


def test_zoom_default_intrinsics_match_sampling():
    vertices = _cube()
    pose = _pose([0, 1, 1], 0.3, [0.01, 0.02, 0.6])[None]
    K320 = _first_crop_intrinsics(pose)
    window = zoom_crop_window(vertices, pose, K320)
    points = transform_points(pose, vertices)
    expected = (project_points(points, K320) - window.origin[:, None]) / window.step[:, None, None]
    torch.testing.assert_close(project_points(points, window.K), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("published", [True, False])
def test_zoom_sampling_is_affine_grid_align_corners_false(published):
    # The published sampling: affine_grid with theta = [[S/W, 0, 2c_x/W − 1], [0, S/H, 2c_y/H − 1]].
    vertices = _cube()
    pose = _pose([0, 1, 1], 0.3, [0.01, 0.02, 0.6])[None]
    K320 = _first_crop_intrinsics(pose)
    window = zoom_crop_window(vertices, pose, K320, published_conventions=published)
    image = torch.rand(1, 3, 320, 320)
    side = float(window.side[0])
    centre = window.top_left[0] + side / 2
    theta = torch.tensor(
        [[side / 320, 0.0, 2 * float(centre[0]) / 320 - 1], [0.0, side / 320, 2 * float(centre[1]) / 320 - 1]]
    )
    grid = torch.nn.functional.affine_grid(theta[None], [1, 3, 240, 240], align_corners=False)
    reference = torch.nn.functional.grid_sample(image, grid, align_corners=False)
    torch.testing.assert_close(sample_crop(image, window), reference, atol=2e-4, rtol=0)  # f32 grid rounding


def test_zoom_degenerate_cases_are_finite():
    vertices = _cube()
    poses = torch.stack(
        (
            _pose([0, 0, 1], 0.0, [0.0, 0.0, -0.5]),  # behind: origin and all vertices
            _pose([0, 0, 1], 0.0, [2.0, 0.0, 0.5]),  # outside the 320 crop
            _pose([0, 0, 1], 0.0, [0.0, 0.0, 0.05]),  # 5 cm
            _pose([0, 0, 1], 0.0, [0.0, 0.0, 0.5]),
        )
    )
    K320 = _first_crop_intrinsics(poses[3:]).expand(4, 3, 3)
    window = zoom_crop_window(vertices, poses, K320)
    expected = [CropStatus.BEHIND_CAMERA, CropStatus.OUTSIDE_IMAGE, CropStatus.OK, CropStatus.OK]
    assert window.status.tolist() == [int(s) for s in expected]
    for tensor in (window.top_left, window.side, window.K, crop_sampling_grid(window)):
        assert torch.isfinite(tensor).all()
    assert (window.side >= 1.0).all()
    crops = sample_crop(torch.rand(1, 2, 320, 320), window)
    assert torch.isfinite(crops).all()
