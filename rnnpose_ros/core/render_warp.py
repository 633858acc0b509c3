"""Device renderer with NVIDIA Warp: ray casting against a BVH, shading in torch.

How it works. Each model is uploaded once per device as a ``warp.Mesh`` (its BVH is built there). One
kernel launch casts one ray per pixel of every instance of the batch, through the pixel centre, into
the instance's mesh: the closest hit gives the face index, the barycentrics and the metric camera z.
The rays are expressed in the model frame (``origin = −Rᵀt``, ``direction = Rᵀ K⁻¹ (u, v, 1)``, whose
camera z is 1, so that the ray parameter is the depth); they start on the plane z = ``MIN_NEAR_M``,
where the OpenGL rasteriser of :mod:`rnnpose_ros.core.render` clips. Shading then runs in torch on the
same device over the whole batch (docs/method.md §2.9, the same Phong model and texture lookup as the
NumPy shading of the OpenGL renderer): on the CPU over the foreground pixels only, on CUDA over every
pixel and masked afterwards, because selecting the foreground there would wait for the device. Inputs
and outputs are torch tensors shared with Warp without copies (``warp.from_torch``), the Warp launch
goes on torch's current stream, and nothing is read back to the host: on CUDA a render is a few dozen
asynchronous launches.

Instances of one call may show different models: the distinct models of the call are packed into one
set of vertex, face and texture tables (cached for recent model combinations), and every instance
carries its model's offsets into them, so there is no per-instance Python loop.

Agreement with the OpenGL renderer: both find the triangle under each pixel centre exactly; they differ
only where a pixel centre lies on a shared triangle edge or on the silhouette to within round-off
(test_render_warp measures this on real meshes). The BVH and the ray are float32 in the model frame:
at 1 m, about 0.1 µm of depth.

Conventions: as :mod:`rnnpose_ros.core.render` — poses model→camera 4×4 (OpenCV camera), metres; K the
OpenCV intrinsic matrix; pixel (u, v) = (column, row) has its centre at integer coordinates.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.render import (
    DEFAULT_ALBEDO,
    MIN_NEAR_M,
    Lighting,
    RenderError,
    RenderOutput,
    RenderTensors,
    vertex_normals,
)

#: Largest ray parameter (= depth, metres) searched.
MAX_DEPTH_M = 1.0e6
#: Model combinations (the models of a call, in order) whose packed tables are kept.
PACKS_KEPT = 8
#: Largest texture (texels) whose texel indices float32 holds exactly.
MAX_TEXELS = 2**24
#: Columns of the per-vertex attribute table, interpolated in one gather per face corner: model-frame
#: position (m), unit normal, albedo (vertex colour or the default), texture coordinates (0 untextured).
ATTRIBUTES = {"position": slice(0, 3), "normal": slice(3, 6), "colour": slice(6, 9), "uv": slice(9, 11)}

_warp_lock = threading.Lock()
_warp_state: dict[str, object] = {}


def _warp():
    """The initialised ``warp`` module and its ray-casting kernel (compiled on first use per device).

    Raises:
        RenderError: warp-lang is not installed or cannot initialise.
    """
    with _warp_lock:
        if "module" not in _warp_state:
            try:
                import warp as wp

                wp.config.log_level = wp.LOG_WARNING  # no banner on stdout: the node's output is its log
                wp.init()
            except Exception as exc:
                raise RenderError(f"NVIDIA Warp is not usable: {exc}") from exc
            _warp_state["module"] = wp
            _warp_state["kernel"] = _make_kernel(wp)
        return _warp_state["module"], _warp_state["kernel"]


def _make_kernel(wp):
    """Build the ray-casting kernel (defined here so that importing this module needs no Warp)."""

    @wp.kernel
    def cast_rays(
        mesh_ids: wp.array(dtype=wp.uint64),
        origins: wp.array(dtype=wp.vec3),
        pixel_to_ray: wp.array(dtype=wp.mat33),
        valid: wp.array(dtype=wp.int32),
        near: float,
        max_depth: float,
        face_out: wp.array3d(dtype=wp.int64),
        bary_out: wp.array3d(dtype=wp.vec3),
        depth_out: wp.array3d(dtype=float),
    ):
        b, y, x = wp.tid()
        if valid[b] == 0:
            return
        direction = pixel_to_ray[b] * wp.vec3(float(x), float(y), 1.0)  # camera z of direction = 1
        hit = wp.mesh_query_ray(mesh_ids[b], origins[b] + near * direction, direction, max_depth)
        if hit.result:
            # Warp's (u, v) weigh the face's first and second vertices. Clamp round-off at edges.
            weights = wp.vec3(wp.max(hit.u, 0.0), wp.max(hit.v, 0.0), wp.max(1.0 - hit.u - hit.v, 0.0))
            total = weights[0] + weights[1] + weights[2]
            face_out[b, y, x] = wp.int64(hit.face)
            bary_out[b, y, x] = weights / wp.max(total, 1.0e-12)
            depth_out[b, y, x] = near + hit.t

    return cast_rays


@dataclass
class _DeviceModel:
    """One model's tables on one device."""

    mesh: object  # warp.Mesh (keeps its points and indices arrays alive)
    faces: Tensor  # (F, 3) int64
    attributes: Tensor  # (N, 11) float32, the columns of ATTRIBUTES
    texture: Tensor | None  # (h, w, 3) float32 [0, 1]


