"""ObjectModel / ObjectRegistry: schema errors, path resolution, units, real pybullet meshes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import trimesh

from rnnpose_ros.core.objects import (
    MIN_DIAMETER_M,
    PYBULLET_TEXTURED_MESHES,
    ObjectModel,
    ObjectModelError,
    ObjectRegistry,
    UnknownObjectError,
    load_pybullet_object,
    mesh_diameter,
    resolve_mesh_path,
)

REPO = Path(__file__).resolve().parents[1]
needs_pybullet = pytest.mark.skipif(
    importlib.util.find_spec("pybullet_data") is None, reason="pybullet_data (pybullet wheel) not installed"
)


def write_box(path: Path, extents=(0.1, 0.06, 0.04)) -> Path:
    trimesh.creation.box(extents=extents).export(path)
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_box_model_properties(tmp_path):
    mesh = write_box(tmp_path / "box.ply")
    model = ObjectModel.from_file(mesh, "box", scale=1.0)
    assert model.vertices.dtype == np.float32 and model.faces.dtype == np.int64
    assert model.diameter == pytest.approx(np.linalg.norm([0.1, 0.06, 0.04]), rel=1e-6)
    np.testing.assert_allclose(model.extents, [0.1, 0.06, 0.04], atol=1e-7)
    np.testing.assert_allclose(model.center, 0, atol=1e-7)
    assert len(model.eval_points) == 8


def test_scale_applies_and_relative_path(tmp_path):
    write_box(tmp_path / "box_mm.ply", extents=(100.0, 60.0, 40.0))
    cfg = write_yaml(tmp_path / "objects.yaml", "objects:\n  box:\n    mesh: box_mm.ply\n    scale: 0.001\n")
    reg = ObjectRegistry.from_yaml(cfg)
    assert reg.class_ids == ["box"] and len(reg) == 1 and "box" in reg
    assert reg["box"].diameter == pytest.approx(np.linalg.norm([0.1, 0.06, 0.04]), rel=1e-6)
    assert [m.class_id for m in reg] == ["box"]
    assert reg["box"].symmetric is False and reg["box"].weights is None


def test_unknown_class(tmp_path):
    write_box(tmp_path / "box.ply")
    reg = ObjectRegistry.from_yaml(write_yaml(tmp_path / "o.yaml", "objects:\n  box: {mesh: box.ply}\n"))
    with pytest.raises(UnknownObjectError, match=r"'mug'.*box"):
        reg["mug"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("objects: [\n", "invalid YAML"),
        ("things: {}\n", "'objects'"),
        ("objects: {}\n", "non-empty"),
        ("objects:\n  box: {mesh: box.ply, colour: red}\n", "unknown key.*colour"),
        ("objects:\n  box: {scale: 1.0}\n", r"objects\.box\.mesh"),
        ("objects:\n  box: {mesh: box.ply, scale: -1}\n", r"objects\.box\.scale"),
        ("objects:\n  box: {mesh: box.ply, scale: abc}\n", r"objects\.box\.scale"),
        ("objects:\n  box: {mesh: box.ply, symmetric: maybe}\n", r"objects\.box\.symmetric"),
        ("objects:\n  box: {mesh: box.ply, weights: 3}\n", r"objects\.box\.weights"),
        ("objects:\n  box: box.ply\n", "expected a mapping"),
        ("objects:\n  box: {mesh: missing.obj}\n", "not found"),
        ("objects:\n  box: {mesh: pkg://no_such_package_xyz/a.obj}\n", "not installed"),
        ("objects:\n  box: {mesh: box.ply, scale: 400}\n", "implausible.*scale: 1"),
    ],
)
def test_schema_errors(tmp_path, text, match):
    write_box(tmp_path / "box.ply")
    with pytest.raises(ObjectModelError, match=match):
        ObjectRegistry.from_yaml(write_yaml(tmp_path / "objects.yaml", text))


def test_missing_registry_file(tmp_path):
    with pytest.raises(ObjectModelError, match="not found"):
        ObjectRegistry.from_yaml(tmp_path / "nope.yaml")


def test_mesh_errors(tmp_path):
    (tmp_path / "garbage.ply").write_bytes(b"ply\nformat nonsense\n\x00\x01")
    with pytest.raises(ObjectModelError, match=r"cannot read mesh|no triangle mesh|empty"):
        ObjectModel.from_file(tmp_path / "garbage.ply")
    (tmp_path / "empty.obj").write_text("# nothing\n")
    with pytest.raises(ObjectModelError, match=r"empty|no triangle mesh|no faces"):
        ObjectModel.from_file(tmp_path / "empty.obj")
    (tmp_path / "points.obj").write_text("v 0 0 0\nv 0.1 0 0\nv 0 0.1 0\n")
    with pytest.raises(ObjectModelError, match=r"no faces|no triangle mesh"):
        ObjectModel.from_file(tmp_path / "points.obj")


def test_non_utf8_registry_is_a_clear_error(tmp_path):
    path = tmp_path / "objects.yaml"
    path.write_bytes(b"objects:\n  box: {mesh: caf\xe9.ply}\n")
    with pytest.raises(ObjectModelError, match=r"not UTF-8 text \(byte 0xe9"):
        ObjectRegistry.from_yaml(path)


def test_obj_with_a_latin1_byte_loads(tmp_path):
    write_box(tmp_path / "box.obj")
    text = (tmp_path / "box.obj").read_bytes()
    (tmp_path / "latin1.obj").write_bytes(b"# bo\xeete en carton\n" + text)
    plain, latin1 = (
        ObjectModel.from_file(tmp_path / "box.obj"),
        ObjectModel.from_file(tmp_path / "latin1.obj"),
    )
    np.testing.assert_array_equal(plain.vertices, latin1.vertices)


@pytest.mark.parametrize("suffix", [".stl", ".obj", ".ply"])
def test_random_bytes_mesh_names_the_reason(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(ObjectModelError) as error:
        ObjectModel.from_file(path)
    assert "module" not in str(error.value)  # not trimesh's missing optional dependency


def test_implausible_units_suggest_scale(tmp_path):
    write_box(tmp_path / "mug_mm.ply", extents=(80.0, 80.0, 100.0))  # a mug in millimetres
    with pytest.raises(ObjectModelError, match=r"millimetres, use scale: 0\.001"):
        ObjectModel.from_file(tmp_path / "mug_mm.ply")
    write_box(tmp_path / "tiny.ply", extents=(1e-4, 1e-4, 1e-4))
    with pytest.raises(ObjectModelError, match="implausible"):
        ObjectModel.from_file(tmp_path / "tiny.ply")


def test_unreadable_texture(tmp_path):
    box = trimesh.creation.box(extents=(0.1, 0.1, 0.1))
    (tmp_path / "t.obj").write_text(
        "mtllib t.mtl\nusemtl m\n"
        + "".join(f"v {x} {y} {z}\n" for x, y, z in box.vertices)
        + "vt 0 0\nvt 1 0\nvt 0 1\n"
        + "".join(f"f {a + 1}/1 {b + 1}/2 {c + 1}/3\n" for a, b, c in box.faces)
    )
    (tmp_path / "t.mtl").write_text("newmtl m\nKd 1 1 1\nmap_Kd missing_texture.png\n")
    with pytest.raises(ObjectModelError, match=r"missing_texture.png"):
        ObjectModel.from_file(tmp_path / "t.obj")
    (tmp_path / "missing_texture.png").write_bytes(b"not a png")
    with pytest.raises(ObjectModelError, match=r"missing_texture.png"):
        ObjectModel.from_file(tmp_path / "t.obj")


def test_vertex_coloured_ply(tmp_path):
    mesh = trimesh.creation.icosphere(subdivisions=1, radius=0.05)
    mesh.visual.vertex_colors = np.tile([200, 10, 30, 255], (len(mesh.vertices), 1)).astype(np.uint8)
    mesh.export(tmp_path / "s.ply")
    model = ObjectModel.from_file(tmp_path / "s.ply")
    assert model.vertex_colors is not None and model.vertex_colors.shape == (len(model.vertices), 3)
    np.testing.assert_array_equal(model.vertex_colors[0], [200, 10, 30])
    assert model.texture is None


def test_from_arrays_validates():
    box = trimesh.creation.box(extents=(0.1, 0.1, 0.1))
    model = ObjectModel.from_arrays("b", box.vertices, box.faces)
    assert model.diameter == pytest.approx(np.sqrt(0.03)) and model.mesh_path == Path()
    with pytest.raises(ObjectModelError, match="face indices"):
        ObjectModel.from_arrays("b", box.vertices, box.faces + 100)
    with pytest.raises(ObjectModelError, match="faces must be"):
        ObjectModel.from_arrays("b", box.vertices, np.zeros((0, 3)))
    with pytest.raises(ObjectModelError, match="uvs"):
        ObjectModel.from_arrays("b", box.vertices, box.faces, uvs=np.zeros((3, 2)))


def test_diameter_exact():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(300, 3))
    brute = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1).max())
    assert mesh_diameter(pts) == pytest.approx(brute, rel=1e-12)


@needs_pybullet
def test_pkg_resolution():
    import pybullet_data

    path = resolve_mesh_path("pkg://pybullet_data/duck.obj", Path("/"))
    assert path == (Path(pybullet_data.getDataPath()) / "duck.obj").resolve() and path.is_file()
    with pytest.raises(ObjectModelError, match="pkg://"):
        resolve_mesh_path("pkg://pybullet_data", Path("/"))


@needs_pybullet
def test_shipped_registry_duck():
    reg = ObjectRegistry.from_yaml(REPO / "config" / "objects.yaml")
    duck = reg["duck"]
    assert 0.18 < duck.diameter < 0.21  # the environment recipe's 19 cm duck (scale 0.1)
    assert duck.texture is not None and duck.texture.dtype == np.uint8 and duck.texture.ndim == 3
    assert duck.uvs is not None and duck.uvs.shape == (len(duck.vertices), 2)
    assert duck.faces.max() < len(duck.vertices)
    assert 0 < len(duck.eval_points) <= 2000
    # deterministic evaluation sample
    again = ObjectModel.from_file(duck.mesh_path, "duck", duck.mesh_scale)
    np.testing.assert_array_equal(again.eval_points, duck.eval_points)


@needs_pybullet
def test_texture_outside_mesh_folder():
    torus = load_pybullet_object("torus")  # its MTL names ../cube.png
    assert torus.texture is not None


@needs_pybullet
@pytest.mark.parametrize("name", sorted(PYBULLET_TEXTURED_MESHES))
def test_listed_pybullet_meshes_are_textured(name):
    model = load_pybullet_object(name)
    assert model.texture is not None and model.uvs is not None
    assert MIN_DIAMETER_M <= model.diameter <= 0.6


def test_registry_with_and_without_an_object_leave_the_original_unchanged(tmp_path):
    write_box(tmp_path / "box.ply")
    write_box(tmp_path / "box_mm.ply", extents=(100.0, 60.0, 40.0))
    reg = ObjectRegistry.from_yaml(
        write_yaml(tmp_path / "objects.yaml", "objects:\n  box:\n    mesh: box.ply\n")
    )
    bigger = reg.with_object("crate", {"mesh": "box_mm.ply", "scale": 0.002}, tmp_path)
    assert bigger.class_ids == ["box", "crate"] and reg.class_ids == ["box"]
    assert bigger["box"] is reg["box"] and bigger.source == reg.source
    assert bigger["crate"].diameter == pytest.approx(2 * reg["box"].diameter, rel=1e-6)
    replaced = bigger.with_object("box", {"mesh": "box_mm.ply", "scale": 0.001}, tmp_path)
    assert replaced["box"] is not reg["box"] and replaced.class_ids == ["box", "crate"]
    assert bigger.without("box").class_ids == ["crate"] and bigger.class_ids == ["box", "crate"]
    with pytest.raises(UnknownObjectError, match=r"'cat'.*registered: box, crate"):
        bigger.without("cat")


@pytest.mark.parametrize(
    ("class_id", "entry", "match"),
    [
        ("", {"mesh": "box.ply"}, "class id must be a non-empty string"),
        ("crate", {"mesh": "box.ply", "scale": -1}, r"object 'crate'\.scale: must be a positive number"),
        ("crate", {"mesh": "missing.ply"}, "missing.ply"),
        ("crate", {"mesh": "box.ply", "colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ],
)
def test_an_added_object_is_checked_like_the_yaml(tmp_path, class_id, entry, match):
    write_box(tmp_path / "box.ply")
    reg = ObjectRegistry.from_yaml(
        write_yaml(tmp_path / "objects.yaml", "objects:\n  box:\n    mesh: box.ply\n")
    )
    with pytest.raises(ObjectModelError, match=match):
        reg.with_object(class_id, entry, tmp_path)
