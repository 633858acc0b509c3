"""Resource URIs of ``objects.yaml``: ``package://`` (ament index), ``file://``, ``pkg://``, plain paths;
unknown schemes refused (the node exits 2 naming it); the URI markers give rviz for a mesh."""

from __future__ import annotations

import filecmp
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from rnnpose_ros.core.objects import ObjectModelError, ObjectRegistry, pybullet_mesh_available
from rnnpose_ros.core.uris import UriError, display_uri, resolve_uri, uri_scheme

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ament_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An install prefix holding ROS package ``toy_objects`` (ament index marker + share/meshes/box.ply,
    a 10 cm cube), put first on AMENT_PREFIX_PATH."""
    prefix = tmp_path / "install"
    marker = prefix / "share" / "ament_index" / "resource_index" / "packages" / "toy_objects"
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    meshes = prefix / "share" / "toy_objects" / "meshes"
    meshes.mkdir(parents=True)
    trimesh.creation.box(extents=(0.1, 0.1, 0.1)).export(meshes / "box.ply")
    monkeypatch.setenv("AMENT_PREFIX_PATH", f"{prefix}:{sys.prefix}")
    display_uri.cache_clear()
    yield prefix
    display_uri.cache_clear()


def test_package_uri_resolves_through_the_ament_index(ament_prefix: Path, tmp_path: Path) -> None:
    mesh = ament_prefix / "share" / "toy_objects" / "meshes" / "box.ply"
    assert resolve_uri("package://toy_objects/meshes/box.ply", tmp_path) == mesh.resolve()
    assert display_uri(mesh) == "package://toy_objects/meshes/box.ply"
    yaml = tmp_path / "objects.yaml"
    yaml.write_text("objects:\n  box: {mesh: package://toy_objects/meshes/box.ply}\n")
    model = ObjectRegistry.from_yaml(yaml)["box"]
    assert model.mesh_path == mesh.resolve() and model.diameter == pytest.approx(0.1 * np.sqrt(3))
    with pytest.raises(UriError, match="'no_such_pkg' is not in the ament index"):
        resolve_uri("package://no_such_pkg/meshes/box.ply", tmp_path)
    with pytest.raises(UriError, match="package://<ros package>/<path"):
        resolve_uri("package://toy_objects", tmp_path)


def test_symlinked_share_keeps_the_package_uri(ament_prefix: Path, tmp_path: Path) -> None:
    """``colcon build --symlink-install``: the share file is a link into the source tree."""
    source = tmp_path / "src" / "toy_objects" / "meshes" / "can.ply"
    source.parent.mkdir(parents=True)
    trimesh.creation.cylinder(radius=0.03, height=0.1).export(source)
    link = ament_prefix / "share" / "toy_objects" / "meshes" / "can.ply"
    link.symlink_to(source)
    yaml = tmp_path / "objects.yaml"
    yaml.write_text("objects:\n  can: {mesh: package://toy_objects/meshes/can.ply}\n")
    model = ObjectRegistry.from_yaml(yaml)["can"]
    assert model.mesh_path == link
    assert display_uri(model.mesh_path) == "package://toy_objects/meshes/can.ply"


def test_own_package_uri_is_this_source_tree_and_the_shipped_duck_is_pybullets() -> None:
    path = resolve_uri("package://rnnpose_ros/meshes/duck.obj", Path("/"))
    assert path == REPO / "meshes" / "duck.obj" and path.is_file()
    assert display_uri(path) == "package://rnnpose_ros/meshes/duck.obj"
    if not pybullet_mesh_available():
        pytest.skip("pybullet_data not installed: the copy cannot be compared with its source")
    import pybullet_data

    source = Path(pybullet_data.getDataPath())
    for name in ("duck.obj", "duck.mtl", "duckCM.png"):  # same bytes => every duck figure still holds
        assert filecmp.cmp(REPO / "meshes" / name, source / name, shallow=False), name


def test_file_uri_and_plain_paths(tmp_path: Path) -> None:
    folder = tmp_path / "my meshes"
    folder.mkdir()
    mesh = folder / "box.ply"
    trimesh.creation.box(extents=(0.05, 0.05, 0.05)).export(mesh)
    assert resolve_uri(mesh.as_uri(), Path("/")) == mesh  # percent-escaped space decoded
    assert resolve_uri("file://localhost" + mesh.as_uri()[len("file://") :], Path("/")) == mesh
    assert resolve_uri("my meshes/box.ply", tmp_path) == mesh
    assert resolve_uri(str(mesh), Path("/")) == mesh
    # a file outside every ROS package is shown to rviz by its file URI
    assert display_uri(mesh) == mesh.as_uri()
    with pytest.raises(UriError, match="another host"):
        resolve_uri("file://robot/meshes/box.ply", Path("/"))
    yaml = tmp_path / "objects.yaml"
    yaml.write_text(f"objects:\n  box: {{mesh: '{mesh.as_uri()}'}}\n")
    assert ObjectRegistry.from_yaml(yaml)["box"].mesh_path == mesh


@pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")
def test_pkg_uri_finds_a_python_package() -> None:
    import pybullet_data

    path = resolve_uri("pkg://pybullet_data/duck.obj", Path("/"))
    assert path == (Path(pybullet_data.getDataPath()) / "duck.obj").resolve()
    with pytest.raises(UriError, match="Python package 'no_such_python_pkg' is not installed"):
        resolve_uri("pkg://no_such_python_pkg/duck.obj", Path("/"))


@pytest.mark.parametrize("spec", ["http://example.com/duck.obj", "s3://bucket/duck.obj", "PACKAGES://x/y"])
def test_unknown_scheme_is_an_error_naming_it(spec: str, tmp_path: Path) -> None:
    scheme = uri_scheme(spec)
    with pytest.raises(UriError, match=f"unknown URI scheme '{scheme}://'"):
        resolve_uri(spec, tmp_path)
    yaml = tmp_path / "objects.yaml"
    yaml.write_text(f"objects:\n  duck: {{mesh: '{spec}'}}\n")
    with pytest.raises(ObjectModelError, match=rf"objects\.duck\.mesh: .*unknown URI scheme '{scheme}://'"):
        ObjectRegistry.from_yaml(yaml)


def test_node_exits_2_naming_an_unknown_scheme(tmp_path: Path) -> None:
    pytest.importorskip("rclpy")
    from node_harness import run_node

    yaml = tmp_path / "objects.yaml"
    yaml.write_text("objects:\n  duck: {mesh: 'ftp://server/duck.obj', scale: 0.1}\n")
    code, output = run_node("-p", f"objects_file:={yaml}")
    fatal = [line for line in output.splitlines() if "FATAL" in line]
    assert code == 2, output
    assert len(fatal) == 1 and "unknown URI scheme 'ftp://'" in fatal[0] and "objects_file" in fatal[0]
