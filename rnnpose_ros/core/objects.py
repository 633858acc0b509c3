"""Object models (mesh, texture, units, symmetry) and the registry loaded from ``config/objects.yaml``.

YAML schema::

    objects:
      <class_id>:
        mesh: <uri or path>   # package://<ros package>/<path>, file:///<path>, pkg://<python package>/<path>,
                              # or a path, absolute or relative to the YAML file (core/uris.py)
        scale: <float>        # mesh units -> metres (default 1.0)
        symmetric: <bool>     # default false; selects ADD-S instead of ADD (implied by symmetries below)
        weights: <path>       # optional per-object weights file (resolved like mesh, not opened here)
        symmetries_discrete: [[16 numbers], ...]        # optional, BOP models_info style (core/symmetry.py)
        symmetries_continuous: [{axis: [x, y, z], offset: [x, y, z]}, ...]

Vertex order: the model's vertex set is the vertex array exactly as trimesh loads the file (without
merging or reordering). A textured OBJ is split on UV seams, so a 3D position may appear several times
with different UVs; the faces index this array, and per-vertex features (docs/method.md §1.1, §6.7) must be
defined on this same array so that they can be rendered through the faces.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trimesh
import yaml
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import cdist

from rnnpose_ros.core.symmetry import CONTINUOUS_KEY, DISCRETE_KEY, Symmetries, SymmetryError
from rnnpose_ros.core.uris import UriError, resolve_uri

MIN_DIAMETER_M = 0.005
MAX_DIAMETER_M = 3.0
DEFAULT_EVAL_POINTS = 2000
_ENTRY_KEYS = {"mesh", "scale", "symmetric", "weights", DISCRETE_KEY, CONTINUOUS_KEY}

_log = logging.getLogger(__name__)


class ObjectModelError(ValueError):
    """A mesh or object configuration cannot be used (message names the file / key and the fix)."""


class UnknownObjectError(ObjectModelError, KeyError):
    """A class id that the registry does not contain."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(eq=False)
