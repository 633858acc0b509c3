"""BOP-format datasets (https://bop.felk.cvut.cz/datasets/): reading, writing synthetic scenes, and
BOP19 result files. No ROS.

Layout read and written (LINEMOD, LM-O, YCB-V, T-LESS and HOPE share it)::

    ROOT/models/models_info.json           {"<obj_id>": {"diameter": mm, "min_x": mm, "size_x": mm, …,
                                            optional "symmetries_discrete" / "symmetries_continuous"}}
    ROOT/models/obj_000001.ply             the mesh in millimetres (texture via "comment TextureFile")
    ROOT/<split>/000000/scene_camera.json  {"<im_id>": {"cam_K": [9], "depth_scale": mm per unit}}
    ROOT/<split>/000000/scene_gt.json      {"<im_id>": [{"obj_id", "cam_R_m2c": [9], "cam_t_m2c": [3] mm}]}
    ROOT/<split>/000000/scene_gt_info.json {"<im_id>": [{"visib_fract", "px_count_visib", "bbox_visib"}]}
    ROOT/<split>/000000/rgb/000000.png     (or .jpg); depth/000000.png (uint16, depth_scale mm units)
    ROOT/<split>/000000/mask_visib/000000_000000.png   visible mask of annotation 0 of image 0

Poses here are 4×4 model→camera in **metres** (BOP stores millimetres; the conversion happens at the
file boundary). A BOP19 results file is CSV ``scene_id,im_id,obj_id,score,R,t,time`` with R row-major
(9 numbers separated by spaces), t in millimetres and time in seconds (−1 when unknown).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from rnnpose_ros.core.objects import ObjectModel, ObjectModelError, ObjectRegistry

#: BOP stores lengths in millimetres.
MM_PER_M = 1000.0
#: A models_info diameter below this many millimetres is taken for metres by mistake.
MIN_DIAMETER_MM = 5.0
RESULTS_HEADER = ("scene_id", "im_id", "obj_id", "score", "R", "t", "time")


class BopError(ValueError):
    """A BOP dataset or results file that cannot be used, with the file and the reason named."""


def object_class_id(obj_id: int) -> str:
    """The registry class id of BOP object ``obj_id`` ("obj_000001")."""
    return f"obj_{int(obj_id):06d}"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise BopError(f"missing BOP file {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BopError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BopError(f"{path}: expected a JSON object keyed by id")
    return data


def pose_from_bop(R: Sequence[float], t_mm: Sequence[float]) -> np.ndarray:
    """(4, 4) float64 model→camera pose in metres from BOP's row-major R and t in millimetres."""
    pose = np.eye(4)
    pose[:3, :3] = np.asarray(R, dtype=np.float64).reshape(3, 3)
    pose[:3, 3] = np.asarray(t_mm, dtype=np.float64).reshape(3) / MM_PER_M
    return pose


def pose_to_bop(pose: np.ndarray) -> tuple[list[float], list[float]]:
    """(row-major R as 9 floats, t in millimetres as 3 floats) of a (4, 4) pose in metres."""
    pose = np.asarray(pose, dtype=np.float64)
    return pose[:3, :3].reshape(-1).tolist(), (pose[:3, 3] * MM_PER_M).tolist()


@dataclass
class BopAnnotation:
    """One annotated object instance of an image.

    Attributes:
        obj_id: BOP object id; index: position in the image's ``scene_gt`` list (mask file suffix).
        pose: (4, 4) float64 model→camera ground truth, metres.
        visib_fract: visible fraction from ``scene_gt_info.json`` (1.0 when that file has none).
    """

    obj_id: int
    index: int
    pose: np.ndarray
    visib_fract: float = 1.0


