"""BOP datasets: writer → reader round trip of synthetic scenes, clear errors for broken folders, and
the BOP evaluation of a written folder equal to the in-memory synthetic evaluation of the same scenes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rnnpose_ros.core.objects import ObjectRegistry, pybullet_mesh_available
from rnnpose_ros.data.bop import BopDataset, BopError, object_class_id, read_results, write_results
from rnnpose_ros.data.synthetic_bop import write_synthetic_dataset
from rnnpose_ros.tools import evaluate

pytestmark = pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")

NUM_SCENES = 2
SEED = 5


def _argv(extra: list[str]) -> list[str]:
    return [
        "--num-scenes",
        str(NUM_SCENES),
        "--seed",
        str(SEED),
        "--outer-iterations",
        "2",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def written(tmp_path_factory, renderer, duck_registry):
    """Two synthetic duck scenes (exactly those ``evaluate`` generates) written as a BOP folder."""
    from rnnpose_ros.core.synth import make_scene

    args = evaluate.parse_args(_argv([]))
    spec = evaluate.scene_spec(args, args.noise_rot, args.noise_trans)
    scenes = [
        make_scene(evaluate.scene_models(args, duck_registry, i), SEED + i, renderer, spec)
        for i in range(NUM_SCENES)
    ]
    root = tmp_path_factory.mktemp("bop")
    init = write_synthetic_dataset(root, [duck_registry["duck"]], lambda i: scenes[i], NUM_SCENES, renderer)
    return root, init, scenes


def test_round_trip(written, duck_registry):
    root, init, scenes = written
    dataset = BopDataset(root)
    assert dataset.obj_ids == [1]
    duck, read = duck_registry["duck"], dataset.model(1)
    np.testing.assert_allclose(read.vertices, duck.vertices, atol=1e-9)
    assert np.array_equal(read.faces, duck.faces) and np.array_equal(read.texture, duck.texture)
    assert read.diameter == pytest.approx(duck.diameter, rel=1e-6)
    images = list(dataset.images("test"))
    assert [im.im_id for im in images] == list(range(NUM_SCENES))
    for image, scene in zip(images, scenes, strict=True):
        assert np.array_equal(image.rgb(), scene.image)
        np.testing.assert_allclose(image.K, scene.K, rtol=0, atol=1e-12)
        (annotation,) = image.annotations
        np.testing.assert_allclose(annotation.pose, scene.instances[0].pose_gt, rtol=0, atol=1e-12)
        assert np.array_equal(image.mask_visib(annotation), scene.instances[0].mask)
        # The visible mask comes from a supersampled render: its edge pixels may miss the pixel centre.
        on_object = image.depth()[scene.instances[0].mask]
        assert (on_object > 0).mean() > 0.9 and on_object[on_object > 0].min() > 0.2
    rows = read_results(init)
    np.testing.assert_allclose(rows[1].pose, scenes[1].instances[0].pose_init, rtol=0, atol=1e-12)


def test_bop_evaluation_equals_the_in_memory_evaluation(written, tmp_path, capsys):
    root, init, _ = written
    memory_json, bop_json, csv, plot = (tmp_path / n for n in ("mem.json", "bop.json", "out.csv", "bop.png"))
    assert evaluate.main(_argv(["--json", str(memory_json)])) == 0
    bop_argv = ["--dataset", "bop", "--root", str(root), "--init", str(init), "--json", str(bop_json)]
    bop_argv += ["--results-csv", str(csv), "--plot", str(plot)]
    assert evaluate.main(_argv(bop_argv)) == 0
    memory, bop = json.loads(memory_json.read_text()), json.loads(bop_json.read_text())
    assert bop["num_instances"] == memory["num_instances"] == NUM_SCENES
    assert bop["initial"] == memory["initial"] and bop["refined"] == memory["refined"]
    assert bop["status_counts"] == memory["status_counts"]
    assert bop["mean_score"] == pytest.approx(memory["mean_score"], abs=1e-6)
    assert set(bop["bop"]) == {"ar_mssd", "ar_mspd", "ar_mean"}
    assert 0 <= bop["per_object"][object_class_id(1)]["bop"]["ar_mssd"] <= 1
    assert len(read_results(csv)) == NUM_SCENES and plot.stat().st_size > 0
    assert "AR_MSSD" in capsys.readouterr().out


def _copy(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def test_missing_files_wrong_units_and_unknown_ids_are_named(written, tmp_path):
    root, _, _ = written
    broken = _copy(root, tmp_path)
    (broken / "test" / "000000" / "scene_gt.json").unlink()
    with pytest.raises(BopError, match=r"missing BOP file .*scene_gt\.json"):
        list(BopDataset(broken).images("test"))
    info_path = broken / "models" / "models_info.json"
    info = json.loads(info_path.read_text())
    info["1"]["diameter"] = 0.19
    info_path.write_text(json.dumps(info))
    with pytest.raises(BopError, match="millimetres"):
        BopDataset(broken)
    dataset = BopDataset(root)
    with pytest.raises(BopError, match="unknown BOP object id 7"):
        dataset.model(7)
    with pytest.raises(BopError, match="does not exist"):
        BopDataset(tmp_path / "nowhere")


def test_results_file_round_trip_and_bad_header(tmp_path):
    from rnnpose_ros.data.bop import BopEstimate

    pose = np.eye(4)
    pose[:3, 3] = [0.1, -0.02, 0.5]
    path = tmp_path / "r.csv"
    write_results(path, [BopEstimate(3, 7, 1, 0.5, pose, 0.25)])
    (row,) = read_results(path)
    assert (row.scene_id, row.im_id, row.obj_id, row.score, row.time) == (3, 7, 1, 0.5, 0.25)
    np.testing.assert_allclose(row.pose, pose, atol=1e-15)
    path.write_text("a,b\n1,2\n")
    with pytest.raises(BopError, match="expected the header"):
        read_results(path)


def test_registry_uses_bop_class_ids(written):
    root, _, _ = written
    registry = BopDataset(root).registry()
    assert isinstance(registry, ObjectRegistry) and registry.class_ids == ["obj_000001"]