@dataclass
class _Pack:
    """The distinct models of a call in one set of tables, and each instance's offsets into them."""

    key: tuple  # the device and the instances' model ids
    models: list[ObjectModel]  # the instances' models (keeps the key's ids alive while cached)
    mesh_ids: object  # (B,) warp uint64
    faces: Tensor  # (ΣF, 3) int64, global vertex indices
    attributes: Tensor  # (ΣN, 11) float32, the columns of ATTRIBUTES
    face_offset: Tensor  # (B,) int64
    texels: Tensor | None  # (ΣT, 3) float32, all textures flattened row-major; None: no texture
    texture_offset: Tensor | None  # (B,) int64 first texel of the instance's texture
    # (B, 6) float32 per instance: scale (w, −h) and shift (−0.5, h − 0.5) from OpenGL uv to texel
    # coordinates (x right, y down, texel centres at integers), then the texture's (w, h)
    texture_frame: Tensor | None
    textured: Tensor | None  # (B,) bool


class WarpRenderer:
    """Ray-casting renderer on the CPU or a CUDA device (the device of the pose tensors).

    Same interface as :class:`rnnpose_ros.core.render.Renderer`: :meth:`render` (NumPy results),
    :meth:`render_tensors` (torch results on the poses' device), :meth:`surface_normals`, :meth:`close`.

    Args:
        lighting: default Phong parameters.
        device: torch device used when :meth:`render` gets NumPy poses (default CPU).

    Raises:
        RenderError: Warp is not installed or cannot initialise.
    """

    def __init__(self, lighting: Lighting | None = None, device: torch.device | str = "cpu") -> None:
        self.lighting = lighting or Lighting()
        self.device = torch.device(device)
        self._wp, self._kernel = _warp()
        if self.device.type == "cuda" and not self._wp.is_cuda_available():
            raise RenderError(
                "Warp finds no usable CUDA device (is the driver older than Warp's CUDA toolkit?)"
            )
        self._lock = threading.Lock()
        self._models: weakref.WeakKeyDictionary[ObjectModel, dict[str, _DeviceModel]] = (
            weakref.WeakKeyDictionary()
        )
        self._packs: OrderedDict[tuple, _Pack] = OrderedDict()  # least recently used first
        self._lights: dict[tuple[str, tuple[float, float, float]], Tensor] = {}
        self._closed = False

    # --- public interface ----------------------------------------------------------------------------

    def render(
        self,
        models: Sequence[ObjectModel],
        poses: np.ndarray | Tensor,
        K: np.ndarray | Tensor,
        size: tuple[int, int],
        lighting: Lighting | None = None,
    ) -> RenderOutput:
        """Render B views, one model per view, into host arrays (see :class:`RenderOutput`).

        Args: as :meth:`render_tensors`; NumPy poses render on this renderer's ``device``.
        """
        out = self.render_tensors(models, poses, K, size, lighting)
        return RenderOutput(**{name: value.cpu().numpy() for name, value in vars(out).items()})

    def render_tensors(
        self,
        models: Sequence[ObjectModel],
        poses: np.ndarray | Tensor,
        K: np.ndarray | Tensor,
        size: tuple[int, int],
        lighting: Lighting | None = None,
    ) -> RenderTensors:
        """Render B views on the poses' device without reading anything back to the host.

        Args:
            models: B models (or one, used for every view).
            poses: (B, 4, 4) or (4, 4) model→camera, metres (float32 or float64).
            K: (B, 3, 3) or (3, 3) OpenCV intrinsics in pixels.
            size: (H, W) image size.
            lighting: overrides the renderer's lighting for this call.

        Poses behind the camera, outside the view or not finite give an empty (all background) image.
        """
        device = poses.device if isinstance(poses, Tensor) else self.device
        poses_t = _as_batch(poses, (4, 4), "poses", device)
        batch = poses_t.shape[0]
        K_t = _as_batch(K, (3, 3), "K", device)
        if K_t.shape[0] == 1 and batch > 1:
            K_t = K_t.expand(batch, 3, 3)
        models = list(models)
        if len(models) == 1 and batch > 1:
            models = models * batch
        if len(models) != batch or K_t.shape[0] != batch:
            raise ValueError(f"got {len(models)} models, {batch} poses and {K_t.shape[0]} K; they must match")
        height, width = int(size[0]), int(size[1])
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        lighting = lighting or self.lighting

        with self._lock:
            if self._closed:
                raise RenderError("renderer is closed")
            pack = self._packed(models, device)
        face_index, barycentric, depth = self._cast(pack, poses_t, K_t, height, width, device)
        rgb = self._shade(pack, poses_t, face_index, barycentric, lighting)
        return RenderTensors(
            rgb=rgb, depth=depth, mask=face_index >= 0, face_index=face_index, barycentric=barycentric
        )

    def surface_normals(
        self, models: Sequence[ObjectModel], poses: np.ndarray | Tensor, output: RenderOutput
    ) -> np.ndarray:
        """(B, H, W, 3) float32 unit camera-frame normals of a :meth:`render` output (the interpolated
        vertex normals the shading uses), 0 on background.

        Args:
            models: the B models of that call (one per view); poses: its (B, 4, 4) poses.
        """
        poses_t = _as_batch(poses, (4, 4), "poses", self.device)
        with self._lock:
            pack = self._packed(list(models), self.device)
        face_index = torch.as_tensor(output.face_index, device=self.device)
        barycentric = torch.as_tensor(output.barycentric, device=self.device)
        pixels = _shaded_pixels(face_index)
        instance, corners, weights = _corners(pack, face_index, barycentric, pixels)
        in_model = _interpolate(pack.attributes[:, ATTRIBUTES["normal"]], corners, weights)
        rotations = poses_t[:, :3, :3].float().index_select(0, instance)
        in_camera = (rotations @ in_model[:, :, None]).squeeze(-1)
        normals = torch.zeros(output.barycentric.shape, dtype=torch.float32, device=self.device)
        normals.view(-1, 3).index_copy_(
            0, pixels, torch.where((weights.sum(-1) > 0)[:, None], _normalise(in_camera), 0.0)
        )
        return normals.cpu().numpy()

    def close(self) -> None:
        """Drop the uploaded meshes (the renderer cannot be used afterwards)."""
        with self._lock:
            self._closed = True
            self._models.clear()
            self._packs.clear()

    # --- geometry ------------------------------------------------------------------------------------

    def _cast(
        self, pack: _Pack, poses: Tensor, K: Tensor, height: int, width: int, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Face index (B, H, W) int64 (−1 background), barycentrics (B, H, W, 3) float32, depth
        (B, H, W) float32 metres (0 background)."""
        wp = self._wp
        batch = poses.shape[0]
        rotation_t = poses[:, :3, :3].transpose(1, 2)
        # (B, 3, 4) float64: ray matrix and origin; NaN or inf from a non-finite pose or a singular K
        rays = torch.cat([rotation_t @ _inverse_3x3(K), -rotation_t @ poses[:, :3, 3:]], 2)
        valid = rays.flatten(1).isfinite().all(1).to(torch.int32)  # no rays: an empty image
        rays = rays.float()
        pixel_to_ray, origins = rays[:, :, :3].contiguous(), rays[:, :, 3].contiguous()

        face_index = torch.full((batch, height, width), -1, dtype=torch.int64, device=device)
        barycentric = torch.zeros(batch, height, width, 3, dtype=torch.float32, device=device)
        depth = torch.zeros(batch, height, width, dtype=torch.float32, device=device)
        stream = wp.stream_from_torch(torch.cuda.current_stream(device)) if device.type == "cuda" else None
        wp.launch(
            self._kernel,
            dim=(batch, height, width),
            inputs=[
                pack.mesh_ids,
                wp.from_torch(origins, dtype=wp.vec3),
                wp.from_torch(pixel_to_ray, dtype=wp.mat33),
                wp.from_torch(valid),
                MIN_NEAR_M,
                MAX_DEPTH_M,
            ],
            outputs=[
                wp.from_torch(face_index, dtype=wp.int64),
                wp.from_torch(barycentric, dtype=wp.vec3),
                wp.from_torch(depth),
            ],
            device=_warp_device(device),
            stream=stream,
        )
        return face_index, barycentric, depth

    # --- shading (torch, any device) -----------------------------------------------------------------

    def _shade(
        self, pack: _Pack, poses: Tensor, face_index: Tensor, barycentric: Tensor, lighting: Lighting
    ) -> Tensor:
        """(B, H, W, 3) float32 Phong colour in [0, 1], 0 on background (docs/method.md §2.9)."""
        batch, height, width = face_index.shape
        pixels = _shaded_pixels(face_index)
        instance, corners, weights = _corners(pack, face_index, barycentric, pixels)
        attributes = _interpolate(pack.attributes, corners, weights)
        normals = _normalise(attributes[:, ATTRIBUTES["normal"]])
        points = attributes[:, ATTRIBUTES["position"]]
        albedo = attributes[:, ATTRIBUTES["colour"]]
        if pack.texels is not None:
            textured = _sample_texture(pack, instance, attributes[:, ATTRIBUTES["uv"]])
            albedo = torch.where(pack.textured.index_select(0, instance)[:, None], textured, albedo)
        rotation = poses[:, :3, :3]
        camera_in_model = (-rotation.transpose(1, 2) @ poses[:, :3, 3:]).squeeze(-1).float()
        light = self._light(lighting, points.device)
        to_light = _normalise(light - points)
        cos_light = (normals * to_light).sum(-1)
        diffuse = lighting.diffuse * cos_light.clamp(min=0.0)
        reflected = 2 * cos_light[:, None] * normals - to_light
        to_camera = _normalise(camera_in_model.index_select(0, instance) - points)
        alpha = (reflected * to_camera).sum(-1).clamp(min=0.0) * (cos_light > 0)
        specular = lighting.specular * alpha.pow(lighting.shininess)  # 0^0 = 1, as published
        colour = (albedo * (lighting.ambient + diffuse)[:, None] + specular[:, None]).clamp(0.0, 1.0)
        colour = torch.where((weights.sum(-1) > 0)[:, None], colour, 0.0)
        out = colour.new_zeros(batch * height * width, 3).index_copy_(0, pixels, colour)
        return out.view(batch, height, width, 3)

    def _light(self, lighting: Lighting, device: torch.device) -> Tensor:
        """(3,) float32 light position on ``device``, cached (an upload per render waits for the device)."""
        key = (str(device), tuple(lighting.light_position))
        light = self._lights.get(key)
        if light is None:
            light = torch.tensor(lighting.light_position, dtype=torch.float32).to(device)
            self._lights[key] = light
        return light

    # --- model tables --------------------------------------------------------------------------------

    def _device_model(self, model: ObjectModel, device: torch.device) -> _DeviceModel:
        per_device = self._models.setdefault(model, {})
        cached = per_device.get(str(device))
        if cached is not None:
            return cached
        wp = self._wp
        vertices = np.ascontiguousarray(model.vertices, dtype=np.float32)
        faces = np.ascontiguousarray(model.faces, dtype=np.int64)
        if len(faces) == 0:
            raise RenderError(f"model {model.class_id!r} has no faces")
        warp_device = _warp_device(device)
        mesh = wp.Mesh(
            points=wp.array(vertices, dtype=wp.vec3, device=warp_device),
            indices=wp.array(faces.reshape(-1).astype(np.int32), dtype=wp.int32, device=warp_device),
        )
        if model.vertex_colors is not None:
            colours = model.vertex_colors.astype(np.float32) / 255.0
        else:
            colours = np.broadcast_to(np.asarray(DEFAULT_ALBEDO, dtype=np.float32), vertices.shape)
        textured = model.texture is not None and model.uvs is not None
        if textured and model.texture.shape[0] * model.texture.shape[1] > MAX_TEXELS:
            height, width = model.texture.shape[:2]
            raise RenderError(
                f"model {model.class_id!r}: texture {width}x{height} has more than {MAX_TEXELS} texels"
            )
        uvs = model.uvs.astype(np.float32) if textured else np.zeros((len(vertices), 2), dtype=np.float32)
        normals = vertex_normals(model.vertices.astype(np.float64), model.faces)
        attributes = np.concatenate([vertices, normals, colours, uvs], axis=1)
        to_device = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        cached = _DeviceModel(
            mesh=mesh,
            faces=to_device(faces),
            attributes=to_device(attributes),
            texture=to_device(model.texture.astype(np.float32) / 255.0) if textured else None,
        )
        per_device[str(device)] = cached
        return cached

    def _packed(self, models: list[ObjectModel], device: torch.device) -> _Pack:
        """The tables of the instances' models (the last PACKS_KEPT combinations are kept: building one
        uploads index tables, which on CUDA waits for the device; the caller holds the lock)."""
        key = (str(device), *(id(m) for m in models))
        cached = self._packs.get(key)
        if cached is not None:
            self._packs.move_to_end(key)
            return cached
        distinct: dict[int, int] = {}
        for model in models:
            distinct.setdefault(id(model), len(distinct))
        tables = [self._device_model(m, device) for m in {id(m): m for m in models}.values()]
        which = torch.tensor([distinct[id(m)] for m in models], dtype=torch.int64)

        vertex_counts = torch.tensor([len(t.attributes) for t in tables], dtype=torch.int64)
        face_counts = torch.tensor([len(t.faces) for t in tables], dtype=torch.int64)
        vertex_offsets = torch.cumsum(vertex_counts, 0) - vertex_counts
        face_offsets = torch.cumsum(face_counts, 0) - face_counts
        faces = _concat(
            [
                t.faces + offset if offset else t.faces
                for t, offset in zip(tables, vertex_offsets.tolist(), strict=True)
            ]
        )
        texels = texture_offset = texture_frame = textured = None
        if any(t.texture is not None for t in tables):
            # an untextured model gets one black texel: its albedo comes from its colours
            textures = [
                t.texture if t.texture is not None else t.attributes.new_zeros(1, 1, 3) for t in tables
            ]
            texels = _concat([tex.reshape(-1, 3) for tex in textures])
            counts = torch.tensor([tex.shape[0] * tex.shape[1] for tex in textures], dtype=torch.int64)
            offsets = torch.cumsum(counts, 0) - counts
            frames = torch.tensor(
                [[w, -h, -0.5, h - 0.5, w, h] for h, w in (tex.shape[:2] for tex in textures)],
                dtype=torch.float32,
            )
            flags = torch.tensor([t.texture is not None for t in tables])
            texture_offset, texture_frame, textured = (
                offsets[which].to(device),
                frames[which].to(device),
                flags[which].to(device),
            )
        wp = self._wp
        mesh_ids = np.array([tables[i].mesh.id for i in which.tolist()], dtype=np.uint64)
        pack = _Pack(
            key=key,
            models=models,
            mesh_ids=wp.array(mesh_ids, dtype=wp.uint64, device=_warp_device(device)),
            faces=faces,
            attributes=_concat([t.attributes for t in tables]),
            face_offset=face_offsets[which].to(device),
            texels=texels,
            texture_offset=texture_offset,
            texture_frame=texture_frame,
            textured=textured,
        )
        self._packs[key] = pack
        while len(self._packs) > PACKS_KEPT:
            self._packs.popitem(last=False)
        return pack


def _concat(tensors: list[Tensor]) -> Tensor:
    """``torch.cat`` along dim 0 that shares a single tensor instead of copying it (one model per call
    is the usual case, and its tables can be large)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _warp_device(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    raise RenderError(f"the Warp renderer runs on cpu or cuda, not {device}")


def _as_batch(value: np.ndarray | Tensor, shape: tuple[int, int], name: str, device: torch.device) -> Tensor:
    """(B, *shape) float64 tensor on ``device``."""
    tensor = torch.as_tensor(value).detach().to(device=device, dtype=torch.float64)
    if tensor.shape == shape:
        tensor = tensor[None]
    if tensor.ndim != 3 or tuple(tensor.shape[1:]) != shape:
        raise ValueError(
            f"{name} must have shape (B, {shape[0]}, {shape[1]}) or {shape}, got {tuple(tensor.shape)}"
        )
    return tensor


def _shaded_pixels(face_index: Tensor) -> Tensor:
    """Flat indices (M,) int64 of the pixels to shade: the foreground on the CPU (selecting it is cheap
    there and saves shading the background), every pixel elsewhere (selecting would wait for the device)."""
    flat = face_index.reshape(-1)
    if flat.device.type == "cpu":
        return torch.nonzero(flat >= 0, as_tuple=True)[0]
    return torch.arange(flat.numel(), device=flat.device)


def _inverse_3x3(matrix: Tensor) -> Tensor:
    """(B, 3, 3) inverses by the adjugate: unlike ``torch.linalg.inv`` never waits for the device to
    report a singular matrix (a singular K gives non-finite rays, hence an empty image)."""
    r0, r1, r2 = matrix.unbind(-2)
    adjugate_t = torch.stack(
        [torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)], -1
    )
    determinant = (r0 * adjugate_t[..., 0]).sum(-1)
    return adjugate_t / determinant[:, None, None]


