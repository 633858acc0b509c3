"""The shipped rviz configuration follows the node's namespace (relative topics, made absolute by the
launch file's copy)."""

from __future__ import annotations

import re

import yaml

from rnnpose_ros.rviz_config import namespaced_rviz_config, write_namespaced_rviz_config

from conftest import REPO_ROOT

SHIPPED = REPO_ROOT / "config" / "rnnpose.rviz"


def _topics(text: str) -> list[str]:
    displays = yaml.safe_load(text)["Visualization Manager"]["Displays"]
    return [d["Topic"]["Value"] for d in displays if "Topic" in d]


def test_shipped_topics_are_relative_to_the_namespace() -> None:
    topics = _topics(SHIPPED.read_text())
    assert topics == ["rnnpose_refiner/markers", "rnnpose_refiner/debug_image"]


def test_namespaced_copy_names_the_namespaced_node(tmp_path) -> None:
    text = SHIPPED.read_text()
    assert _topics(namespaced_rviz_config(text, "/robot1")) == [
        "/robot1/rnnpose_refiner/markers",
        "/robot1/rnnpose_refiner/debug_image",
    ]
    assert _topics(namespaced_rviz_config(text, "arm/left/")) == [
        "/arm/left/rnnpose_refiner/markers",
        "/arm/left/rnnpose_refiner/debug_image",
    ]
    assert _topics(namespaced_rviz_config(text, "")) == [
        "/rnnpose_refiner/markers",
        "/rnnpose_refiner/debug_image",
    ]
    # nothing else changes, and an absolute topic of a user's configuration is kept
    assert (
        re.sub(r"/robot1/rnnpose_refiner/", "rnnpose_refiner/", namespaced_rviz_config(text, "robot1"))
        == text
    )
    mine = "Topic:\n  Value: /camera/image_raw\n"
    assert namespaced_rviz_config(mine, "robot1") == mine
    written = write_namespaced_rviz_config(SHIPPED, "robot1")
    assert written.name == "rnnpose.rviz" and written.read_text() == namespaced_rviz_config(text, "robot1")
