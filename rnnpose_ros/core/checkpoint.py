"""Strict, safe loading of RNNPose weights: published ``.tckpt`` files and our own format.

Every file is read with ``torch.load(weights_only=True)`` (tensors and plain containers only, no
code), then checked key by key and shape by shape against :class:`RNNPoseNet`; any difference
raises one :class:`CheckpointError` that names the missing, unexpected and mis-shaped keys. The
published loader silently skipped such keys, which hid wrong files.

Our format adds what published files lack, per object: the KPConv neighbour limits (the published
evaluation recalibrated them from the training set), a fingerprint of the mesh the features were
computed for, and the configuration::

    {"format": "rnnpose_ros.checkpoint", "version": 1,
     "state_dict": {<our keys>: Tensor},
     "objects": {<class_id>: {"neighbor_limits": [int, ...], "mesh_sha256": str, "num_vertices": int}},
     "config": {...}}
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .model import published_to_ours

FORMAT_NAME = "rnnpose_ros.checkpoint"
FORMAT_VERSION = 1
_LIST_LIMIT = 8


class CheckpointError(ValueError):
    """A weight file that cannot be used, with the reason and the file named."""


@dataclass(frozen=True)
class ObjectMetadata:
    """Per-object data stored with our checkpoints."""

    neighbor_limits: tuple[int, ...]
    mesh_sha256: str
    num_vertices: int


@dataclass
class CheckpointInfo:
    """What a loaded file was and what it carried besides the weights."""

    path: Path
    format: str  # "published" or FORMAT_NAME
    objects: dict[str, ObjectMetadata] = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def mesh_fingerprint(vertices: np.ndarray, faces: np.ndarray) -> str:
    """SHA-256 of the vertex (float32, metres) and face (int64) arrays: identifies the feature cloud."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(vertices, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(faces, dtype=np.int64).tobytes())
    return digest.hexdigest()


def read_weight_file(path: str | Path) -> object:
    """``torch.load`` a weight file safely onto the CPU, turning every failure into a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"weight file {path} is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(str(exc))
        if "global" in reason.lower():
            raise CheckpointError(
                f"weight file {path} holds objects other than tensors and plain containers "
                f"(refused, nothing of it was run): {reason}"
            ) from exc
        raise CheckpointError(f"weight file {path} is not a readable torch file ({reason})") from exc
    except Exception as exc:  # garbage makes torch's loader raise almost any type
        raise CheckpointError(
            f"weight file {path} is truncated or not a torch file: {type(exc).__name__}: {exc}"
        ) from exc


def _unpickler_reason(message: str) -> str:
    """The weights-only unpickler's own reason, without torch's advice around it (which suggests
    loading with ``weights_only=False``, exactly what a refused file must never get)."""
    _, found, rest = message.partition("WeightsUnpickler error:")
    if not found:
        return "refused by the weights-only unpickler"
    return (
        " ".join(rest.split("Check the documentation")[0].split()) or "refused by the weights-only unpickler"
    )


def _summarise(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f" (+{len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else "")


def check_state_dict(path: Path, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if misshaped:
        problems.append(f"wrong shapes: {_summarise(misshaped)}")
    if problems:
        raise CheckpointError(f"weight file {path} does not match the RNNPose model: " + "; ".join(problems))


def _tensor_dict(path: Path, content: object, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(content, Mapping) or not all(isinstance(k, str) for k in content):
        raise CheckpointError(f"weight file {path}: {what} is not a dict of named tensors")
    not_tensors = [k for k, v in content.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise CheckpointError(
            f"weight file {path}: {what} entries are not tensors: {_summarise(not_tensors)}"
        )
    return dict(content)


def _published_state_dict(path: Path, content: object) -> dict[str, torch.Tensor]:
    """Rename a published flat state_dict to our keys; unknown keys are kept so they get reported."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in _tensor_dict(path, content, "the published state_dict").items():
        try:
            ours = published_to_ours(key)
        except KeyError:
            ours = key  # reported as unexpected by check_state_dict
        if ours is not None:
            renamed[ours] = value
    return renamed


def _object_metadata(path: Path, objects: object) -> dict[str, ObjectMetadata]:
    if not isinstance(objects, Mapping):
        raise CheckpointError(f"weight file {path}: 'objects' is not a dict")
    parsed = {}
    for class_id, meta in objects.items():
        try:
            parsed[str(class_id)] = ObjectMetadata(
                neighbor_limits=tuple(int(n) for n in meta["neighbor_limits"]),
                mesh_sha256=str(meta["mesh_sha256"]),
                num_vertices=int(meta["num_vertices"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"weight file {path}: bad metadata for object {class_id!r}: {exc}") from exc
    return parsed


def load_checkpoint(path: str | Path, model: nn.Module) -> CheckpointInfo:
    """Load a published ``.tckpt`` or one of ours strictly into ``model`` (an RNNPoseNet).

    Raises:
        CheckpointError: unreadable/unsafe file, or any key or shape difference.
    """
    path = Path(path)
    content = read_weight_file(path)
    if isinstance(content, Mapping) and content.get("format") == FORMAT_NAME:
        version = content.get("version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"weight file {path} has format version {version!r}; expected {FORMAT_VERSION}"
            )
        state_dict = _tensor_dict(path, content.get("state_dict"), "'state_dict'")
        info = CheckpointInfo(
            path,
            FORMAT_NAME,
            _object_metadata(path, content.get("objects", {})),
            dict(content.get("config", {})),
        )
    else:
        state_dict = _published_state_dict(path, content)
        info = CheckpointInfo(path, "published")
    check_state_dict(path, state_dict, model)
    model.load_state_dict(state_dict, strict=True)
    return info


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    objects: Mapping[str, ObjectMetadata] | None = None,
    config: Mapping | None = None,
) -> None:
    """Write our format: weights plus per-object metadata and configuration."""
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "objects": {
            class_id: {
                "neighbor_limits": list(meta.neighbor_limits),
                "mesh_sha256": meta.mesh_sha256,
                "num_vertices": meta.num_vertices,
            }
            for class_id, meta in (objects or {}).items()
        },
        "config": dict(config or {}),
    }
    torch.save(payload, Path(path))
