"""Offscreen renderer: RGB, metric depth and a per-pixel surface lookup (face id + barycentrics).

How it works. One OpenGL context per process comes from ``pyrender.OffscreenRenderer`` (EGL by default,
OSMesa when ``PYOPENGL_PLATFORM=osmesa``; set the variable before the first import of this module to
choose). A single rasterisation pass with a minimal shader writes ``gl_PrimitiveID`` into a 32-bit
integer buffer without multisampling, so every foreground pixel carries the exact index of the visible
triangle at its centre. Everything else is computed from that lookup on the host with NumPy (float64
geometry; NumPy rather than torch because torch's CPU thread pool competes with llvmpipe's rasteriser
threads and slows both down badly on a shared machine):

- barycentrics and depth by intersecting each pixel's ray with its triangle (exact, perspective
  correct, metric camera z);
- RGB by interpolating UVs and sampling the texture bilinearly (or interpolating vertex colours), lit
  with the Phong model of docs/method.md §2.9:
  ``albedo·(ambient + diffuse·max(0, n·l)) + specular·max(0, r·v)^s`` with interpolated vertex
  normals and one point light fixed in the object frame (defaults: ambient 0.5, diffuse 0.3, specular
  0.2, shininess 0, light at (1, 1, −1) m). With shininess 0 the specular term is the constant 0.2 on
  every object pixel (``0^0 = 1``, even where the surface faces away from the light), as in the
  published renderer.

pyrender's own draw pass is not used because it always multisamples colour, which blends face ids at
triangle edges. Meshes are uploaded once per model (cached by object identity).

Conventions: poses are model→camera 4×4 (OpenCV camera: x right, y down, z forward), metres; K is the
OpenCV intrinsic matrix; pixel (u, v) = (column, row) has its centre at integer coordinates.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")  # only if the user has not chosen a platform

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyrender
import torch
from OpenGL import GL

from rnnpose_ros.core.objects import ObjectModel

DEFAULT_ALBEDO = (0.7, 0.7, 0.7)
MIN_NEAR_M = 1e-3

_VERTEX_SHADER = """#version 330 core
layout(location = 0) in vec3 position;
uniform mat4 mvp;
void main() { gl_Position = mvp * vec4(position, 1.0); }
"""
_FRAGMENT_SHADER = """#version 330 core
layout(location = 0) out int face_id;
void main() { face_id = gl_PrimitiveID; }
"""


class RenderError(RuntimeError):
    """The rendering backend could not be initialised or failed."""


@dataclass(frozen=True)
class Lighting:
    """Phong parameters; the light position is in the object frame (metres), as in docs/method.md §2.9."""

    ambient: float = 0.5
    diffuse: float = 0.3
    specular: float = 0.2
    shininess: float = 0.0
    light_position: tuple[float, float, float] = (1.0, 1.0, -1.0)


@dataclass
class RenderOutput:
    """Batched render result (numpy, host memory).

    Attributes:
        rgb: (B, H, W, 3) float32 in [0, 1], background 0.
        depth: (B, H, W) float32 metric camera z in metres, background 0.
        mask: (B, H, W) bool, True where the object covers the pixel centre.
        face_index: (B, H, W) int64 triangle index into the model's faces, -1 on background.
        barycentric: (B, H, W, 3) float32 perspective-correct weights of the triangle's vertices
            (sum 1 on foreground, 0 on background).
    """

    rgb: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    face_index: np.ndarray
    barycentric: np.ndarray


@dataclass
class RenderTensors:
    """Batched render result as torch tensors on the device of the poses; fields, shapes, dtypes and
    units as :class:`RenderOutput`."""

    rgb: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor
    face_index: torch.Tensor
    barycentric: torch.Tensor


@dataclass
class _GpuMesh:
    vao: int
    buffers: tuple[int, int]
    num_indices: int


@dataclass
class _ModelArrays:
    vertices: np.ndarray  # (N, 3) float64
    vertices32: np.ndarray  # (N, 3) float32
    faces: np.ndarray  # (F, 3) int64
    normals: np.ndarray  # (N, 3) float32, area-weighted, shared across UV-seam duplicates
    uvs: np.ndarray | None  # (N, 2) float32
    texture: np.ndarray | None  # (h, w, 3) float32 [0, 1]
    colors: np.ndarray | None  # (N, 3) float32 [0, 1]


class Renderer:
    """Offscreen renderer; create one per process and reuse it (meshes stay uploaded)."""

    def __init__(self, lighting: Lighting | None = None) -> None:
        self.lighting = lighting or Lighting()
        self._lock = threading.Lock()
        try:
            self._offscreen = pyrender.OffscreenRenderer(1, 1)
        except Exception as exc:
            platform = os.environ.get("PYOPENGL_PLATFORM")
            raise RenderError(
                f"cannot create an OpenGL context (PYOPENGL_PLATFORM={platform}): {exc}"
            ) from exc
        self._make_current()
        self._program = _link_program(_VERTEX_SHADER, _FRAGMENT_SHADER)
        self._mvp_location = GL.glGetUniformLocation(self._program, "mvp")
        self._release_context()
        # GL buffers of garbage-collected models, deleted at the next render (needs the context)
        self._released: list[tuple[int, tuple[int, int]]] = []
        self._meshes: weakref.WeakKeyDictionary[ObjectModel, _GpuMesh] = weakref.WeakKeyDictionary()
        self._arrays: weakref.WeakKeyDictionary[ObjectModel, _ModelArrays] = weakref.WeakKeyDictionary()
        self._framebuffer: tuple[int, int, int] | None = None  # (fbo, colour rb, depth rb)
        self._framebuffer_size: tuple[int, int] | None = None

    def _make_current(self) -> None:
        self._offscreen._platform.make_current()  # pyrender exposes no public accessor for its context

    def _release_context(self) -> None:
        """Un-bind the context from this thread so that another thread can render next.

        pyrender's EGL platform makes this a no-op, so EGL is released directly.
        """
        platform = self._offscreen._platform
        display = getattr(platform, "_egl_display", None)
        if display is not None:
            from OpenGL import EGL

            EGL.eglMakeCurrent(display, EGL.EGL_NO_SURFACE, EGL.EGL_NO_SURFACE, EGL.EGL_NO_CONTEXT)
        else:
            platform.make_uncurrent()

    def _delete_released_meshes(self) -> None:
        while self._released:
            vao, buffers = self._released.pop()
            GL.glDeleteVertexArrays(1, [vao])
            GL.glDeleteBuffers(2, list(buffers))

    def render(
        self,
        models: Sequence[ObjectModel],
        poses: np.ndarray | torch.Tensor,
        K: np.ndarray | torch.Tensor,
        size: tuple[int, int],
        lighting: Lighting | None = None,
    ) -> RenderOutput:
        """Render B views, one model per view.

        Args:
            models: B models (or one, used for every view).
            poses: (B, 4, 4) or (4, 4) model→camera, metres.
            K: (B, 3, 3) or (3, 3) OpenCV intrinsics in pixels.
            size: (H, W) image size.
            lighting: overrides the renderer's lighting for this call.

        Poses behind the camera or outside the view give an empty (all background) image.
        """
        poses_np = _as_batch(poses, (4, 4), "poses")
        batch = poses_np.shape[0]
        K_np = _as_batch(K, (3, 3), "K")
        if K_np.shape[0] == 1 and batch > 1:
            K_np = np.repeat(K_np, batch, axis=0)
        models = list(models)
        if len(models) == 1 and batch > 1:
            models = models * batch
        if len(models) != batch or K_np.shape[0] != batch:
            raise ValueError(
                f"got {len(models)} models, {batch} poses and {K_np.shape[0]} K; they must match"
            )
        height, width = int(size[0]), int(size[1])
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        lighting = lighting or self.lighting

        face_index = np.full((batch, height, width), -1, dtype=np.int64)
        with self._lock:
            if self._offscreen is None:
                raise RenderError("renderer is closed")
            self._make_current()
            try:
                self._delete_released_meshes()
                self._bind_framebuffer(height, width)
                for b in range(batch):
                    face_index[b] = self._rasterise(models[b], poses_np[b], K_np[b], height, width)
                GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, 0)
            finally:
                self._release_context()

        rgb = np.zeros((batch, height, width, 3), dtype=np.float32)
        depth = np.zeros((batch, height, width), dtype=np.float32)
        bary = np.zeros((batch, height, width, 3), dtype=np.float32)
        for b in range(batch):
            fg = np.flatnonzero(face_index[b] >= 0)
            if fg.size == 0:
                continue
            shaded = self._shade(
                models[b], poses_np[b], K_np[b], width, fg, face_index[b].reshape(-1)[fg], lighting
            )
            valid, z, weights, colour = shaded
            face_index[b].reshape(-1)[fg[~valid]] = -1
            keep = fg[valid]
            depth[b].reshape(-1)[keep] = z
            bary[b].reshape(-1, 3)[keep] = weights
            rgb[b].reshape(-1, 3)[keep] = colour
        return RenderOutput(
            rgb=rgb, depth=depth, mask=face_index >= 0, face_index=face_index, barycentric=bary
        )

    def render_tensors(
        self,
        models: Sequence[ObjectModel],
        poses: np.ndarray | torch.Tensor,
        K: np.ndarray | torch.Tensor,
        size: tuple[int, int],
        lighting: Lighting | None = None,
    ) -> RenderTensors:
        """:meth:`render` with torch results on the device of ``poses`` (CPU for NumPy poses).

        The rasteriser works on the host: poses and K are read back and the results uploaded.
        """
        device = poses.device if isinstance(poses, torch.Tensor) else torch.device("cpu")
        out = self.render(models, poses, K, size, lighting)
        return RenderTensors(
            **{name: torch.from_numpy(value).to(device) for name, value in vars(out).items()}
        )

    def surface_normals(
        self, models: Sequence[ObjectModel], poses: np.ndarray, output: RenderOutput
    ) -> np.ndarray:
        """(B, H, W, 3) float32 unit normals in the camera frame of a :meth:`render` output (the
        interpolated vertex normals the shading uses, also exact at the silhouette), 0 on background.

        Args:
            models: the B models of that call (one per view); poses: its (B, 4, 4) poses.
        """
        poses_np = _as_batch(poses, (4, 4), "poses")
        normals = np.zeros(output.barycentric.shape, dtype=np.float32)
        for b, (model, pose) in enumerate(zip(models, poses_np, strict=True)):
            foreground = output.face_index[b] >= 0
            data = self._model_arrays(model)
            corners = data.faces[output.face_index[b][foreground]]
            in_model = np.einsum("mk,mkc->mc", output.barycentric[b][foreground], data.normals[corners])
            normals[b][foreground] = _normalise(in_model @ pose[:3, :3].T.astype(np.float32))
        return normals

    # --- OpenGL pass -------------------------------------------------------------------------------

    def _bind_framebuffer(self, height: int, width: int) -> None:
        if self._framebuffer_size != (height, width):
            if self._framebuffer is not None:
                fbo, colour, depth = self._framebuffer
                GL.glDeleteFramebuffers(1, [fbo])
                GL.glDeleteRenderbuffers(2, [colour, depth])
            fbo = GL.glGenFramebuffers(1)
            colour, depth = GL.glGenRenderbuffers(2)
            GL.glBindRenderbuffer(GL.GL_RENDERBUFFER, colour)
            GL.glRenderbufferStorage(GL.GL_RENDERBUFFER, GL.GL_R32I, width, height)
            GL.glBindRenderbuffer(GL.GL_RENDERBUFFER, depth)
            GL.glRenderbufferStorage(GL.GL_RENDERBUFFER, GL.GL_DEPTH_COMPONENT32F, width, height)
            GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, fbo)
            GL.glFramebufferRenderbuffer(
                GL.GL_FRAMEBUFFER, GL.GL_COLOR_ATTACHMENT0, GL.GL_RENDERBUFFER, colour
            )
            GL.glFramebufferRenderbuffer(GL.GL_FRAMEBUFFER, GL.GL_DEPTH_ATTACHMENT, GL.GL_RENDERBUFFER, depth)
            status = GL.glCheckFramebufferStatus(GL.GL_FRAMEBUFFER)
            if status != GL.GL_FRAMEBUFFER_COMPLETE:
                raise RenderError(f"framebuffer {width}x{height} incomplete (status {status:#x})")
            self._framebuffer = (fbo, colour, depth)
            self._framebuffer_size = (height, width)
        GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, self._framebuffer[0])
        GL.glDrawBuffers(1, [GL.GL_COLOR_ATTACHMENT0])
        GL.glViewport(0, 0, width, height)
        GL.glDisable(GL.GL_MULTISAMPLE)
        GL.glDisable(GL.GL_BLEND)
        GL.glDisable(GL.GL_CULL_FACE)
        GL.glEnable(GL.GL_DEPTH_TEST)
        GL.glDepthMask(GL.GL_TRUE)
        GL.glDepthFunc(GL.GL_LESS)

    def _upload(self, model: ObjectModel) -> _GpuMesh:
        mesh = self._meshes.get(model)
        if mesh is None:
            vao = GL.glGenVertexArrays(1)
            vbo, ebo = GL.glGenBuffers(2)
            GL.glBindVertexArray(vao)
            positions = np.ascontiguousarray(model.vertices, dtype=np.float32)
            GL.glBindBuffer(GL.GL_ARRAY_BUFFER, vbo)
            GL.glBufferData(GL.GL_ARRAY_BUFFER, positions.nbytes, positions, GL.GL_STATIC_DRAW)
            GL.glEnableVertexAttribArray(0)
            GL.glVertexAttribPointer(0, 3, GL.GL_FLOAT, GL.GL_FALSE, 0, None)
            indices = np.ascontiguousarray(model.faces, dtype=np.uint32)
            GL.glBindBuffer(GL.GL_ELEMENT_ARRAY_BUFFER, ebo)
            GL.glBufferData(GL.GL_ELEMENT_ARRAY_BUFFER, indices.nbytes, indices, GL.GL_STATIC_DRAW)
            GL.glBindVertexArray(0)
            mesh = _GpuMesh(vao=vao, buffers=(vbo, ebo), num_indices=indices.size)
            self._meshes[model] = mesh
            weakref.finalize(model, self._released.append, (vao, (vbo, ebo)))
        return mesh

    def _rasterise(
        self, model: ObjectModel, pose: np.ndarray, K: np.ndarray, height: int, width: int
    ) -> np.ndarray:
        """(H, W) int64 visible triangle per pixel centre, -1 for background."""
        GL.glClearBufferiv(GL.GL_COLOR, 0, np.array([-1, 0, 0, 0], dtype=np.int32))
        GL.glClearBufferfv(GL.GL_DEPTH, 0, np.array([1.0], dtype=np.float32))
        centre_z = float(pose[2, :3] @ model.center + pose[2, 3])
        radius = model.bounding_radius * 1.01 + 1e-4
        far = centre_z + radius
        if far <= MIN_NEAR_M or not np.isfinite(pose).all():
            return np.full((height, width), -1, dtype=np.int64)
        near = max(centre_z - radius, MIN_NEAR_M)
        mvp = opencv_projection_matrix(K, height, width, near, far) @ pose
        mesh = self._upload(model)
        GL.glUseProgram(self._program)
        GL.glUniformMatrix4fv(self._mvp_location, 1, GL.GL_TRUE, mvp.astype(np.float32))
        GL.glBindVertexArray(mesh.vao)
        GL.glDrawElements(GL.GL_TRIANGLES, mesh.num_indices, GL.GL_UNSIGNED_INT, None)
        GL.glBindVertexArray(0)
        GL.glUseProgram(0)
        GL.glReadBuffer(GL.GL_COLOR_ATTACHMENT0)
        data = GL.glReadPixels(0, 0, width, height, GL.GL_RED_INTEGER, GL.GL_INT)
        ids = np.frombuffer(data, dtype=np.int32).reshape(height, width)
        return np.flipud(ids).astype(np.int64)  # GL rows start at the bottom

    # --- host post-processing (NumPy: single-threaded, so it never fights the rasteriser for cores) --

    def _model_arrays(self, model: ObjectModel) -> _ModelArrays:
        """Per-model arrays used for shading (cached)."""
        cached = self._arrays.get(model)
        if cached is None:
            cached = _ModelArrays(
                vertices=model.vertices.astype(np.float64),
                vertices32=model.vertices.astype(np.float32),
                faces=model.faces.astype(np.int64),
                normals=vertex_normals(model.vertices.astype(np.float64), model.faces),
                uvs=model.uvs.astype(np.float32) if model.uvs is not None else None,
                texture=model.texture.astype(np.float32) / 255.0 if model.texture is not None else None,
                colors=model.vertex_colors.astype(np.float32) / 255.0
                if model.vertex_colors is not None
                else None,
            )
            self._arrays[model] = cached
        return cached

    def _shade(
        self,
        model: ObjectModel,
        pose: np.ndarray,
        K: np.ndarray,
        width: int,
        pixels: np.ndarray,
        face_ids: np.ndarray,
        lighting: Lighting,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For foreground pixels (flat indices): validity, depth (M,), barycentrics (M,3), rgb (M,3)."""
        data = self._model_arrays(model)
        faces = data.faces[face_ids]  # (M, 3)
        vertices_cam = data.vertices @ pose[:3, :3].T + pose[:3, 3]
        uv1 = np.stack([pixels % width, pixels // width, np.ones_like(pixels)], 1).astype(np.float64)
        rays = uv1 @ np.linalg.inv(K).T  # (M, 3), z = 1
        weights, distance, valid = _ray_triangle(rays, vertices_cam[faces])
        depth = distance * rays[:, 2]

        # shading needs no float64: everything below is float32
        bary = weights.astype(np.float32)

        def interpolate(values: np.ndarray) -> np.ndarray:
            return np.einsum("mk,mkc->mc", bary, values[faces])

        if lighting.ambient == 0.0 and lighting.diffuse == 0.0 and lighting.specular == 0.0:
            # No light (a caller that needs depth and silhouette only): black, no texture lookups.
            albedo = np.zeros((len(pixels), 3), dtype=np.float32)
        elif data.texture is not None and data.uvs is not None:
            albedo = _sample_texture(data.texture, interpolate(data.uvs))
        elif data.colors is not None:
            albedo = interpolate(data.colors)
        else:
            albedo = np.broadcast_to(np.asarray(DEFAULT_ALBEDO, dtype=np.float32), (len(pixels), 3))
        if lighting.diffuse == 0.0 and lighting.specular == 0.0:
            # Ambient only (the classical backend's albedo renders): no surface geometry needed.
            colour = np.clip(albedo * np.float32(lighting.ambient), 0.0, 1.0).astype(np.float32)
        else:
            normals = _normalise(interpolate(data.normals))
            points = interpolate(data.vertices32)
            camera_in_model = (-pose[:3, :3].T @ pose[:3, 3]).astype(np.float32)
            colour = _phong(albedo, points, normals, camera_in_model, lighting)
        return valid, depth[valid].astype(np.float32), weights[valid].astype(np.float32), colour[valid]

    def __del__(self) -> None:
        # A renderer dropped without close() must not leave pyrender's finaliser to end the display.
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Release the OpenGL context (the renderer cannot be used afterwards); other renderers of the
        process keep working."""
        with self._lock:
            if self._offscreen is None:
                return
            platform = self._offscreen._platform
            display = getattr(platform, "_egl_display", None)
            if display is None:
                self._offscreen.delete()  # destroys the context and every buffer in it
            else:
                # pyrender's delete would also eglTerminate the display, which every EGL context of the
                # process shares: destroy only this renderer's context.
                from OpenGL import EGL

                # close() may run inside another renderer's render (a renderer dropped and collected
                # there): give this thread back the context it had.
                previous = (
                    EGL.eglGetCurrentDisplay(),
                    EGL.eglGetCurrentSurface(EGL.EGL_DRAW),
                    EGL.eglGetCurrentSurface(EGL.EGL_READ),
                    EGL.eglGetCurrentContext(),
                )
                self._make_current()
                self._offscreen._renderer.delete()
                self._release_context()
                EGL.eglDestroyContext(display, platform._egl_context)
                if _address(previous[3]) not in (None, _address(platform._egl_context)):
                    EGL.eglMakeCurrent(*previous)
                # Unset both so that pyrender's finaliser finds nothing left to destroy or terminate.
                platform._egl_context = platform._egl_display = None
            self._offscreen = None
            self._meshes.clear()


def _address(handle: object) -> int | None:
    """The address of an EGL handle (PyOpenGL wraps each returned handle in a new object)."""
    return ctypes.cast(handle, ctypes.c_void_p).value


def opencv_projection_matrix(K: np.ndarray, height: int, width: int, near: float, far: float) -> np.ndarray:
    """4×4 clip matrix taking OpenCV camera points (z forward) to OpenGL clip space.

    Pixel centres are at integer coordinates: u = −0.5 maps to NDC x = −1 and u = W − 0.5 to +1; rows
    are counted from the top (the read-back image is flipped), so v = −0.5 maps to NDC y = +1.
    """
    fx, fy, cx, cy, skew = K[0, 0], K[1, 1], K[0, 2], K[1, 2], K[0, 1]
    proj = np.zeros((4, 4), dtype=np.float64)
    proj[0] = [2 * fx / width, 2 * skew / width, (2 * cx + 1) / width - 1, 0]
    proj[1] = [0, -2 * fy / height, 1 - (2 * cy + 1) / height, 0]
    proj[2] = [0, 0, (far + near) / (far - near), -2 * far * near / (far - near)]
    proj[3] = [0, 0, 1, 0]
    return proj


def _ray_triangle(rays: np.ndarray, tri: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Möller–Trumbore for rays from the origin (float64).

    rays (M, 3), tri (M, 3, 3) -> weights (M, 3), ray parameter t (M,), valid (M,) bool.
    """
    p0, e1, e2 = tri[:, 0], tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    pvec = np.cross(rays, e2)
    det = _row_dot(e1, pvec)
    scale = np.sqrt(_row_dot(e1, e1) * _row_dot(e2, e2) * _row_dot(rays, rays))
    valid = np.abs(det) > 1e-12 * scale
    inv = np.where(valid, 1.0 / np.where(valid, det, 1.0), 0.0)
    qvec = np.cross(-p0, e1)
    b1 = -_row_dot(p0, pvec) * inv
    b2 = _row_dot(rays, qvec) * inv
    t = _row_dot(e2, qvec) * inv
    weights = np.stack([1 - b1 - b2, b1, b2], -1)
    # The rasteriser says the pixel centre is inside; clamp round-off at edges and renormalise.
    np.maximum(weights, 0.0, out=weights)
    weights /= np.maximum(weights.sum(-1, keepdims=True), 1e-12)
    return weights, t, valid & (t > 0)


def _row_dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(M,) dot products of the rows of two (M, 3) arrays (``norm(axis=1)`` is ~10× slower)."""
    return np.einsum("ij,ij->i", u, v)


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(N, 3) float32 area-weighted vertex normals; copies of one position (UV seams) share one normal."""
    _, group = np.unique(vertices, axis=0, return_inverse=True)
    group = group.reshape(-1)
    tri = vertices[faces]
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2·area
    accum = np.zeros((group.max() + 1, 3))
    for corner in range(3):
        np.add.at(accum, group[faces[:, corner]], face_normals)
    return _normalise(accum[group]).astype(np.float32)


def _sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear, wrapping lookup. texture (h, w, 3) float32, uv (M, 2) OpenGL convention -> (M, 3)."""
    h, w = texture.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = (1.0 - uv[:, 1]) * h - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    xa, xb, ya, yb = x0 % w, (x0 + 1) % w, y0 % h, (y0 + 1) % h
    top = texture[ya, xa] * (1 - fx) + texture[ya, xb] * fx
    bottom = texture[yb, xa] * (1 - fx) + texture[yb, xb] * fx
    return top * (1 - fy) + bottom * fy


def _phong(
    albedo: np.ndarray, points: np.ndarray, normals: np.ndarray, camera: np.ndarray, lighting: Lighting
) -> np.ndarray:
    """Point-light Phong in the object frame; (M, 3) float32 inputs, output clipped to [0, 1]."""
    light = np.asarray(lighting.light_position, dtype=np.float32)
    to_light = _normalise(light - points)
    cos_light = np.einsum("ij,ij->i", normals, to_light)
    diffuse = lighting.diffuse * np.maximum(cos_light, 0.0)
    reflected = 2 * cos_light[:, None] * normals - to_light
    to_camera = _normalise(camera - points)
    alpha = np.maximum(np.einsum("ij,ij->i", reflected, to_camera), 0.0) * (cos_light > 0)
    specular = lighting.specular * np.power(alpha, np.float32(lighting.shininess))  # 0^0 = 1, as published
    colour = albedo * (lighting.ambient + diffuse)[:, None] + specular[:, None]
    return np.clip(colour, 0.0, 1.0).astype(np.float32)


def _link_program(vertex_src: str, fragment_src: str) -> int:
    shaders = []
    for kind, src in ((GL.GL_VERTEX_SHADER, vertex_src), (GL.GL_FRAGMENT_SHADER, fragment_src)):
        shader = GL.glCreateShader(kind)
        GL.glShaderSource(shader, src)
        GL.glCompileShader(shader)
        if not GL.glGetShaderiv(shader, GL.GL_COMPILE_STATUS):
            raise RenderError(f"shader compilation failed: {GL.glGetShaderInfoLog(shader)!r}")
        shaders.append(shader)
    program = GL.glCreateProgram()
    for shader in shaders:
        GL.glAttachShader(program, shader)
    GL.glLinkProgram(program)
    if not GL.glGetProgramiv(program, GL.GL_LINK_STATUS):
        raise RenderError(f"shader link failed: {GL.glGetProgramInfoLog(program)!r}")
    for shader in shaders:
        GL.glDeleteShader(shader)
    return program


def _as_batch(value: np.ndarray | torch.Tensor, shape: tuple[int, int], name: str) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    array = array.astype(np.float64)
    if array.shape == shape:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != shape:
        raise ValueError(f"{name} must have shape (B, {shape[0]}, {shape[1]}) or {shape}, got {array.shape}")
    return array
