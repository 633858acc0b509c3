"""In-process node test with real rclpy: weights written by the trainer load in the node
(``backend: rnnpose``) and refine a synthetic frame."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy")

from test_node import SIZE, Harness, K, inputs, make_node

from rnnpose_ros.core.objects import ObjectRegistry, pybullet_mesh_available
from rnnpose_ros.ros.conversions import pose_to_matrix

REFINE_TIMEOUT_S = 300.0

pytestmark = pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")


def test_trainer_weights_refine_in_the_node(context: Any, tmp_path: Path) -> None:
    from rnnpose_ros.core import synth
    from rnnpose_ros.core.render import Renderer
    from rnnpose_ros.training.trainer import TrainConfig, Trainer

    duck_entry = {"mesh": "pkg://pybullet_data/duck.obj", "scale": 0.1, "symmetric": False}
    registry = ObjectRegistry.from_mapping({"duck": duck_entry}, tmp_path)
    renderer = Renderer()
    trainer = Trainer(
        TrainConfig(steps=1), tmp_path / "run", [registry["duck"]], None, renderer, progress=False
    )
    weights = tmp_path / "run" / "weights" / "duck.pt"
    assert weights in trainer.export_weights()
    objects = tmp_path / "objects.yaml"
    objects.write_text(yaml.safe_dump({"objects": {"duck": {**duck_entry, "weights": str(weights)}}}))
    node = make_node(
        context,
        engine="real",
        objects_file=str(objects),
        backend="rnnpose",
        device="cpu",
        outer_iterations=1,
        inner_iterations=1,
        restart_below_score=0.0,
    )
    harness = Harness(context, node)
    try:
        assert harness.node.settings.backend == "rnnpose"
        scene = synth.make_scene([registry["duck"]], 7, renderer, synth.SceneSpec(size=SIZE, K=K))
        image, info, detections = inputs([("duck", scene.instances[0].pose_init, "")], image=scene.image)
        harness.pub_image.publish(image)
        harness.pub_info.publish(info)
        harness.pub_detections.publish(detections)
        # The published crop sizes on the CPU: slower than the classical engine the harness times.
        harness.spin_until(lambda: len(harness.outputs) > 0, timeout=REFINE_TIMEOUT_S)
        (detection,) = harness.outputs[-1].detections
        assert 0.0 <= detection.results[0].hypothesis.score <= 1.0
        assert np.isfinite(pose_to_matrix(detection.results[0].pose.pose)[0]).all()
    finally:
        harness.close()
