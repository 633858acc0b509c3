"""Symmetric objects: declarations (BOP models_info style), the choice among equivalent poses, the
symmetry-aware metrics, and a refined sequence whose orientation never jumps by a symmetry."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trimesh
import yaml
from scipy.spatial.transform import Rotation

from rnnpose_ros.core import metrics
from rnnpose_ros.core.backends.classical import ClassicalBackend, ClassicalConfig, CropStage
from rnnpose_ros.core.objects import ObjectModel, ObjectModelError, ObjectRegistry
from rnnpose_ros.core.observation import Observation
from rnnpose_ros.core.refiner import Instance, Refiner, RefineStatus
from rnnpose_ros.core.render import Lighting
from rnnpose_ros.core.symmetry import Symmetries, axis_angle_matrix, closest_equivalent
from rnnpose_ros.core.synth import perturb_pose, random_background, rotation_angle_deg

from conftest import BOX_TURNS, symmetric_box_mesh


def _box_model(**kwargs) -> ObjectModel:
    mesh = symmetric_box_mesh()
    symmetries = Symmetries.from_entry({"symmetries_discrete": BOX_TURNS}, 1.0, "box")
    return ObjectModel.from_arrays(
        "box",
        mesh.vertices,
        mesh.faces,
        vertex_colors=mesh.visual.vertex_colors[:, :3],
        symmetries=symmetries,
    )


def _pose(rotvec=(0.3, -0.5, 0.2), t=(0.02, -0.01, 0.45)) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = Rotation.from_rotvec(rotvec).as_matrix(), t
    return T


def _angle(R_a: np.ndarray, R_b: np.ndarray) -> float:
    return rotation_angle_deg(R_a.T @ R_b)


# ---------------------------------------------------------------- declarations


def test_yaml_declarations_in_file_units(tmp_path: Path) -> None:
    # a box in millimetres whose centre is at z = 30 mm: the turn about x moves it by 60 mm (file units)
    symmetric_box_mesh(1000.0, offset=(0, 0, 30)).export(tmp_path / "box.ply")
    turn_x_about_centre = list(BOX_TURNS[0])
    turn_x_about_centre[11] = 60.0
    (tmp_path / "objects.yaml").write_text(
        "objects:\n  box:\n    mesh: box.ply\n    scale: 0.001\n"
        f"    symmetries_discrete: [{turn_x_about_centre}]\n"
        "    symmetries_continuous: []\n"
    )
    model = ObjectRegistry.from_yaml(tmp_path / "objects.yaml")["box"]
    assert model.symmetric and len(model.symmetries.discrete) == 1
    np.testing.assert_allclose(model.symmetries.discrete[0][:3, 3], (0.0, 0.0, 0.06))
    assert len(model.symmetries.transforms()) == 2


def test_cylinder_continuous_axis_with_offset(tmp_path: Path) -> None:
    trimesh.creation.cylinder(radius=40, height=100, sections=64).apply_translation((0, 0, 50)).export(
        tmp_path / "can.ply"
    )
    (tmp_path / "objects.yaml").write_text(
        "objects:\n  can:\n    mesh: can.ply\n    scale: 0.001\n"
        "    symmetries_continuous: [{axis: [0, 0, 2], offset: [0, 0, 0]}]\n"
        "    symmetries_discrete: [[1, 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 100, 0, 0, 0, 1]]\n"
    )
    model = ObjectRegistry.from_yaml(tmp_path / "objects.yaml")["can"]
    (axis,) = model.symmetries.continuous
    np.testing.assert_allclose(axis.axis, (0, 0, 1))
    assert len(model.symmetries.transforms(samples=36)) == 2 * 36


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"symmetries_discrete": [[1, 0, 0]]}, r"symmetries_discrete\[0\]: expected 16 numbers"),
        ({"symmetries_discrete": [[2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]}, "must be a rotation"),
        ({"symmetries_discrete": [[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]}, "identity is implied"),
        ({"symmetries_discrete": [[1, 0, 0, 0, 0, -1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]}, "must be a rotation"),
        ({"symmetries_continuous": [{"axis": [0, 0, 0]}]}, r"axis: must be a non-zero vector"),
        ({"symmetries_continuous": [{"axis": [0, 0, 1], "centre": [0, 0, 0]}]}, "expected {axis"),
        ({"symmetries_continuous": "z"}, "must be a list"),
        # a box is not symmetric about a 90° turn, nor about any turn about z
        (
            {"symmetries_discrete": [[0, -1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]},
            "does not map the mesh",
        ),
        ({"symmetries_continuous": [{"axis": [0, 0, 1]}]}, r"continuous\[0\] at \d+° does not map the mesh"),
    ],
)
def test_bad_declarations_are_refused_naming_the_entry(tmp_path: Path, entry: dict, message: str) -> None:
    symmetric_box_mesh().export(tmp_path / "box.ply")
    (tmp_path / "objects.yaml").write_text(yaml.safe_dump({"objects": {"box": {"mesh": "box.ply", **entry}}}))
    with pytest.raises(ObjectModelError, match=rf"objects\.box.*{message}"):
        ObjectRegistry.from_yaml(tmp_path / "objects.yaml")


# ---------------------------------------------------------------- the choice among equivalent poses


def test_closest_equivalent_undoes_a_discrete_flip() -> None:
    model = _box_model()
    rng = np.random.default_rng(0)
    for S in model.symmetries.discrete:
        reference = _pose()
        flipped = reference @ S  # what a detector might return: the same image, the other orientation
        noisy = perturb_pose(flipped, rng, 3.0, (0.002, 0.002, 0.002), 10.0)
        chosen = closest_equivalent(noisy, reference, model.symmetries)
        assert _angle(chosen[:3, :3], reference[:3, :3]) < 12.0
        # the same object surface in the camera: the model points land where the noisy pose puts them
        np.testing.assert_allclose(
            metrics.add_s(model.eval_points, chosen, noisy), 0.0, atol=0.0025
        )  # (within half the 5 mm vertex spacing: the subdivided vertex set is not exactly symmetric)
    np.testing.assert_allclose(closest_equivalent(_pose(), _pose(), Symmetries()), _pose())


def test_closest_equivalent_about_a_continuous_axis_is_the_best_turn() -> None:
    offset = np.array([0.0, 0.0, 0.05])
    symmetries = Symmetries.from_entry(
        {"symmetries_continuous": [{"axis": [0.0, 0.0, 1.0], "offset": offset.tolist()}]}, 1.0, "can"
    )
    pose, reference = _pose(), _pose((1.1, 0.4, -0.7))
    chosen = closest_equivalent(pose, reference, symmetries)
    brute = min(
        _angle((pose @ symmetries.continuous[0].transform(a))[:3, :3], reference[:3, :3])
        for a in np.linspace(0, 2 * math.pi, 720, endpoint=False)
    )
    assert _angle(chosen[:3, :3], reference[:3, :3]) == pytest.approx(brute, abs=0.5)
    # a turn about the axis through the offset keeps the axis' points in place
    np.testing.assert_allclose(chosen @ np.append(offset, 1.0), pose @ np.append(offset, 1.0), atol=1e-12)
    np.testing.assert_allclose(chosen[:3, :3] @ (0, 0, 1), pose[:3, :3] @ (0, 0, 1), atol=1e-12)


# ---------------------------------------------------------------- metrics


def test_metrics_use_the_declared_symmetries() -> None:
    model = _box_model()
    K = np.array([[300.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0.0, 0.0, 1.0]])
    gt = _pose()
    flipped = gt @ model.symmetries.discrete[1]
    errors = metrics.pose_errors(model, flipped, gt, K)
    assert errors.add_m == pytest.approx(0.0, abs=1e-9) and errors.mssd_m == pytest.approx(0.0, abs=1e-9)
    assert errors.rotation_deg == pytest.approx(0.0, abs=1e-6) and errors.projection_px < 1e-6
    assert all(metrics.passed(errors).values())
    # without the declaration the same pose is 180° off and fails every test
    plain = replace(model, symmetries=Symmetries(), symmetric=False)
    errors = metrics.pose_errors(plain, flipped, gt, K)
    assert errors.rotation_deg == pytest.approx(180.0) and errors.mssd_m > 0.05
    assert not any(metrics.passed(errors).values())
    # a real error is not hidden: 3 cm off along x stays 3 cm whichever equivalent is nearest
    moved = flipped.copy()
    moved[0, 3] += 0.03
    assert metrics.pose_errors(model, moved, gt, K).add_m == pytest.approx(0.03, rel=1e-6)


# ---------------------------------------------------------------- a refined sequence


def _render_frame(renderer, model: ObjectModel, pose: np.ndarray, K: np.ndarray, rng) -> np.ndarray:
    """(H, W, 3) uint8: the model at ``pose`` over a real photograph."""
    size = (240, 320)
    background, _ = random_background(rng, size, ("coffee", "astronaut", "chelsea"))
    out = renderer.render([model], pose, K, size, lighting=Lighting(light_position=(0.3, -0.3, -0.5)))
    image = background.astype(np.float32) / 255.0
    image[out.mask[0]] = out.rgb[0][out.mask[0]]
    return np.round(image * 255).astype(np.uint8)


def test_tf_orientation_never_jumps_by_a_symmetry_over_a_sequence(renderer) -> None:
    """A detector that returns a random equivalent orientation every frame; the refiner, given the
    previous frame's output as reference (as the node does), keeps one continuous orientation."""
    model = _box_model()
    registry = ObjectRegistry(models={"box": model})
    loop = replace(
        ClassicalBackend.default_loop(), outer_iterations=2, inner_steps=2, restart_below_score=None
    )
    refiner = Refiner(
        registry,
        config=loop,
        backend_config=ClassicalConfig(stages=[CropStage(0, 96, 0.5)]),
        renderer=renderer,
    )
    K = np.array([[300.0, 0.0, 159.5], [0.0, 300.0, 119.5], [0.0, 0.0, 1.0]])
    rng = np.random.default_rng(7)
    group = [np.eye(4), *model.symmetries.discrete]
    spin = axis_angle_matrix(np.array([0.3, 1.0, 0.2]) / np.linalg.norm([0.3, 1.0, 0.2]), math.radians(4.0))
    truth, detected, published = _pose(), [], []
    previous = None
    for _ in range(8):
        truth = truth.copy()
        truth[:3, :3] = spin @ truth[:3, :3]  # the object turns 4° per frame
        image = _render_frame(renderer, model, truth, K, rng)
        flip = group[int(rng.integers(len(group)))]
        detection = perturb_pose(truth @ flip, rng, 4.0, (0.003, 0.003, 0.005), 8.0)
        (result,) = refiner.refine(
            Observation(image, K),
            [Instance("box", detection, "box_0", reference=previous)],
        )
        assert result.status is RefineStatus.OK
        detected.append(detection[:3, :3])
        published.append(result.pose[:3, :3])
        previous = result.pose
        # physically right: near the truth up to a symmetry (a wrong equivalent is 180° off)
        assert metrics.pose_errors(model, result.pose, truth, K).rotation_deg < 20.0
    detector_steps = [_angle(a, b) for a, b in itertools.pairwise(detected)]
    published_steps = [_angle(a, b) for a, b in itertools.pairwise(published)]
    print(
        f"detector steps {np.round(detector_steps, 1)}; published steps {np.round(published_steps, 1)} (deg)"
    )
    smallest_jump = min(rotation_angle_deg(S[:3, :3]) for S in model.symmetries.discrete)  # 180° here
    assert max(detector_steps) > 0.8 * smallest_jump  # the detector flipped: a flip passed on would show
    # 4° of motion per frame plus refinement noise, never a jump by a symmetry
    assert max(published_steps) < 0.25 * smallest_jump
