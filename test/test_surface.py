"""The batched, sync-free per-pixel lookups (core/surface.py) against the reference implementations in
test/reference_surface.py, on a real render of two different meshes in one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_surface import interpolate_vertex_attributes, nearest_vertex_depth

from rnnpose_ros.core.objects import load_pybullet_object, pybullet_mesh_available
from rnnpose_ros.core.surface import (
    SurfaceTable,
    coarse_context,
    pixel_corners,
    pixel_descriptors,
)
from rnnpose_ros.core.surface import nearest_vertex_depth as batched_nearest_depth
from rnnpose_ros.tools.op_counter import OpCounter

pytestmark = pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")
SIZE = 96
CONTEXT = 6


@pytest.fixture(scope="module")
def rendered(renderer):
    """Duck and sphere rendered in one batch with random per-vertex attributes (seeded)."""
    models = [load_pybullet_object("duck"), load_pybullet_object("textured_sphere", class_id="sphere")]
    poses = np.stack([np.eye(4), np.eye(4)])
    poses[0, :3, 3] = (0.0, 0.0, 0.6)
    poses[1, :3, :3] = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    poses[1, :3, 3] = (0.01, -0.005, 0.25)
    K = np.array([[110.0, 0.0, 47.3], [0.0, 112.0, 48.1], [0.0, 0.0, 1.0]])
    output = renderer.render(models, poses, K, (SIZE, SIZE))
    generator = torch.Generator().manual_seed(0)
    attributes = [torch.randn(len(m.vertices), CONTEXT + 4, generator=generator) for m in models]
    faces = [torch.as_tensor(np.asarray(m.faces), dtype=torch.int64) for m in models]
    vertices = [torch.as_tensor(np.asarray(m.vertices), dtype=torch.float32) for m in models]
    table = SurfaceTable.build(faces, vertices, attributes, [0, 1], CONTEXT)
    return output, torch.as_tensor(poses), faces, vertices, attributes, table


def test_lookups_equal_the_per_instance_reference(rendered) -> None:
    output, poses, faces, vertices, attributes, table = rendered
    assert (output.face_index >= 0).any(axis=(1, 2)).all(), "both instances must be visible"
    face_index = torch.as_tensor(output.face_index)
    corners = pixel_corners(face_index, torch.as_tensor(output.barycentric), table)
    descriptors = pixel_descriptors(corners, table, SIZE, SIZE)
    depth = batched_nearest_depth(corners, table, poses, SIZE, SIZE)
    for b in range(2):
        expected = interpolate_vertex_attributes(
            face_index[b : b + 1], output.barycentric[b : b + 1], faces[b], attributes[b]
        )
        torch.testing.assert_close(descriptors[b], expected[0, CONTEXT:], rtol=0, atol=1e-6)
        expected_depth = nearest_vertex_depth(
            face_index[b : b + 1], output.barycentric[b : b + 1], faces[b], vertices[b], poses[b : b + 1]
        )
        torch.testing.assert_close(depth[b], expected_depth[0], rtol=1e-7, atol=0)


def test_coarse_context_equals_resampling_the_full_map(rendered) -> None:
    """Evaluating the context only where the bilinear resampling reads gives the resampled full map."""
    output, _, faces, _, attributes, table = rendered
    face_index = torch.as_tensor(output.face_index)
    corners = pixel_corners(face_index, torch.as_tensor(output.barycentric), table)
    for coarse in ((12, 12), (7, 9)):
        lean = coarse_context(corners, table, SIZE, SIZE, coarse, 0.1)
        full = torch.cat(
            [
                interpolate_vertex_attributes(
                    face_index[b : b + 1], output.barycentric[b : b + 1], faces[b], a
                )
                for b, a in enumerate(attributes)
            ]
        )[:, :CONTEXT]
        expected = F.interpolate(0.1 * full, size=coarse, mode="bilinear", align_corners=True)
        torch.testing.assert_close(lean, expected, rtol=1e-5, atol=1e-6)


def test_lookups_do_not_synchronise(rendered) -> None:
    output, poses, _, _, _, table = rendered
    face_index, barycentric = torch.as_tensor(output.face_index), torch.as_tensor(output.barycentric)
    coarse_context(
        pixel_corners(face_index, barycentric, table), table, SIZE, SIZE, (12, 12), 0.1
    )  # warm cache
    with OpCounter() as counter:
        corners = pixel_corners(face_index, barycentric, table)
        pixel_descriptors(corners, table, SIZE, SIZE)
        batched_nearest_depth(corners, table, poses, SIZE, SIZE)
        coarse_context(corners, table, SIZE, SIZE, (12, 12), 0.1)
    assert counter.syncs == 0, counter.summary()
    assert counter.total_ops > 0