def _corners(
    pack: _Pack, face_index: Tensor, barycentric: Tensor, pixels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """For flat pixel indices (M,): their instance (M,) int64, the global vertex indices (M, 3) of their
    face and its weights (M, 3) float32; background pixels get vertex 0 with weights 0."""
    height_width = face_index.shape[1] * face_index.shape[2]
    instance = pixels // height_width
    face = face_index.reshape(-1).index_select(0, pixels)
    foreground = face >= 0
    global_face = torch.where(foreground, face + pack.face_offset.index_select(0, instance), 0)
    weights = barycentric.reshape(-1, 3).float().index_select(0, pixels)
    weights = torch.where(foreground[:, None], weights, 0.0)
    return instance, pack.faces.index_select(0, global_face), weights


def _interpolate(values: Tensor, corners: Tensor, weights: Tensor) -> Tensor:
    """(M, C) barycentric blend of per-vertex ``values`` (ΣN, C) at corners (M, 3) with weights (M, 3)."""
    # index_select: row gathers several times faster than advanced indexing on the CPU
    out = values.index_select(0, corners[:, 0]) * weights[:, 0:1]
    out.addcmul_(values.index_select(0, corners[:, 1]), weights[:, 1:2])
    return out.addcmul_(values.index_select(0, corners[:, 2]), weights[:, 2:3])


def _normalise(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _sample_texture(pack: _Pack, instance: Tensor, uv: Tensor) -> Tensor:
    """Bilinear, wrapping lookup in each pixel's texture; instance (M,), uv (M, 2) OpenGL convention ->
    (M, 3) float32. Texel indices are exact in float32 (textures have at most MAX_TEXELS)."""
    frame = pack.texture_frame.index_select(0, instance)
    size = frame[:, 4:6]  # (w, h)
    position = torch.addcmul(frame[:, 2:4], uv, frame[:, 0:2])  # (x, y) texel coordinates
    low = torch.floor(position)
    fraction = position - low  # (fx, fy)
    low = torch.remainder(low, size)
    high = torch.remainder(low + 1, size)
    rows = torch.stack([low[:, 1], high[:, 1]], 1) * size[:, 0:1]  # (M, 2) first texel of each row
    columns = torch.stack([low[:, 0], high[:, 0]], 1)
    index = (rows[:, :, None] + columns[:, None, :]).long() + pack.texture_offset.index_select(0, instance)[
        :, None, None
    ]
    texels = pack.texels.index_select(0, index.reshape(-1)).view(-1, 2, 2, 3)  # [row, column]
    fx, fy = fraction[:, 0:1], fraction[:, 1:2]
    top = torch.lerp(texels[:, 0, 0], texels[:, 0, 1], fx)
    bottom = torch.lerp(texels[:, 1, 0], texels[:, 1, 1], fx)
    return torch.lerp(top, bottom, fy)
