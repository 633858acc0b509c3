"""The device parity tool (tools/cuda_parity.py) as a CPU dry run: its checks run and pass where the
numerics are those of check_parity, and a corrupted fixture fails them."""

from __future__ import annotations

import shutil

import torch

from rnnpose_ros.tools import cuda_parity


def test_dry_run_on_cpu_passes(golden, tmp_path) -> None:
    assert cuda_parity.main([str(golden), "--device", "cpu", "--json", str(tmp_path / "parity.json")]) == 0
    assert '"fp16": true' in (tmp_path / "parity.json").read_text()


def test_corrupted_descriptor_fixture_fails(golden, tmp_path) -> None:
    fixture = torch.load(golden / "desc2d.pt", weights_only=True)
    fixture["descriptors"] = -fixture["descriptors"]
    torch.save(fixture, tmp_path / "desc2d.pt")
    for name in ("refine_core.pt", "raft_encoder.pt", "update_block.pt", "confidence.pt"):
        shutil.copy(golden / name, tmp_path / name)
    assert cuda_parity.main([str(tmp_path), "--device", "cpu"]) == 1
