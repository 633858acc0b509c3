"""The iteration GIF: one frame per inner step, contours and weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from rnnpose_ros.core.backends.classical import ClassicalBackend
from rnnpose_ros.core.objects import pybullet_mesh_available
from rnnpose_ros.core.refiner import Instance, Refiner
from rnnpose_ros.core.synth import make_scene
from rnnpose_ros.tools.trace_gif import InstanceRecorder, record_trace_gif, weight_panel

pytestmark = pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")


def test_weight_panel_maps_weights_to_colours() -> None:
    weight = np.zeros((40, 60))
    weight[:, 30:] = 1.0
    panel = weight_panel(weight, 80)
    assert panel.shape == (80, 120, 3) and panel.dtype == np.uint8
    assert panel[:, :60].max() < panel[:, 60:].max()


def test_gif_has_one_frame_per_step(tmp_path: Path, renderer, duck_registry) -> None:
    loop = replace(ClassicalBackend.default_loop(), outer_iterations=2, inner_steps=2)
    refiner = Refiner(duck_registry, config=loop, renderer=renderer)
    scene = make_scene([duck_registry["duck"]], 3, renderer)
    first = scene.instances[0]
    path = tmp_path / "trace.gif"
    result = record_trace_gif(path, refiner, renderer, scene.observation, Instance("duck", first.pose_init))
    frames = imageio.mimread(path)
    assert len(frames) == len(result.trace) == 4
    assert frames[0].shape[1] <= 800
    # The last recorded pose is the result's pose.
    recorder = InstanceRecorder(0)
    again = refiner.refine(scene.observation, [Instance("duck", first.pose_init)], observer=recorder)[0]
    np.testing.assert_allclose(recorder.poses[-1], again.pose, atol=1e-9)
    assert len(recorder.weights) == 4 and recorder.weights[0].ndim == 2
