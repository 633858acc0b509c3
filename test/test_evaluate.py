"""Evaluation tool: end-to-end CLI run on two synthetic scenes, JSON shape, option errors, sweep plot."""

from __future__ import annotations

import json

import pytest

from rnnpose_ros.core.objects import pybullet_mesh_available
from rnnpose_ros.tools import evaluate

pytestmark = pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")

RECALL_KEYS = {"add_s", "proj_5px", "cm5_deg5"}


def _check_recalls(block: dict) -> None:
    assert set(block) == RECALL_KEYS
    for value in block.values():
        assert 0.0 <= value <= 1.0


def test_cli_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = [
        "--num-scenes",
        "2",
        "--seed",
        "3",
        "--json",
        str(out),
        "--no-progress",
        "--outer-iterations",
        "4",
        "--restart-below",
        "0.95",
    ]
    code = evaluate.main(argv)
    assert code == 0
    result = json.loads(out.read_text())
    for key in ("initial", "refined", "per_object", "seconds_per_instance", "backend", "device"):
        assert key in result
    _check_recalls(result["initial"])
    _check_recalls(result["refined"])
    assert result["backend"] == "classical" and result["device"] == "cpu"
    assert result["config"]["outer_iterations"] == 4
    assert (
        result["config"]["restart_below_score"] == result["config"]["restart_below_score_with_depth"] == 0.95
    )
    assert result["seconds_per_instance"] > 0 and result["median_seconds_per_instance"] > 0
    assert result["num_scenes"] == 2 and result["num_instances"] == 2
    entry = result["per_object"]["duck"]
    assert entry["n"] == 2
    _check_recalls(entry["initial"])
    _check_recalls(entry["refined"])
    for key in ("mean_score_add_s_pass", "mean_score_add_s_fail", "score_auroc"):
        assert key in result
    for key in ("add_s_002", "add_s_005", "restart_rate"):
        assert 0.0 <= result[key] <= 1.0
    assert result["add_s_002"] <= result["add_s_005"] <= result["refined"]["add_s"]
    assert result["depth"] is False
    printed = capsys.readouterr().out
    assert "ADD(-S) < 0.1d" in printed and "refined" in printed


def test_depth_run_refines_the_same_scenes_with_depth(tmp_path):
    out = tmp_path / "eval.json"
    argv = ["--num-scenes", "1", "--seed", "3", "--depth", "--occluders", "1", "--json", str(out)]
    assert evaluate.main([*argv, "--no-progress", "--outer-iterations", "3"]) == 0
    result = json.loads(out.read_text())
    assert result["depth"] is True and result["occluders"] == 1
    assert result["num_instances"] == 1 and result["status_counts"] == {"ok": 1}


def test_score_auroc():
    assert evaluate.score_auroc([0.9, 0.7, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert evaluate.score_auroc([0.1, 0.9], [True, False]) == 0.0
    assert evaluate.score_auroc([0.5, 0.5, 0.4], [True, False, False]) == pytest.approx(0.75)
    assert evaluate.score_auroc([0.5, 0.6], [True, True]) is None


def test_sweep_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "SWEEP_FACTORS", (0.5, 1.0))
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    argv = ["--num-scenes", "1", "--sweep", "--plot", str(plot), "--json", str(out), "--no-progress"]
    argv += ["--outer-iterations", "2"]
    assert evaluate.main(argv) == 0
    result = json.loads(out.read_text())
    assert [level["noise"]["rot_deg"] for level in result["sweep"]] == [7.5, 15.0]
    assert result["noise"]["rot_deg"] == 15.0
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--noise-trans", "0.01,0.01"], "three"),
        (["--weights", "duck"], "CLASS=FILE"),
        (["--plot", "x.png"], "--sweep"),
        (["--num-scenes", "0"], "at least 1"),
    ],
)
def test_bad_options_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(argv)
    assert message in capsys.readouterr().err


def test_unknown_class_and_missing_weights_fail_clearly(tmp_path, capsys):
    assert evaluate.main(["--classes", "teapot", "--num-scenes", "1", "--no-progress"]) == 2
    assert "teapot" in capsys.readouterr().err
    missing = tmp_path / "none.pt"
    argv = ["--backend", "rnnpose", "--weights", f"duck={missing}", "--num-scenes", "1", "--no-progress"]
    assert evaluate.main(argv) == 2
    assert "not found" in capsys.readouterr().err