class ObjectModel:
    """One rigid object, in metres, in its own model frame.

    Hashes by identity so that renderers can cache GPU buffers per model.

    Attributes:
        class_id: registry key.
        vertices: (N, 3) float32 metres (see module docstring for the vertex order).
        faces: (F, 3) int64 indices into ``vertices``, counter-clockwise seen from outside.
        uvs: (N, 2) float32 texture coordinates, OpenGL convention (v = 0 at the bottom row of the
            texture image), or None.
        texture: (h, w, 3) uint8 RGB image (row 0 = top), or None.
        vertex_colors: (N, 3) uint8 RGB, or None. For a material with a diffuse colour but no texture
            this holds that colour on every vertex.
        symmetric: whether the object is treated as symmetric (ADD-S); true when symmetries are declared.
        weights: optional per-object weights file.
        diameter: metres, maximum distance between two vertices (exact, via the convex hull).
        extents: (3,) float64 metres, axis-aligned bounding-box side lengths.
        center: (3,) float64 metres, axis-aligned bounding-box centre.
        eval_points: (M, 3) float32 metres, M <= 2000 distinct vertex positions for the metrics.
        mesh_path: resolved mesh file.
        mesh_scale: metres per mesh-file unit (the registry's ``scale``; rviz draws the file itself).
        symmetries: the declared symmetry group (metres, model frame); empty when none is declared.
    """

    class_id: str
    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray | None
    texture: np.ndarray | None
    vertex_colors: np.ndarray | None
    symmetric: bool
    weights: Path | None
    diameter: float
    extents: np.ndarray
    center: np.ndarray
    eval_points: np.ndarray
    mesh_path: Path
    mesh_scale: float = 1.0
    symmetries: Symmetries = field(default_factory=Symmetries)

    @property
    def bounding_radius(self) -> float:
        """Radius (m) of a sphere around ``center`` containing every vertex (half the bbox diagonal)."""
        return float(np.linalg.norm(self.extents) / 2.0)

    @classmethod
    def from_file(
        cls,
        mesh_path: str | Path,
        class_id: str | None = None,
        scale: float = 1.0,
        symmetric: bool = False,
        weights: str | Path | None = None,
        num_eval_points: int = DEFAULT_EVAL_POINTS,
        symmetries: Symmetries | None = None,
    ) -> ObjectModel:
        """Load a mesh file (OBJ + MTL + texture, PLY with vertex colours, ...) and convert it to metres.

        ``mesh_path`` may be a URI (:func:`resolve_mesh_path`). Raises ObjectModelError (specific message).
        """
        path = resolve_mesh_path(str(mesh_path), base_dir=Path.cwd())
        if not (isinstance(scale, int | float) and not isinstance(scale, bool) and math.isfinite(scale)):
            raise ObjectModelError(f"{path}: scale must be a finite number, got {scale!r}")
        if scale <= 0:
            raise ObjectModelError(f"{path}: scale must be > 0, got {scale}")
        mesh = _load_trimesh(path)
        uvs, texture, vertex_colors = _visuals(mesh, path)
        vertices = np.asarray(mesh.vertices, dtype=np.float64) * float(scale)
        _check_units(path, mesh_diameter(vertices), float(scale))
        return cls.from_arrays(
            class_id if class_id is not None else path.stem,
            vertices,
            np.asarray(mesh.faces, dtype=np.int64),
            uvs=uvs,
            texture=texture,
            vertex_colors=vertex_colors,
            symmetric=symmetric,
            weights=weights,
            mesh_path=path,
            num_eval_points=num_eval_points,
            mesh_scale=float(scale),
            symmetries=symmetries,
        )

    @classmethod
    def from_arrays(
        cls,
        class_id: str,
        vertices: np.ndarray,
        faces: np.ndarray,
        uvs: np.ndarray | None = None,
        texture: np.ndarray | None = None,
        vertex_colors: np.ndarray | None = None,
        symmetric: bool = False,
        weights: str | Path | None = None,
        mesh_path: str | Path = "",
        num_eval_points: int = DEFAULT_EVAL_POINTS,
        mesh_scale: float = 1.0,
        symmetries: Symmetries | None = None,
    ) -> ObjectModel:
        """Build a model from arrays already in metres (e.g. a trimesh primitive in a test).

        vertices (N, 3), faces (F, 3), uvs (N, 2), texture (h, w, 3) uint8, vertex_colors (N, 3) uint8.
        Derived fields (diameter, extents, centre, eval points) are computed; no unit check is made.
        ``symmetries`` (metres) must map the vertices onto themselves; declaring any makes the model
        symmetric.
        """
        vertices = np.asarray(vertices, dtype=np.float64)
        faces = np.asarray(faces, dtype=np.int64)
        if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) == 0:
            raise ObjectModelError(
                f"{class_id}: vertices must be a non-empty (N, 3) array, got {vertices.shape}"
            )
        if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
            raise ObjectModelError(f"{class_id}: faces must be a non-empty (F, 3) array, got {faces.shape}")
        if faces.min() < 0 or faces.max() >= len(vertices):
            raise ObjectModelError(f"{class_id}: face indices outside [0, {len(vertices)})")
        for name, array in (("uvs", uvs), ("vertex_colors", vertex_colors)):
            if array is not None and len(array) != len(vertices):
                raise ObjectModelError(f"{class_id}: {name} must have one row per vertex ({len(vertices)})")
        lo, hi = vertices.min(axis=0), vertices.max(axis=0)
        diameter = mesh_diameter(vertices)
        symmetries = symmetries if symmetries is not None else Symmetries()
        try:
            symmetries.check_maps_onto(vertices, diameter)
        except SymmetryError as exc:
            raise ObjectModelError(str(exc)) from None
        return cls(
            class_id=class_id,
            vertices=vertices.astype(np.float32),
            faces=faces,
            uvs=np.asarray(uvs, dtype=np.float32) if uvs is not None else None,
            texture=np.asarray(texture, dtype=np.uint8) if texture is not None else None,
            vertex_colors=np.asarray(vertex_colors, dtype=np.uint8) if vertex_colors is not None else None,
            symmetric=bool(symmetric) or bool(symmetries),
            weights=Path(weights) if weights is not None else None,
            diameter=diameter,
            extents=hi - lo,
            center=(hi + lo) / 2.0,
            eval_points=sample_eval_points(vertices, num_eval_points),
            mesh_path=Path(mesh_path),
            mesh_scale=float(mesh_scale),
            symmetries=symmetries,
        )


def resolve_mesh_path(spec: str, base_dir: Path) -> Path:
    """The file ``spec`` names: a URI of :mod:`~rnnpose_ros.core.uris` (``package://``, ``file://``,
    ``pkg://``) or a path, absolute or relative to ``base_dir``. Raises ObjectModelError (an unknown
    scheme, a package that is not installed, a malformed URI)."""
    try:
        return resolve_uri(spec, base_dir)
    except UriError as error:
        raise ObjectModelError(str(error)) from None