@dataclass
class BopImage:
    """One image of a split with its camera and annotations (pixels loaded on demand)."""

    scene_id: int
    im_id: int
    K: np.ndarray
    folder: Path
    depth_scale: float
    annotations: list[BopAnnotation] = field(default_factory=list)

    def _file(self, kind: str, suffixes: Sequence[str], name: str | None = None) -> Path:
        stem = name or f"{self.im_id:06d}"
        for suffix in suffixes:
            path = self.folder / kind / f"{stem}{suffix}"
            if path.is_file():
                return path
        raise BopError(f"missing {kind} image {self.folder / kind / stem}{'|'.join(suffixes)}")

    def rgb(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB (grey images are repeated to three channels)."""
        path = self._file("rgb", (".png", ".jpg", ".tif"))
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise BopError(f"cannot read image {path}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def depth(self) -> np.ndarray:
        """(H, W) float32 depth in metres (0 = unknown)."""
        path = self._file("depth", (".png", ".tif"))
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None or raw.ndim != 2:
            raise BopError(f"cannot read depth image {path} (expected one 16-bit channel)")
        return (raw.astype(np.float32) * np.float32(self.depth_scale / MM_PER_M)).astype(np.float32)

    def mask_visib(self, annotation: BopAnnotation) -> np.ndarray:
        """(H, W) bool visible mask of one annotation."""
        path = self._file("mask_visib", (".png",), f"{self.im_id:06d}_{annotation.index:06d}")
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise BopError(f"cannot read mask {path}")
        return mask > 127


class BopDataset:
    """A BOP dataset folder: its objects (metres) and the images of its splits.

    Args:
        root: the dataset folder (holding ``models/`` and the split folders).
        models_dir: the models folder name (BOP ships e.g. ``models_eval`` beside ``models``).

    Raises:
        BopError: missing ``models_info.json``, or a diameter that looks like metres.
    """

    def __init__(self, root: Path, models_dir: str = "models") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise BopError(f"BOP dataset folder {self.root} does not exist")
        self.models_folder = self.root / models_dir
        info = _read_json(self.models_folder / "models_info.json")
        self.models_info: dict[int, dict] = {}
        for key, entry in info.items():
            try:
                obj_id = int(key)
                diameter = float(entry["diameter"])
            except (KeyError, TypeError, ValueError) as exc:
                raise BopError(
                    f"{self.models_folder / 'models_info.json'}: bad entry {key!r}: {exc}"
                ) from exc
            if not diameter >= MIN_DIAMETER_MM:
                raise BopError(
                    f"{self.models_folder / 'models_info.json'}: object {obj_id} has diameter {diameter}; "
                    f"BOP models are in millimetres (a diameter below {MIN_DIAMETER_MM} mm suggests metres)"
                )
            self.models_info[obj_id] = entry
        self._models: dict[int, ObjectModel] = {}

    @property
    def obj_ids(self) -> list[int]:
        return sorted(self.models_info)

    def symmetric(self, obj_id: int) -> bool:
        """Whether models_info lists a symmetry of the object (ADD-S then replaces ADD)."""
        entry = self.models_info[self._known(obj_id)]
        return bool(
            entry.get("symmetries_discrete") or entry.get("symmetries_continuous") or entry.get("symmetric")
        )

    def _known(self, obj_id: int) -> int:
        if int(obj_id) not in self.models_info:
            raise BopError(f"unknown BOP object id {obj_id}; {self.models_folder} has {self.obj_ids}")
        return int(obj_id)

    def model(self, obj_id: int) -> ObjectModel:
        """The object in metres (class id ``obj_XXXXXX``), checked against its models_info diameter."""
        obj_id = self._known(obj_id)
        if obj_id not in self._models:
            path = self.models_folder / f"obj_{obj_id:06d}.ply"
            if not path.is_file():
                raise BopError(f"missing BOP model {path}")
            try:
                model = ObjectModel.from_file(
                    path, object_class_id(obj_id), scale=1.0 / MM_PER_M, symmetric=self.symmetric(obj_id)
                )
            except ObjectModelError as exc:
                raise BopError(str(exc)) from exc
            expected = float(self.models_info[obj_id]["diameter"]) / MM_PER_M
            if not 0.5 * expected <= model.diameter <= 2.0 * expected:
                raise BopError(
                    f"{path}: mesh diameter {model.diameter * MM_PER_M:.1f} mm disagrees with models_info "
                    f"{expected * MM_PER_M:.1f} mm (wrong units?)"
                )
            self._models[obj_id] = model
        return self._models[obj_id]

    def registry(self, obj_ids: Sequence[int] | None = None) -> ObjectRegistry:
        """A registry of the objects (all by default), keyed by ``obj_XXXXXX``."""
        ids = self.obj_ids if obj_ids is None else [self._known(i) for i in obj_ids]
        return ObjectRegistry(models={object_class_id(i): self.model(i) for i in ids})

    def scene_ids(self, split: str) -> list[int]:
        folder = self.root / split
        if not folder.is_dir():
            raise BopError(f"split folder {folder} does not exist")
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def images(self, split: str, scene_ids: Sequence[int] | None = None) -> Iterator[BopImage]:
        """The annotated images of a split, by scene then image id.

        Raises:
            BopError: a missing or malformed JSON file, or an annotation of an unknown object.
        """
        for scene_id in self.scene_ids(split) if scene_ids is None else scene_ids:
            folder = self.root / split / f"{int(scene_id):06d}"
            cameras = _read_json(folder / "scene_camera.json")
            truth = _read_json(folder / "scene_gt.json")
            info_path = folder / "scene_gt_info.json"
            infos = _read_json(info_path) if info_path.is_file() else {}
            for key in sorted(truth, key=int):
                if key not in cameras:
                    raise BopError(f"{folder / 'scene_camera.json'} has no camera for image {key}")
                camera = cameras[key]
                annotations = []
                for index, gt in enumerate(truth[key]):
                    try:
                        obj_id = self._known(int(gt["obj_id"]))
                        pose = pose_from_bop(gt["cam_R_m2c"], gt["cam_t_m2c"])
                    except (KeyError, TypeError, ValueError) as exc:
                        raise BopError(
                            f"{folder / 'scene_gt.json'}: image {key} entry {index}: {exc}"
                        ) from exc
                    visib = infos.get(key, [{}] * (index + 1))[index].get("visib_fract", 1.0)
                    annotations.append(BopAnnotation(obj_id, index, pose, float(visib)))
                yield BopImage(
                    scene_id=int(scene_id),
                    im_id=int(key),
                    K=np.asarray(camera["cam_K"], dtype=np.float64).reshape(3, 3),
                    folder=folder,
                    depth_scale=float(camera.get("depth_scale", 1.0)),
                    annotations=annotations,
                )


# --------------------------------------------------------------------------------------- writing


def write_ply(path: Path, model: ObjectModel) -> None:
    """Write ``model`` as a binary PLY in millimetres (double coordinates, so that metres round-trip),
    with texture coordinates and a ``TextureFile`` PNG beside it, or vertex colours."""
    n = len(model.vertices)
    header = ["ply", "format binary_little_endian 1.0"]
    fields = [("xyz", "<f8", 3)]
    properties = ["property double x", "property double y", "property double z"]
    if model.texture is not None and model.uvs is not None:
        texture_name = path.with_suffix(".png").name
        cv2.imwrite(str(path.with_suffix(".png")), cv2.cvtColor(model.texture, cv2.COLOR_RGB2BGR))
        header.append(f"comment TextureFile {texture_name}")
        fields.append(("uv", "<f4", 2))
        properties += ["property float texture_u", "property float texture_v"]
    elif model.vertex_colors is not None:
        fields.append(("rgb", "u1", 3))
        properties += ["property uchar red", "property uchar green", "property uchar blue"]
    header += [f"element vertex {n}", *properties, f"element face {len(model.faces)}"]
    header += ["property list uchar int vertex_indices", "end_header"]
    vertices = np.zeros(n, dtype=fields)
    vertices["xyz"] = np.asarray(model.vertices, np.float64) * MM_PER_M
    if "uv" in vertices.dtype.names:
        vertices["uv"] = model.uvs
    if "rgb" in vertices.dtype.names:
        vertices["rgb"] = model.vertex_colors
    faces = np.zeros(len(model.faces), dtype=[("n", "u1"), ("i", "<i4", 3)])
    faces["n"], faces["i"] = 3, model.faces
    path.write_bytes(("\n".join(header) + "\n").encode() + vertices.tobytes() + faces.tobytes())


def write_models(root: Path, models: dict[int, ObjectModel]) -> None:
    """``models/obj_XXXXXX.ply`` and ``models/models_info.json`` (millimetres) for obj_id → model.

    A model marked symmetric gets ``"symmetric": true`` (its symmetry group is not known here; this
    reader honours the key, the BOP toolkit only reads explicit symmetries).
    """
    folder = Path(root) / "models"
    folder.mkdir(parents=True, exist_ok=True)
    info = {}
    for obj_id, model in sorted(models.items()):
        write_ply(folder / f"obj_{obj_id:06d}.ply", model)
        low = np.asarray(model.vertices, np.float64).min(0) * MM_PER_M
        size = np.ptp(np.asarray(model.vertices, np.float64), axis=0) * MM_PER_M
        entry = {"diameter": model.diameter * MM_PER_M}
        entry.update({f"min_{a}": float(v) for a, v in zip("xyz", low, strict=True)})
        entry.update({f"size_{a}": float(v) for a, v in zip("xyz", size, strict=True)})
        if model.symmetric:
            entry["symmetric"] = True
        info[str(obj_id)] = entry
    (folder / "models_info.json").write_text(json.dumps(info, indent=1))


@dataclass
class SceneRecord:
    """One image to write: what :class:`~rnnpose_ros.core.synth.Scene` holds, in BOP terms.

    Attributes:
        image: (H, W, 3) uint8 RGB; K: (3, 3); depth: (H, W) float metres or None.
        objects: per instance (obj_id, pose (4, 4) metres, visible mask (H, W) bool, visible fraction).
    """

    image: np.ndarray
    K: np.ndarray
    depth: np.ndarray | None
    objects: list[tuple[int, np.ndarray, np.ndarray, float]]


def write_scene(root: Path, split: str, scene_id: int, records: Sequence[SceneRecord]) -> Path:
    """Write one BOP scene folder (images 0..n−1 of ``records``); depth PNGs in 0.1 mm units."""
    folder = Path(root) / split / f"{scene_id:06d}"
    for sub in ("rgb", "depth", "mask_visib"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    cameras, truth, infos = {}, {}, {}
    depth_scale = 0.1
    for im_id, record in enumerate(records):
        cv2.imwrite(str(folder / "rgb" / f"{im_id:06d}.png"), cv2.cvtColor(record.image, cv2.COLOR_RGB2BGR))
        if record.depth is not None:
            units = np.round(np.asarray(record.depth, np.float64) * MM_PER_M / depth_scale)
            cv2.imwrite(
                str(folder / "depth" / f"{im_id:06d}.png"), np.clip(units, 0, 65535).astype(np.uint16)
            )
        cameras[str(im_id)] = {
            "cam_K": np.asarray(record.K, np.float64).reshape(-1).tolist(),
            "depth_scale": depth_scale,
        }
        truth[str(im_id)], infos[str(im_id)] = [], []
        for index, (obj_id, pose, mask, visible) in enumerate(record.objects):
            R, t = pose_to_bop(pose)
            truth[str(im_id)].append({"cam_R_m2c": R, "cam_t_m2c": t, "obj_id": int(obj_id)})
            ys, xs = np.nonzero(mask)
            bbox = (
                [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
                if len(xs)
                else [-1] * 4
            )
            infos[str(im_id)].append(
                {"visib_fract": float(visible), "px_count_visib": int(mask.sum()), "bbox_visib": bbox}
            )
            cv2.imwrite(
                str(folder / "mask_visib" / f"{im_id:06d}_{index:06d}.png"), mask.astype(np.uint8) * 255
            )
    (folder / "scene_camera.json").write_text(json.dumps(cameras, indent=1))
    (folder / "scene_gt.json").write_text(json.dumps(truth, indent=1))
    (folder / "scene_gt_info.json").write_text(json.dumps(infos, indent=1))
    return folder


# --------------------------------------------------------------------------------------- results


@dataclass
class BopEstimate:
    """One row of a BOP19 results file (pose in metres)."""

    scene_id: int
    im_id: int
    obj_id: int
    score: float
    pose: np.ndarray
    time: float = -1.0


def write_results(path: Path, estimates: Sequence[BopEstimate]) -> None:
    """A BOP19 results CSV (the BOP toolkit's input format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(RESULTS_HEADER)
        for e in estimates:
            R, t = pose_to_bop(e.pose)
            writer.writerow(
                [
                    e.scene_id,
                    e.im_id,
                    e.obj_id,
                    f"{e.score:.6f}",
                    " ".join(f"{v:.17g}" for v in R),
                    " ".join(f"{v:.17g}" for v in t),
                    f"{e.time:.6f}",
                ]
            )


def read_results(path: Path) -> list[BopEstimate]:
    """Rows of a BOP19 results CSV, in file order.

    Raises:
        BopError: missing file, wrong header, or a malformed row (named by its line).
    """
    path = Path(path)
    if not path.is_file():
        raise BopError(f"results file {path} does not exist")
    estimates = []
    with path.open(newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != RESULTS_HEADER:
            raise BopError(f"{path}: expected the header {','.join(RESULTS_HEADER)}, got {header}")
        for line, row in enumerate(reader, start=2):
            try:
                scene_id, im_id, obj_id, score, R, t, time = row
                estimates.append(
                    BopEstimate(
                        int(scene_id),
                        int(im_id),
                        int(obj_id),
                        float(score),
                        pose_from_bop([float(v) for v in R.split()], [float(v) for v in t.split()]),
                        float(time),
                    )
                )
            except ValueError as exc:
                raise BopError(f"{path}:{line}: malformed row {row}: {exc}") from exc
    return estimates
