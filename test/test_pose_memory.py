"""The node's memory of its last published poses (references for symmetric objects), and a node with the
real engine keeping a symmetric object's TF orientation steady while the detector flips it."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy.spatial.transform import Rotation

from rnnpose_ros.ros.pose_memory import PoseMemory

from conftest import BOX_TURNS, symmetric_box_mesh

SECOND = 1_000_000_000


def _pose(angle: float) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec((0.0, 0.0, angle)).as_matrix()
    return T


def test_references_are_the_last_poses_within_max_age() -> None:
    memory = PoseMemory(max_age_s=1.0)
    memory.update(10 * SECOND, [("box_0", _pose(0.1)), ("box_1", _pose(0.2))])
    memory.update(10 * SECOND + SECOND // 2, [("box_0", _pose(0.3))])
    references = memory.references(11 * SECOND)
    np.testing.assert_allclose(references["box_0"], _pose(0.3))
    np.testing.assert_allclose(references["box_1"], _pose(0.2))
    # box_1 was last seen 1.2 s before this frame: the detector's pose is the reference again
    assert set(memory.references(11 * SECOND + SECOND // 5)) == {"box_0"}
    # a frame with the stamp of the remembered one (a repeated frame) has no reference from itself
    assert memory.references(10 * SECOND + SECOND // 2) == {"box_1": references["box_1"]}


def test_time_going_backwards_forgets_everything() -> None:
    memory = PoseMemory()
    memory.update(50 * SECOND, [("box_0", _pose(0.1))])
    memory.update(3 * SECOND, [("box_1", _pose(0.2))])  # a bag played again from its start
    assert set(memory.references(4 * SECOND)) == {"box_1"}


def test_remembered_poses_are_copies() -> None:
    memory = PoseMemory()
    pose = _pose(0.1)
    memory.update(SECOND, [("box_0", pose)])
    pose[0, 3] = 5.0
    assert memory.references(2 * SECOND)["box_0"][0, 3] == 0.0


def test_node_keeps_a_symmetric_objects_tf_steady(context: Any, tmp_path: Path, renderer: Any) -> None:
    """The real node (classical engine, 1 × 1 steps) on a box whose detector returns a random one of
    its four equivalent orientations every frame: the published TF never turns by the 180° of a flip."""
    pytest.importorskip("rclpy")
    pytest.importorskip("vision_msgs")
    from test_node import SIZE, Harness, K, inputs, make_node

    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.render import Lighting
    from rnnpose_ros.core.synth import perturb_pose, random_background, rotation_angle_deg
    from rnnpose_ros.ros.conversions import quaternion_to_matrix

    symmetric_box_mesh().export(tmp_path / "box.ply")
    objects = tmp_path / "objects.yaml"
    objects.write_text(
        yaml.safe_dump({"objects": {"box": {"mesh": "box.ply", "symmetries_discrete": BOX_TURNS}}})
    )
    model = ObjectRegistry.from_yaml(objects)["box"]
    group = [np.eye(4), *model.symmetries.discrete]
    node = make_node(
        context,
        engine="real",
        device="cpu",
        objects_file=str(objects),
        outer_iterations=1,
        inner_iterations=1,
        restart_below_score=0.0,
        score_threshold=0.0,
    )
    harness = Harness(context, node)
    rng = np.random.default_rng(3)
    truth = np.eye(4)
    truth[:3, :3], truth[:3, 3] = Rotation.from_rotvec((0.4, -0.6, 0.3)).as_matrix(), (0.0, 0.0, 0.5)
    spin = Rotation.from_rotvec(np.radians(4.0) * np.array([0.3, 1.0, 0.2]) / math.hypot(0.3, 1.0, 0.2))
    detected, published = [], []
    try:
        for _ in range(6):
            truth[:3, :3] = spin.as_matrix() @ truth[:3, :3]  # the box turns 4° per frame
            background, _ = random_background(rng, SIZE, ("coffee", "chelsea"))
            out = renderer.render(
                [model], truth, K, SIZE, lighting=Lighting(light_position=(0.3, -0.3, -0.5))
            )
            image = background.copy()
            image[out.mask[0]] = np.round(out.rgb[0][out.mask[0]] * 255).astype(np.uint8)
            flip = group[int(rng.integers(len(group)))]
            detection = perturb_pose(truth @ flip, rng, 3.0, (0.003, 0.003, 0.005), 6.0)
            before = len(harness.tf)
            harness.send(*inputs([("box", detection, "")], image=image))
            harness.spin_until(lambda before=before: len(harness.tf) > before)
            (transform,) = harness.tf[-1].transforms
            q = transform.transform.rotation
            detected.append(detection[:3, :3])
            published.append(quaternion_to_matrix(q.x, q.y, q.z, q.w))
    finally:
        harness.close()
    detector_steps = [rotation_angle_deg(a.T @ b) for a, b in itertools.pairwise(detected)]
    tf_steps = [rotation_angle_deg(a.T @ b) for a, b in itertools.pairwise(published)]
    print(f"detector steps {np.round(detector_steps, 1)}; TF steps {np.round(tf_steps, 1)} (deg)")
    assert max(detector_steps) > 150.0  # the detector did flip between frames
    assert max(tf_steps) < 45.0  # 4° per frame plus refinement noise; a flip would be 180°
