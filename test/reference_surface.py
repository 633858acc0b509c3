"""Reference implementations of the per-pixel surface lookups that core/surface.py batches.

Straightforward per-pixel gathers (``nonzero`` over the foreground, one batch item at a time for the
depth), kept as the ground truth that tests compare the batched, sync-free versions against.
"""

from __future__ import annotations

import numpy as np
import torch


def interpolate_vertex_attributes(
    face_index: torch.Tensor | np.ndarray,
    barycentric: torch.Tensor | np.ndarray,
    faces: torch.Tensor | np.ndarray,
    attributes: torch.Tensor,
) -> torch.Tensor:
    """Interpolate per-vertex attributes at every pixel; only foreground pixels are gathered.

    Args:
        face_index: (B, H, W) int64, -1 on background.
        barycentric: (B, H, W, 3) float.
        faces: (F, 3) int64 vertex indices of the rendered model.
        attributes: (N, C) float tensor on the output device (e.g. 288 learned channels).

    Returns:
        (B, C, H, W) tensor of ``attributes.dtype`` on ``attributes.device``, 0 on background.
    """
    device, dtype = attributes.device, attributes.dtype
    face_index = torch.as_tensor(face_index, device=device)
    barycentric = torch.as_tensor(barycentric, device=device, dtype=dtype)
    faces = torch.as_tensor(faces, device=device, dtype=torch.int64)
    batch, height, width = face_index.shape
    flat_faces = face_index.reshape(-1)
    fg = torch.nonzero(flat_faces >= 0, as_tuple=True)[0]
    corners = faces[flat_faces[fg]]  # (M, 3)
    weights = barycentric.reshape(-1, 3)[fg]  # (M, 3)
    out = torch.zeros(batch, height * width, attributes.shape[1], device=device, dtype=dtype)
    flat_out = out.view(-1, attributes.shape[1])
    # one corner at a time: peak memory (M, C) instead of (M, 3, C) for the 288 learned channels
    values = attributes[corners[:, 0]] * weights[:, 0:1]
    values.addcmul_(attributes[corners[:, 1]], weights[:, 1:2])
    values.addcmul_(attributes[corners[:, 2]], weights[:, 2:3])
    flat_out[fg] = values
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


def nearest_vertex_depth(
    face_index: torch.Tensor | np.ndarray,
    barycentric: torch.Tensor | np.ndarray,
    faces: torch.Tensor | np.ndarray,
    vertices: torch.Tensor | np.ndarray,
    poses: torch.Tensor | np.ndarray,
) -> torch.Tensor:
    """Published depth (docs/method.md §1.4.3): camera z of the face vertex with the largest
    barycentric weight.

    Args:
        face_index: (B, H, W) int64, -1 on background; barycentric: (B, H, W, 3).
        faces: (F, 3) int64; vertices: (N, 3) model frame, metres; poses: (B, 4, 4) model→camera.

    Returns:
        (B, H, W) float32 metres, 0 on background, on the device of ``vertices``.
    """
    vertices = torch.as_tensor(vertices)
    device = vertices.device
    face_index = torch.as_tensor(face_index, device=device)
    barycentric = torch.as_tensor(barycentric, device=device)
    faces = torch.as_tensor(faces, device=device, dtype=torch.int64)
    poses = torch.as_tensor(poses, device=device, dtype=torch.float64).reshape(-1, 4, 4)
    batch, height, width = face_index.shape
    out = torch.zeros(batch, height * width, dtype=torch.float32, device=device)
    verts = vertices.to(torch.float64)
    for b in range(batch):
        ids = face_index[b].reshape(-1)
        fg = torch.nonzero(ids >= 0, as_tuple=True)[0]
        corner = barycentric[b].reshape(-1, 3)[fg].argmax(-1)
        vertex = faces[ids[fg], corner]
        z = verts[vertex] @ poses[b, 2, :3] + poses[b, 2, 3]
        out[b, fg] = z.float()
    return out.reshape(batch, height, width)
