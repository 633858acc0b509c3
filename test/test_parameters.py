"""The parameter tables: settings fields, the shipped ``config/refine.yaml`` and the README's table agree
with :data:`~rnnpose_ros.ros.parameters.PARAMETERS`; the ``backend`` row and its ``auto`` rule come
from the backend registry; value checks name the parameter (no node: declaration is in test_node)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

pytest.importorskip("rclpy")

from rnnpose_ros.core.backends import BACKENDS, backend_help
from rnnpose_ros.package_files import default_objects_file
from rnnpose_ros.ros import scene_player
from rnnpose_ros.ros.parameters import (
    AUTO_BACKEND_RULE,
    PARAMETERS,
    ParameterError,
    Settings,
    resolve_backend,
    validate_parameter,
)

from conftest import REPO_ROOT

SPECS = {spec.name: spec for spec in PARAMETERS}
README_TYPES = {"string": str, "int": int, "double": float, "bool": bool}


def typed_defaults(values: dict[str, Any]) -> dict[str, tuple[type, Any]]:
    """name -> (type, value): ``0`` and ``0.0`` differ for ROS, so the type is compared too."""
    return {name: (type(value), value) for name, value in values.items()}


def readme_parameter_rows() -> dict[str, list[str]]:
    """The README's parameter table: name -> cells [type, default, range, runtime] (backticks kept)."""
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Parameter | Type | Default |"))
    rows = {}
    for line in lines[start + 2 :]:  # after the header and its separator
        if not line.startswith("|"):
            break
        name, *cells = (cell.strip() for cell in line.split("|")[1:6])  # the last column may hold "|"
        rows[name.strip("`")] = cells
    return rows


def test_settings_have_one_field_per_row() -> None:
    assert [f.name for f in dataclasses.fields(Settings)] == [spec.name for spec in PARAMETERS]
    assert [f.name for f in dataclasses.fields(scene_player.PlayerSettings)] == [
        spec.name for spec in scene_player.PARAMETERS
    ]


def test_refine_yaml_lists_every_parameter_with_its_default() -> None:
    document = yaml.safe_load((REPO_ROOT / "config" / "refine.yaml").read_text())
    values = document["/**"]["ros__parameters"]
    assert typed_defaults(values) == typed_defaults({spec.name: spec.default for spec in PARAMETERS})


def test_readme_table_lists_every_parameter_with_its_type_default_and_runtime_flag() -> None:
    rows = readme_parameter_rows()
    assert set(rows) == set(SPECS)
    for name, (kind, default, _range, runtime) in rows.items():
        spec = SPECS[name]
        assert README_TYPES[kind] is type(spec.default), name
        value = yaml.safe_load(default.strip("`"))
        assert (type(value), value) == (type(spec.default), spec.default), name
        assert (runtime == "yes") == spec.dynamic, name


def test_backend_row_and_auto_rule_come_from_the_registry() -> None:
    backend = SPECS["backend"]
    assert backend.choices == ("auto", *BACKENDS)
    assert AUTO_BACKEND_RULE in backend.description and backend_help() in backend.description
    weighted = [info.name for info in BACKENDS.values() if info.needs_weights]
    plain = [info.name for info in BACKENDS.values() if not info.needs_weights]
    rule = f"auto = {weighted[0]} when every registered object has a weights file, else {plain[0]}"
    assert rule == AUTO_BACKEND_RULE


@pytest.mark.parametrize(
    ("weights", "expected"),
    [(["a.pth", "b.pth"], "rnnpose"), (["a.pth", None], "classical"), ([], "classical")],
)
def test_auto_backend_needs_weights_for_every_object(weights: list[str | None], expected: str) -> None:
    registry = [SimpleNamespace(weights=None if w is None else Path(w)) for w in weights]
    assert resolve_backend("auto", registry) == expected
    assert BACKENDS[expected].needs_weights == bool(weights and all(weights))
    assert resolve_backend("classical", registry) == "classical"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("device", "gpu", "parameter 'device' = 'gpu' is not one of: auto, cuda, cpu"),
        ("sync_slop", math.nan, "parameter 'sync_slop' must be finite, got nan"),
        ("queue_size", 0, "parameter 'queue_size' = 0 is outside [1, 1000]"),
        ("tf_prefix", "a b", "parameter 'tf_prefix' = 'a b': TF frame ids may not start with '/'"),
        ("expected_frame_id", "/cam", "parameter 'expected_frame_id' = '/cam': TF frame ids"),
        ("objects_file", "/nonexistent.yaml", "parameter 'objects_file': /nonexistent.yaml does not exist"),
    ],
)
def test_invalid_values_name_the_parameter(name: str, value: Any, message: str) -> None:
    with pytest.raises(ParameterError) as raised:
        validate_parameter(SPECS[name], value)
    assert str(raised.value).startswith(message)


def test_checks_may_convert_the_value() -> None:
    assert validate_parameter(SPECS["objects_file"], "") == default_objects_file().resolve()
    assert validate_parameter(SPECS["tf_prefix"], "obj_") == "obj_"
    sigma = {spec.name: spec for spec in scene_player.PARAMETERS}["trans_sigma"]
    assert validate_parameter(sigma, [0, 0, 1]) == [0.0, 0.0, 1.0]
