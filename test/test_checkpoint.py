"""Strict, safe weight loading: published key table, our format, and every way a file can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnpose_ros.core.checkpoint import (
    CheckpointError,
    ObjectMetadata,
    load_checkpoint,
    mesh_fingerprint,
    save_checkpoint,
)
from rnnpose_ros.core.model import RNNPoseNet, ours_to_published, published_to_ours

from conftest import STATE_DICT_SPEC

KEY_TABLE = STATE_DICT_SPEC


@pytest.fixture(scope="module")
def key_table() -> list[tuple[str, list[int]]]:
    if not KEY_TABLE.is_file():
        pytest.skip(f"published key table not found at {KEY_TABLE}")
    return [(k, shape) for k, shape in json.loads(KEY_TABLE.read_text())]


@pytest.fixture(scope="module")
def model() -> RNNPoseNet:
    return RNNPoseNet()


def synthetic_published(key_table, generator_seed: int = 0) -> dict[str, torch.Tensor]:
    """A published-layout state_dict with random tensors of exactly the listed shapes."""
    gen = torch.Generator().manual_seed(generator_seed)
    state = {}
    for key, shape in key_table:
        if key == "global_step":
            state[key] = torch.tensor([1234], dtype=torch.int64)
        else:
            state[key] = torch.randn(shape, generator=gen)
    return state


def test_key_mapping_is_a_bijection(key_table, model) -> None:
    ours = model.state_dict()
    mapped = {published_to_ours(k) for k, _ in key_table} - {None}
    assert mapped == set(ours)
    assert {ours_to_published(k) for k in ours} == {k for k, _ in key_table} - {"global_step"}


def test_synthetic_published_file_loads_strictly(tmp_path: Path, key_table, model) -> None:
    state = synthetic_published(key_table)
    path = tmp_path / "duck.tckpt"
    torch.save(state, path)
    info = load_checkpoint(path, model)
    assert info.format == "published"
    loaded = model.state_dict()
    for key, value in state.items():
        ours = published_to_ours(key)
        if ours is not None:
            assert torch.equal(loaded[ours], value), key


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("missing", "motion_net.cf_net.update_block.gru.convz1.weight"),
        ("extra", "motion_net.extra_head.weight"),
        ("shape", "hybrid_desc_net.corr_fea_extractor_2d.convDb.weight"),
    ],
)
def test_mismatched_file_fails_naming_the_key(
    tmp_path: Path, key_table, model, change: str, named: str
) -> None:
    state = synthetic_published(key_table)
    if change == "missing":
        del state[named]
        expected = "missing keys: update_block.gru.convz1.weight"
    elif change == "extra":
        state[named] = torch.zeros(3)
        expected = f"unexpected keys: {named}"
    else:
        state[named] = torch.zeros(16, 256, 1, 1)
        expected = "wrong shapes: desc2d.convDb.weight (16, 256, 1, 1) (expected (32, 256, 1, 1))"
    path = tmp_path / "bad.tckpt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_truncated_file_fails_safely(tmp_path: Path, key_table, model) -> None:
    path = tmp_path / "whole.tckpt"
    torch.save(synthetic_published(key_table), path)
    data = path.read_bytes()
    cut = tmp_path / "cut.tckpt"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or not a torch file"):
        load_checkpoint(cut, model)


class _Payload:
    """Stands for arbitrary code in a pickle: weights_only loading must refuse to build it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path: Path, model, capsys) -> None:
    path = tmp_path / "evil.tckpt"
    torch.save({"state": _Payload()}, path)
    with pytest.raises(CheckpointError, match="objects other than tensors") as refused:
        load_checkpoint(path, model)
    assert "this must never run" not in capsys.readouterr().out
    assert "weights_only" not in str(refused.value)  # torch's advice to load unsafely is not passed on


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n"])
def test_non_checkpoint_files(tmp_path: Path, model, content: bytes) -> None:
    path = tmp_path / "file.tckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, model)


@pytest.mark.parametrize("seed", range(40))
def test_random_bytes_give_one_clear_error(tmp_path: Path, model, seed: int) -> None:
    """Garbage makes torch's loader raise many types (UnpicklingError, IndexError, UnicodeDecodeError…);
    each becomes a CheckpointError that does not suggest unsafe loading."""
    path = tmp_path / "random.tckpt"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, model)
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


def test_missing_file(tmp_path: Path, model) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.tckpt", model)


def test_published_file_of_the_wrong_kind(tmp_path: Path, model) -> None:
    path = tmp_path / "list.tckpt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a dict of named tensors"):
        load_checkpoint(path, model)


def test_own_format_round_trip_with_metadata(tmp_path: Path, model) -> None:
    vertices = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    faces = np.arange(48, dtype=np.int64).reshape(16, 3)
    meta = ObjectMetadata((23, 27, 30, 37), mesh_fingerprint(vertices, faces), 50)
    path = tmp_path / "ours.pt"
    save_checkpoint(path, model, {"duck": meta}, {"published_conventions": True})
    other = RNNPoseNet()
    info = load_checkpoint(path, other)
    assert info.format == "rnnpose_ros.checkpoint"
    assert info.objects == {"duck": meta}
    assert info.config == {"published_conventions": True}
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert mesh_fingerprint(vertices, faces) != mesh_fingerprint(vertices + 1e-3, faces)
