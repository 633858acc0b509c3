"""``evaluate --sequence``: the documented JSON of a short tracked sequence, its figure, option errors."""

from __future__ import annotations

import json

import pytest

from rnnpose_ros.core.objects import pybullet_mesh_available
from rnnpose_ros.tools import evaluate

pytestmark = pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")


def test_sequence_cli_writes_the_documented_json_and_figure(tmp_path, capsys):
    out, plot = tmp_path / "sequence.json", tmp_path / "sequence.png"
    argv = ["--sequence", "--frames", "3", "--detect-every", "2", "--outer-iterations", "3", "--seed", "2"]
    argv += ["--json", str(out), "--plot", str(plot), "--no-progress"]
    assert evaluate.main(argv) == 0
    record = json.loads(out.read_text())
    sequence = record["sequence"]
    assert {"add_s", "frames", "track_losses", "seconds_per_frame", "seconds_per_full_refinement"} <= set(
        sequence
    )
    assert sequence["frames"] == 3 and sequence["frame_instances"] == 3
    assert 0.0 <= sequence["add_s"] <= 1.0
    assert sequence["seconds_per_frame"] > 0 and sequence["seconds_per_full_refinement"] > 0
    assert [f["detections"] for f in sequence["per_frame"]] == [1, 0, 1]
    assert record["detect_every"] == 2 and record["classes"] == ["duck"]
    assert plot.stat().st_size > 1000
    assert "tracked ADD(-S)@0.1d" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sequence", "--frames", "0"], "at least 1"),
        (["--sequence", "--occlude", "5"], "FIRST,COUNT"),
        (["--sequence", "--occlude=-1,3"], "FIRST ≥ 0"),
    ],
)
def test_bad_sequence_options_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(argv)
    assert message in capsys.readouterr().err
