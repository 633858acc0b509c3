"""Renderer: metric depth, pinhole placement, barycentrics, face ids, batching, degenerate poses."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import trimesh
from reference_surface import interpolate_vertex_attributes, nearest_vertex_depth

from rnnpose_ros.core.objects import ObjectModel


def model_from_trimesh(mesh: trimesh.Trimesh, class_id: str = "m") -> ObjectModel:
    return ObjectModel.from_arrays(class_id, mesh.vertices, mesh.faces)


@pytest.fixture(scope="module")
def box():
    return model_from_trimesh(trimesh.creation.box(extents=(0.1, 0.08, 0.06)), "box")


def pose(R=None, t=(0.0, 0.0, 0.5)):
    T = np.eye(4)
    if R is not None:
        T[:3, :3] = R
    T[:3, 3] = t
    return T


def intrinsics(fx=500.0, fy=520.0, cx=100.0, cy=70.0):
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])


def test_depth_of_box_face_is_metric(renderer, box):
    out = renderer.render([box], pose(t=(0.01, -0.005, 0.6)), intrinsics(cx=80, cy=60), (120, 160))
    # the face at z_model = -0.03 faces the camera: camera z = 0.6 - 0.03
    fg = out.depth[0][out.mask[0]]
    assert fg.size > 1000
    np.testing.assert_allclose(fg, 0.57, atol=1e-4)
    assert (out.depth[0][~out.mask[0]] == 0).all()
    assert (out.face_index[0][~out.mask[0]] == -1).all()


def test_tilted_plane_depth_matches_ray_intersection(renderer):
    plane = square(0.3)
    angle = np.deg2rad(35)
    R = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    T = pose(R, (0.0, 0.0, 0.8))
    K = intrinsics(cx=90, cy=60)
    out = renderer.render([plane], T, K, (120, 180))
    v, u = np.nonzero(out.mask[0])
    rays = np.linalg.solve(K, np.stack([u, v, np.ones_like(u)]).astype(np.float64))  # (3, M), z = 1
    normal = R[:, 2]
    expected_z = (normal @ T[:3, 3]) / (normal @ rays)
    np.testing.assert_allclose(out.depth[0][v, u], expected_z, atol=1e-4)


def square(side: float) -> ObjectModel:
    """A single-sided square in the model z = 0 plane, facing -z (towards a camera looking along +z)."""
    h = side / 2
    vertices = np.array([[-h, -h, 0], [h, -h, 0], [h, h, 0], [-h, h, 0]])
    return model_from_trimesh(trimesh.Trimesh(vertices, [[0, 1, 2], [0, 2, 3]], process=False), "square")


@pytest.mark.parametrize(
    ("size", "cx", "cy", "t"),
    [
        ((120, 160), 80.0, 60.0, (0.0, 0.0, 0.7)),
        ((90, 200), 130.7, 30.2, (0.0213, -0.0071, 0.63)),
        ((151, 151), 75.0, 75.0, (-0.0117, 0.0131, 0.81)),
    ],
)
def test_projects_where_pinhole_says(renderer, size, cx, cy, t):
    t = np.asarray(t)
    K = intrinsics(cx=cx, cy=cy)
    out = renderer.render([square(0.05)], pose(t=t), K, size)
    # expected: pixel centres (integer coordinates) inside the projected square
    u0, u1 = (K[0, 0] * (t[0] + np.array([-0.025, 0.025])) / t[2]) + cx
    v0, v1 = (K[1, 1] * (t[1] + np.array([-0.025, 0.025])) / t[2]) + cy
    v, u = np.mgrid[: size[0], : size[1]]
    expected = (u > u0) & (u < u1) & (v > v0) & (v < v1)
    near_edge = (np.minimum(abs(u - u0), abs(u - u1)) < 0.01) | (np.minimum(abs(v - v0), abs(v - v1)) < 0.01)
    np.testing.assert_array_equal(out.mask[0][~near_edge], expected[~near_edge])
    rows, cols = np.nonzero(out.mask[0])
    centre = (K @ t)[:2] / t[2]
    assert abs(cols.mean() - centre[0]) < 0.5 and abs(rows.mean() - centre[1]) < 0.5
    np.testing.assert_allclose(out.depth[0][out.mask[0]], t[2], atol=1e-5)


def test_symmetric_box_centroid(renderer):
    cube = model_from_trimesh(trimesh.creation.box(extents=(0.05, 0.05, 0.05)), "cube")
    K = intrinsics(cx=100.0, cy=70.0)
    out = renderer.render([cube], pose(t=(0.0, 0.0, 0.6)), K, (140, 200))
    rows, cols = np.nonzero(out.mask[0])
    assert abs(cols.mean() - 100.0) < 1.0 and abs(rows.mean() - 70.0) < 1.0


def test_barycentric_interpolation_reproduces_camera_points(renderer):
    sphere = model_from_trimesh(trimesh.creation.icosphere(subdivisions=2, radius=0.06), "sphere")
    R = trimesh.transformations.rotation_matrix(0.7, [0.3, 1, 0.2])[:3, :3]
    T = pose(R, (-0.03, 0.02, 0.55))
    K = intrinsics(cx=64, cy=48)
    out = renderer.render([sphere], T, K, (96, 128))
    cam_vertices = torch.from_numpy(sphere.vertices.astype(np.float64) @ R.T + T[:3, 3])
    points = interpolate_vertex_attributes(out.face_index, out.barycentric, sphere.faces, cam_vertices)[0]
    mask = torch.from_numpy(out.mask[0])
    np.testing.assert_allclose(points[2][mask].numpy(), out.depth[0][out.mask[0]], atol=1e-5)
    v, u = np.nonzero(out.mask[0])
    proj = (K @ points[:, mask].numpy()) / points[2][mask].numpy()
    np.testing.assert_allclose(proj[0], u, atol=1e-3)
    np.testing.assert_allclose(proj[1], v, atol=1e-3)
    assert (points[:, ~mask] == 0).all()
    # face index valid and barycentrics normalised on the foreground
    assert out.face_index[0][out.mask[0]].max() < len(sphere.faces)
    np.testing.assert_allclose(out.barycentric[0][out.mask[0]].sum(-1), 1.0, atol=1e-6)
    assert (out.barycentric[0][out.mask[0]] >= 0).all()
    # nearest-vertex depth is within one triangle's depth range of the interpolated depth
    nearest = nearest_vertex_depth(out.face_index, out.barycentric, sphere.faces, sphere.vertices, T[None])
    assert (nearest[0][mask] - torch.from_numpy(out.depth[0])[mask]).abs().max() < 0.02
    assert (nearest[0][~mask] == 0).all()


def test_surface_normals_are_the_sphere_normals_in_the_camera_frame(renderer):
    sphere = model_from_trimesh(trimesh.creation.icosphere(subdivisions=4, radius=0.05), "sphere")
    R = trimesh.transformations.rotation_matrix(0.7, (1.0, 2.0, 0.5))[
        :3, :3
    ]  # normals must turn with the pose
    T = pose(R, t=(0.02, -0.01, 0.4))
    K = intrinsics(cx=80, cy=60)
    out = renderer.render([sphere], T, K, (120, 160))
    normals = renderer.surface_normals([sphere], T[None], out)
    fg = out.mask[0]
    assert normals.shape == (1, 120, 160, 3) and (normals[0][~fg] == 0).all()
    v, u = np.nonzero(fg)
    points = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u, float)], -1)
    points *= out.depth[0][fg][:, None]
    expected = (points - T[:3, 3]) / np.linalg.norm(points - T[:3, 3], axis=-1, keepdims=True)
    angle = np.degrees(np.arccos(np.clip((normals[0][fg] * expected).sum(-1), -1, 1)))
    assert np.percentile(angle, 99) < 1.0  # a faceted sphere's interpolated normals


def test_batch_equals_singles(renderer, box):
    sphere = model_from_trimesh(trimesh.creation.icosphere(subdivisions=1, radius=0.04), "sphere")
    poses = np.stack(
        [
            pose(t=(0.0, 0.0, 0.5)),
            pose(trimesh.transformations.random_rotation_matrix()[:3, :3], (0.01, 0.0, 0.4)),
        ]
    )
    Ks = np.stack([intrinsics(cx=60, cy=40), intrinsics(fx=300, fy=300, cx=50, cy=45)])
    batch = renderer.render([box, sphere], poses, Ks, (80, 120))
    for b, model in enumerate([box, sphere]):
        single = renderer.render([model], poses[b], Ks[b], (80, 120))
        for field in ("rgb", "depth", "mask", "face_index", "barycentric"):
            np.testing.assert_array_equal(getattr(batch, field)[b], getattr(single, field)[0], err_msg=field)
    assert batch.rgb.dtype == np.float32 and batch.depth.dtype == np.float32
    assert batch.face_index.dtype == np.int64 and batch.barycentric.dtype == np.float32
    assert batch.rgb.min() >= 0 and batch.rgb.max() <= 1


@pytest.mark.parametrize("t", [(0.0, 0.0, -0.5), (0.0, 0.0, -0.05), (5.0, 0.0, 0.5), (0.0, -3.0, 0.5)])
def test_degenerate_poses_give_empty_render(renderer, box, t):
    out = renderer.render([box], pose(t=t), intrinsics(), (60, 80))
    assert not out.mask.any() and (out.depth == 0).all() and (out.rgb == 0).all()
    assert (out.face_index == -1).all()


def test_camera_inside_object_is_valid(renderer, box):
    out = renderer.render([box], pose(t=(0.0, 0.0, 0.0)), intrinsics(), (60, 80))
    assert (out.depth[out.mask] > 0).all()
    bad = renderer.render([box], np.full((4, 4), np.nan), intrinsics(), (60, 80))
    assert not bad.mask.any()


@pytest.mark.skipif(importlib.util.find_spec("pybullet_data") is None, reason="pybullet_data not installed")
def test_textured_duck_renders_colour(renderer):
    from rnnpose_ros.core.objects import load_pybullet_object

    duck = load_pybullet_object("duck")
    T = pose(t=-duck.center + np.array([0.0, 0.0, 0.4]))
    out = renderer.render([duck], T, intrinsics(fx=572, fy=572, cx=120, cy=120), (240, 240))
    rgb = out.rgb[0][out.mask[0]]
    assert out.mask[0].sum() > 2000
    mean = rgb.mean(0)
    assert mean[0] > 0.5 and mean[1] > 0.4 and mean[2] < 0.3  # a yellow duck


@pytest.mark.skipif(importlib.util.find_spec("pybullet_data") is None, reason="pybullet_data not installed")
def test_no_light_renders_black_with_the_same_geometry(renderer):
    """Lighting with every term 0 (depth and silhouette only, no texture lookups): black colour, and
    depth, mask, faces and barycentrics as under any other light."""
    from rnnpose_ros.core.objects import load_pybullet_object
    from rnnpose_ros.core.render import Lighting

    duck = load_pybullet_object("duck")
    T = pose(t=-duck.center + np.array([0.0, 0.0, 0.4]))
    K = intrinsics(fx=572, fy=572, cx=120, cy=120)
    lit = renderer.render([duck], T, K, (240, 240))
    dark = renderer.render(
        [duck], T, K, (240, 240), lighting=Lighting(ambient=0.0, diffuse=0.0, specular=0.0)
    )
    assert lit.rgb[0][lit.mask[0]].max() > 0.5 and dark.rgb.max() == 0.0
    for name in ("depth", "mask", "face_index", "barycentric"):
        np.testing.assert_array_equal(getattr(dark, name), getattr(lit, name))


def test_texture_orientation(renderer):
    """uv v = 1 is the top row of the texture image (OpenGL convention, as trimesh loads OBJ files)."""
    plate = square(0.1)
    plate.uvs = np.array(
        [[0, 1], [1, 1], [1, 0], [0, 0]], dtype=np.float32
    )  # model y = -h (image top) -> v = 1
    texture = np.zeros((8, 8, 3), dtype=np.uint8)
    texture[:4, :, 0] = 255  # top half red
    texture[4:, :, 1] = 255  # bottom half green
    plate.texture = texture
    out = renderer.render([plate], pose(t=(0.0, 0.0, 0.5)), intrinsics(cx=50, cy=50), (100, 100))
    rows = np.nonzero(out.mask[0].any(1))[0]
    top, bottom = out.rgb[0, rows[2], 50], out.rgb[0, rows[-3], 50]
    assert top[0] > 0.5 > top[1] and bottom[1] > 0.5 > bottom[0]


def test_render_from_another_thread(renderer, box):
    import threading

    results = []
    thread = threading.Thread(
        target=lambda: results.append(renderer.render([box], pose(), intrinsics(cx=40, cy=30), (60, 80)))
    )
    thread.start()
    thread.join()
    assert results and results[0].mask.any()
    assert renderer.render([box], pose(), intrinsics(cx=40, cy=30), (60, 80)).mask.any()


def test_interpolate_many_channels_and_released_models(renderer):
    sphere = model_from_trimesh(trimesh.creation.icosphere(subdivisions=1, radius=0.05), "tmp")
    out = renderer.render(
        [sphere, sphere], np.stack([pose(), pose(t=(0.01, 0, 0.6))]), intrinsics(cx=50, cy=40), (80, 100)
    )
    features = torch.randn(len(sphere.vertices), 288, dtype=torch.float64)
    dense = interpolate_vertex_attributes(out.face_index, out.barycentric, sphere.faces, features)
    assert dense.shape == (2, 288, 80, 100)
    b, v, u = (int(x[0]) for x in np.nonzero(out.mask))
    corners = sphere.faces[out.face_index[b, v, u]]
    expected = (features[corners] * torch.from_numpy(out.barycentric[b, v, u]).double()[:, None]).sum(0)
    torch.testing.assert_close(dense[b, :, v, u], expected)
    del sphere, out  # its GL buffers are freed at the next render
    import gc

    gc.collect()
    assert renderer.render(
        [model_from_trimesh(trimesh.creation.box(), "b")], pose(t=(0, 0, 3.0)), intrinsics(), (40, 40)
    ).mask.any()


def test_closing_one_renderer_leaves_the_others_working(renderer, box):
    """Renderers share the process's EGL display: closing one must not end it for the rest."""
    from rnnpose_ros.core.render import Renderer

    before = renderer.render([box], pose(), intrinsics(cx=40, cy=30), (60, 80))
    other = Renderer()
    other.render([box], pose(), intrinsics(cx=40, cy=30), (60, 80))
    other.close()
    after = renderer.render([box], pose(), intrinsics(cx=40, cy=30), (60, 80))
    np.testing.assert_array_equal(after.face_index, before.face_index)


def test_a_renderer_collected_during_another_render_leaves_its_context_current(renderer, box):
    """A renderer dropped and garbage-collected inside another's render (its ``close`` runs there)
    must give that render its context back (seen as "no valid context" in the middle of a render)."""
    import ctypes

    from rnnpose_ros.core.render import Renderer

    EGL = pytest.importorskip("OpenGL.EGL")

    def current() -> int | None:
        return ctypes.cast(EGL.eglGetCurrentContext(), ctypes.c_void_p).value

    other = Renderer()
    if getattr(other._offscreen._platform, "_egl_display", None) is None:
        other.close()
        pytest.skip("not the EGL platform: contexts are not released per renderer there")
    with renderer._lock:
        renderer._make_current()
        mine = current()
        other.close()  # what the collector does when ``other`` is dropped here
        assert mine is not None and current() == mine
        renderer._release_context()
    renderer.render([box], pose(), intrinsics(cx=40, cy=30), (60, 80))