def mesh_diameter(points: np.ndarray, chunk: int = 512) -> float:
    """Exact maximum pairwise distance of (N, 3) points: only convex-hull vertices can be the extremes."""
    pts = np.unique(np.asarray(points, dtype=np.float64), axis=0)
    if len(pts) < 2:
        return 0.0
    with contextlib.suppress(QhullError):  # flat point sets: brute force over all points
        pts = pts[ConvexHull(pts).vertices]
    best = 0.0
    for start in range(0, len(pts), chunk):
        best = max(best, float(cdist(pts[start : start + chunk], pts).max()))
    return best


def sample_eval_points(vertices: np.ndarray, max_points: int = DEFAULT_EVAL_POINTS) -> np.ndarray:
    """Deterministic (M, 3) float32 sample of distinct vertex positions, M = min(max_points, #distinct)."""
    unique = np.unique(np.asarray(vertices, dtype=np.float64), axis=0)
    if len(unique) > max_points:
        idx = np.sort(np.random.default_rng(0).choice(len(unique), size=max_points, replace=False))
        unique = unique[idx]
    return unique.astype(np.float32)


def _read_mesh(path: Path, resolver: trimesh.resolvers.Resolver) -> trimesh.Trimesh | trimesh.Scene:
    """``trimesh.load`` of ``path``; an OBJ that is not UTF-8 (a Latin-1 comment or material name) is
    read as Latin-1: OBJ keywords and numbers are ASCII, which every single-byte encoding keeps."""
    if path.suffix.lower() == ".obj":
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1").encode("utf-8")
            return trimesh.load(io.BytesIO(text), file_type="obj", process=False, resolver=resolver)
    return trimesh.load(str(path), process=False, resolver=resolver)


