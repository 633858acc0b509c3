"""check_parity CLI: kind resolution, module collection, reporting and exit status."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnnpose_ros.core.nets.confidence import descriptor_confidence
from rnnpose_ros.tools import check_parity
from rnnpose_ros.tools.check_parity import ParityRegistryError, collect_checks, main, resolve_kind

from conftest import run_check_parity

REPO_ROOT = Path(__file__).resolve().parents[1]
NETS2D_KINDS = ["desc2d", "raft_encoder", "corr_lookup", "update_block", "confidence"]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _confidence_fixture(seed: int, height: int = 6, width: int = 10) -> dict:
    """A small fixture in the golden ``confidence`` format, with our own outputs as reference."""
    generator = torch.Generator().manual_seed(seed)
    rendered = torch.nn.functional.normalize(torch.randn(1, 8, height, width, generator=generator), dim=1)
    observed = torch.nn.functional.normalize(torch.randn(1, 8, height, width, generator=generator), dim=1)
    flow = torch.randn(1, 2, height, width, generator=generator)
    depth = (torch.rand(1, 1, height, width, generator=generator) > 0.3).float()
    sigma = torch.tensor([0.75])
    result = descriptor_confidence(rendered, observed, flow, depth, sigma)
    return {
        "sigma": sigma,
        "geofea_rendered": rendered,
        "geofea_observed": observed,
        "flow": flow,
        "syn_depth": depth,
        "correspondence_target": result.target.view(1, 1, height, width, 2),
        "warped_observed": result.warped_observed,
        "similarity": result.similarity.view(1, 1, height, width, 1),
        "weight": result.weight.view(1, 1, height, width, 1),
    }


def test_resolve_kind_takes_the_longest_prefix() -> None:
    kinds = ["desc", "desc2d", "lm_step"]
    assert resolve_kind("desc2d_seed3", kinds) == "desc2d"
    assert resolve_kind("desc3d", kinds) == "desc"
    assert resolve_kind("refine_core", kinds) is None


def test_collect_checks_skips_missing_modules_and_reports_broken_ones(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "parity_fake_broken.py").write_text("import module_that_does_not_exist_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    checks, errors = collect_checks(
        ["rnnpose_ros.tools.parity_nets2d", "rnnpose_ros.tools.parity_does_not_exist", "parity_fake_broken"]
    )
    assert sorted(checks) == sorted(NETS2D_KINDS)
    assert "parity_does_not_exist not found" in capsys.readouterr().out
    assert len(errors) == 1 and "parity_fake_broken" in errors[0]


def test_collect_checks_rejects_duplicate_kinds(tmp_path, monkeypatch) -> None:
    (tmp_path / "parity_fake_dup.py").write_text("CHECKS = {'desc2d': print}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ParityRegistryError):
        collect_checks(["rnnpose_ros.tools.parity_nets2d", "parity_fake_dup"])


def test_cli_reports_pass_fail_and_unchecked(tmp_path, monkeypatch, capsys, restore_threads) -> None:
    # Only the nets2d checks: the outcome must not depend on other modules' state.
    monkeypatch.setattr(check_parity, "PARITY_MODULES", ("rnnpose_ros.tools.parity_nets2d",))
    good = _confidence_fixture(0)
    bad = _confidence_fixture(1, height=5, width=7)
    bad["weight"] = bad["weight"] + 1e-3
    torch.save(good, tmp_path / "confidence_small.pt")
    torch.save(bad, tmp_path / "confidence_perturbed.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "unknown_kind.pt")

    status = main([str(tmp_path), "--native-kernels"])
    out = capsys.readouterr().out
    assert status == 1
    assert torch.get_num_threads() == 2
    assert "PASS  confidence_small.pt:weight" in out
    assert "FAIL  confidence_perturbed.pt:weight" in out
    assert "max_abs=1.000e-03" in out
    assert "unknown_kind.pt: no registered check" in out

    (tmp_path / "confidence_perturbed.pt").unlink()
    assert main([str(tmp_path), "--native-kernels", "--only", "confidence"]) == 0
    assert "unknown_kind.pt" not in capsys.readouterr().out


def test_cli_usage_errors(tmp_path, monkeypatch, restore_threads) -> None:
    monkeypatch.setattr(check_parity, "PARITY_MODULES", ("rnnpose_ros.tools.parity_nets2d",))
    assert main([str(tmp_path / "missing"), "--native-kernels"]) == 2
    assert main([str(tmp_path), "--native-kernels", "--only", "no_such_kind"]) == 2
    assert main([str(tmp_path), "--native-kernels", "--only", "desc2d"]) == 1  # nothing to compare


def test_golden_end_to_end(golden: Path) -> None:
    # The cheap kinds only: test_nets_desc2d / test_nets_raft run the CLI on the network fixtures.
    kinds = ["corr_lookup", "confidence"]
    result = run_check_parity(golden, *kinds)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    for kind in kinds:
        assert f"PASS  {kind}.pt [{kind}]" in result.stdout
    assert "FAIL" not in result.stdout
