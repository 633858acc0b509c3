"""Synthetic scenes (``core/synth``) written as a BOP dataset, with their initial poses as a BOP19
results file, so that any BOP tool (and ``evaluate --dataset bop``) reads them.

Objects are numbered 1, 2, … in the order given. Each synthetic scene becomes one image of BOP scene
0 (image id = scene index); depth is the ground-truth depth of the objects (occluder patches are
flat pictures and have no depth), 0 elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.synth import Scene
from rnnpose_ros.data.bop import BopEstimate, SceneRecord, write_models, write_results, write_scene

INIT_FILE = "init_poses.csv"


def scene_depth(scene: Scene, models: dict[str, ObjectModel], renderer) -> np.ndarray:
    """(H, W) float32 metres: nearest object surface at the ground-truth poses, 0 on background."""
    depth = np.zeros(scene.image.shape[:2], np.float32)
    for instance in scene.instances:
        rendered = renderer.render(
            [models[instance.class_id]], instance.pose_gt, scene.K, scene.image.shape[:2]
        )
        d = rendered.depth[0]
        closer = rendered.mask[0] & ((depth == 0) | (d < depth))
        depth[closer] = d[closer]
    return depth


def write_synthetic_dataset(
    root: Path,
    models: Sequence[ObjectModel],
    make: Callable[[int], Scene],
    num_scenes: int,
    renderer,
    split: str = "test",
) -> Path:
    """Write ``num_scenes`` scenes ``make(0..n−1)`` as split ``split`` of a BOP dataset at ``root``.

    Args:
        models: the objects the scenes may show (object id = position + 1).
        make: scene index → :class:`~rnnpose_ros.core.synth.Scene`.

    Returns:
        The initial-pose file (``root/init_poses.csv``, BOP19 format, score 1, time −1).
    """
    root = Path(root)
    by_class = {m.class_id: m for m in models}
    obj_ids = {m.class_id: i + 1 for i, m in enumerate(models)}
    write_models(root, {obj_ids[c]: m for c, m in by_class.items()})
    records, initial = [], []
    for index in range(num_scenes):
        scene = make(index)
        records.append(
            SceneRecord(
                image=scene.image,
                K=scene.K,
                depth=scene_depth(scene, by_class, renderer),
                objects=[
                    (obj_ids[inst.class_id], inst.pose_gt, inst.mask, inst.visible_fraction)
                    for inst in scene.instances
                ],
            )
        )
        initial += [
            BopEstimate(0, index, obj_ids[inst.class_id], 1.0, inst.pose_init) for inst in scene.instances
        ]
    write_scene(root, split, 0, records)
    init_path = root / INIT_FILE
    write_results(init_path, initial)
    return init_path