def _load_trimesh(path: Path) -> trimesh.Trimesh:
    if not path.exists():
        raise ObjectModelError(f"mesh file not found: {path}")
    if not path.is_file():
        raise ObjectModelError(f"mesh path is not a file: {path}")
    try:
        # allow_anywhere: MTL files may reference textures outside the mesh folder (e.g. ../cube.png)
        resolver = trimesh.resolvers.FilePathResolver(str(path), allow_anywhere=True)
        loaded = _read_mesh(path, resolver)
        if isinstance(loaded, trimesh.Scene):
            if not loaded.geometry:
                raise ObjectModelError(f"{path}: mesh is empty (no geometry)")
            loaded = loaded.to_mesh()  # several materials/parts: one mesh (textures packed by trimesh)
    except ObjectModelError:
        raise
    except ModuleNotFoundError as exc:
        # trimesh guesses the encoding of non-UTF-8 text with an optional package we do not ship;
        # reaching it means the file is neither a valid binary mesh nor UTF-8 text.
        raise ObjectModelError(
            f"cannot read mesh {path}: not a valid binary {path.suffix or 'mesh'} file and not UTF-8 text"
        ) from exc
    except Exception as exc:  # trimesh raises many types for bad files
        raise ObjectModelError(f"cannot read mesh {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(loaded, trimesh.PointCloud):
        raise ObjectModelError(f"{path}: mesh has no faces (a point cloud cannot be rendered)")
    if not isinstance(loaded, trimesh.Trimesh):
        raise ObjectModelError(f"{path}: file contains no triangle mesh (got {type(loaded).__name__})")
    if len(loaded.vertices) == 0:
        raise ObjectModelError(f"{path}: mesh is empty (no vertices)")
    if len(loaded.faces) == 0:
        raise ObjectModelError(f"{path}: mesh has no faces (a point cloud cannot be rendered)")
    if not np.isfinite(loaded.vertices).all():
        raise ObjectModelError(f"{path}: mesh has non-finite vertex coordinates")
    return loaded


def _visuals(
    mesh: trimesh.Trimesh, path: Path
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Return (uvs, texture, vertex_colors) and check that every texture the file names was loaded."""
    visual = mesh.visual
    n = len(mesh.vertices)
    referenced = _referenced_textures(path)
    if visual is not None and visual.kind == "texture":
        material = visual.material
        image = getattr(material, "image", None)
        if image is None:
            image = getattr(material, "baseColorTexture", None)
        if image is not None and visual.uv is not None and len(visual.uv) == n:
            texture = np.asarray(image.convert("RGB"), dtype=np.uint8)
            return np.asarray(visual.uv, dtype=np.float32), texture, None
        if referenced:
            raise ObjectModelError(f"{path}: texture {referenced[0]} named by its material could not be read")
        colour = _material_colour(material)
        if colour is not None:
            return None, None, np.tile(colour, (n, 1))
        return None, None, None
    if referenced:
        raise ObjectModelError(f"{path}: texture {referenced[0]} named by its material could not be read")
    if visual is not None and visual.kind == "vertex":
        return None, None, np.asarray(visual.vertex_colors, dtype=np.uint8)[:, :3].copy()
    return None, None, None


def _material_colour(material: Any) -> np.ndarray | None:
    colour = getattr(material, "diffuse", None)
    if colour is None:
        colour = getattr(material, "baseColorFactor", None)
    if colour is None:
        return None
    return np.asarray(colour, dtype=np.uint8).reshape(-1)[:3]


def _referenced_textures(path: Path) -> list[Path]:
    """Texture files named by ``map_Kd`` in the MTL files of an OBJ (empty for other formats)."""
    if path.suffix.lower() != ".obj":
        return []
    textures: list[Path] = []
    try:
        obj_text = path.read_text(errors="replace")
    except OSError:
        return []
    for mtl_name in re.findall(r"^\s*mtllib\s+(.+?)\s*$", obj_text, flags=re.MULTILINE):
        mtl_path = (path.parent / mtl_name).resolve()
        if not mtl_path.is_file():
            continue
        for tex in re.findall(
            r"^\s*map_Kd\s+(?:-\S+\s+\S+\s+)*(.+?)\s*$", mtl_path.read_text(errors="replace"), re.M
        ):
            textures.append((mtl_path.parent / tex).resolve())
    return textures


def _check_units(path: Path, diameter: float, scale: float) -> None:
    if MIN_DIAMETER_M <= diameter <= MAX_DIAMETER_M:
        return
    raw = diameter / scale
    msg = (
        f"{path}: implausible size: diameter {diameter:.4g} m with scale {scale:g} (file units: {raw:.4g}); "
        f"expected between {MIN_DIAMETER_M * 1000:g} mm and {MAX_DIAMETER_M:g} m."
    )
    if raw <= 0:
        raise ObjectModelError(msg + " The mesh is degenerate (all vertices coincide).")
    units = {"metres": 1.0, "centimetres": 0.01, "millimetres": 0.001, "inches": 0.0254}
    plausible = [u for u, c in units.items() if MIN_DIAMETER_M <= raw * c <= MAX_DIAMETER_M and c != scale]
    if plausible:
        # prefer the unit giving a typical tabletop object (~15 cm)
        unit = min(plausible, key=lambda u: abs(math.log(raw * units[u] / 0.15)))
        raise ObjectModelError(f"{msg} If the file is in {unit}, use scale: {units[unit]:g}.")
    raise ObjectModelError(f"{msg} scale: {0.1 / raw:.4g} would make it 10 cm across.")


@dataclass
class ObjectRegistry:
    """class_id -> ObjectModel, usually built with :meth:`from_yaml`."""

    models: dict[str, ObjectModel] = field(default_factory=dict)
    source: Path | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> ObjectRegistry:
        """Load every object of an ``objects.yaml`` (see module docstring). Raises ObjectModelError."""
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise ObjectModelError(f"object registry file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ObjectModelError(
                f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
            ) from None
        except yaml.YAMLError as exc:
            raise ObjectModelError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(data, dict) or "objects" not in data:
            raise ObjectModelError(f"{path}: expected a top-level mapping with key 'objects'")
        extra = set(data) - {"objects"}
        if extra:
            raise ObjectModelError(
                f"{path}: unknown top-level key(s) {sorted(extra)}; only 'objects' is allowed"
            )
        return cls.from_mapping(data["objects"], base_dir=path.parent, source=path)

    @classmethod
    def from_mapping(cls, objects: Any, base_dir: Path, source: Path | None = None) -> ObjectRegistry:
        """Build from the value of the ``objects`` key; relative paths are relative to ``base_dir``."""
        where = str(source) if source is not None else "objects"
        if not isinstance(objects, dict) or not objects:
            raise ObjectModelError(f"{where}: 'objects' must be a non-empty mapping class_id -> entry")
        models: dict[str, ObjectModel] = {}
        for raw_id, entry in objects.items():
            class_id = str(raw_id)
            models[class_id] = _model_from_entry(class_id, entry, base_dir, f"{where}: objects.{class_id}")
        return cls(models=models, source=source)

    def with_object(self, class_id: str, entry: Any, base_dir: Path) -> ObjectRegistry:
        """A new registry with ``class_id`` added, or replaced, by ``entry`` (an ``objects.yaml`` entry,
        checked and loaded exactly as :meth:`from_yaml` does; relative paths are relative to
        ``base_dir``). This registry is never changed. Raises ObjectModelError."""
        if not isinstance(class_id, str) or not class_id.strip():
            raise ObjectModelError(f"class id must be a non-empty string, got {class_id!r}")
        model = _model_from_entry(class_id, entry, base_dir, f"object {class_id!r}")
        return ObjectRegistry(models={**self.models, class_id: model}, source=self.source)

    def without(self, class_id: str) -> ObjectRegistry:
        """A new registry without ``class_id`` (this one is never changed). Raises UnknownObjectError."""
        model = self[class_id]  # raises for an unknown id, naming the registered ones
        return ObjectRegistry(
            models={key: value for key, value in self.models.items() if value is not model},
            source=self.source,
        )

    @property
    def class_ids(self) -> list[str]:
        return list(self.models)

    def __getitem__(self, class_id: str) -> ObjectModel:
        try:
            return self.models[class_id]
        except KeyError:
            raise UnknownObjectError(
                f"unknown object class {class_id!r}; registered: {', '.join(self.models) or '(none)'}"
            ) from None

    def __contains__(self, class_id: object) -> bool:
        return class_id in self.models

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self) -> Iterator[ObjectModel]:
        return iter(self.models.values())


def _model_from_entry(class_id: str, entry: Any, base_dir: Path, where: str) -> ObjectModel:
    if not isinstance(entry, Mapping):
        raise ObjectModelError(f"{where}: expected a mapping with keys {', '.join(sorted(_ENTRY_KEYS))}")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise ObjectModelError(
            f"{where}: unknown key(s) {sorted(map(str, unknown))}; allowed: {sorted(_ENTRY_KEYS)}"
        )
    mesh = entry.get("mesh")
    if not isinstance(mesh, str) or not mesh:
        raise ObjectModelError(f"{where}.mesh: required, a path or URI (got {mesh!r})")
    scale = entry.get("scale", 1.0)
    if (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ObjectModelError(
            f"{where}.scale: must be a positive number (mesh units -> metres), got {scale!r}"
        )
    symmetric = entry.get("symmetric", False)
    if not isinstance(symmetric, bool):
        raise ObjectModelError(f"{where}.symmetric: must be true or false, got {symmetric!r}")
    weights = entry.get("weights")
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise ObjectModelError(f"{where}.weights: must be a path, got {weights!r}")
    try:
        mesh_path = resolve_mesh_path(mesh, base_dir)
    except ObjectModelError as exc:
        raise ObjectModelError(f"{where}.mesh: {exc}") from None
    try:
        weights_path = resolve_mesh_path(weights, base_dir) if weights is not None else None
    except ObjectModelError as exc:
        raise ObjectModelError(f"{where}.weights: {exc}") from None
    try:
        symmetries = Symmetries.from_entry(entry, float(scale), where)
    except SymmetryError as exc:
        raise ObjectModelError(str(exc)) from None
    try:
        return ObjectModel.from_file(
            mesh_path, class_id, float(scale), symmetric, weights_path, symmetries=symmetries
        )
    except ObjectModelError as exc:
        raise ObjectModelError(f"{where}: {exc}") from exc


# Real textured meshes shipped in the pybullet wheel, usable in tests and demos without committing them:
# name -> (mesh URL, scale to metres, symmetric). Scales give real-world sizes (duck 19 cm at the
# environment recipe's 0.1 — pybullet's URDF uses 0.05 —, football 22 cm, ...).
PYBULLET_TEXTURED_MESHES: dict[str, tuple[str, float, bool]] = {
    "duck": ("pkg://pybullet_data/duck.obj", 0.1, False),
    "soccerball": ("pkg://pybullet_data/soccerball.obj", 0.22, True),
    "domino": ("pkg://pybullet_data/domino/domino.obj", 1.0, False),
    "jenga": ("pkg://pybullet_data/jenga/jenga.obj", 0.1, False),
    "torus": ("pkg://pybullet_data/torus/torus_textured.obj", 0.1, False),
    "tray": ("pkg://pybullet_data/tray/tray_textured.obj", 0.3, False),
    "textured_sphere": ("pkg://pybullet_data/textured_sphere_smooth.obj", 0.05, True),
}


def pybullet_mesh_available() -> bool:
    """Whether the pybullet_data package (with its meshes) is installed."""
    return importlib.util.find_spec("pybullet_data") is not None


def load_pybullet_object(name: str, class_id: str | None = None) -> ObjectModel:
    """Load one entry of :data:`PYBULLET_TEXTURED_MESHES` as an ObjectModel (needs pybullet installed)."""
    if name not in PYBULLET_TEXTURED_MESHES:
        raise UnknownObjectError(
            f"unknown pybullet mesh {name!r}; available: {', '.join(PYBULLET_TEXTURED_MESHES)}"
        )
    url, scale, symmetric = PYBULLET_TEXTURED_MESHES[name]
    return ObjectModel.from_file(url, class_id or name, scale, symmetric)
