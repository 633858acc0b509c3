"""Train RNNPose for your own objects (docs/method.md §4; the loop is ``rnnpose_ros/training``).

    python -m rnnpose_ros.tools.train --objects config/objects.yaml --classes duck --run-dir runs/duck
    python -m rnnpose_ros.tools.train --config runs/duck/config.yaml --run-dir runs/duck --resume
    torchrun --nproc_per_node 4 -m rnnpose_ros.tools.train --config train.yaml --run-dir runs/duck

Samples are synthetic (the object rendered over real photographs, with occluders and the published
augmentation) or read from a BOP dataset (``--bop-root``). The run folder receives the resolved
``config.yaml``, ``log.jsonl`` (and TensorBoard events when tensorboard is installed), training
states for ``--resume`` and the weights: ``weights/<class>.pt`` for ``evaluate --backend rnnpose``
and the node, ``weights/<class>.tckpt`` in the published layout. Options given on the command line
override the YAML file. Inference must use the crop sizes the weights were trained with.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rnnpose_ros.package_files import default_objects_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rnnpose_ros.tools.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--run-dir", type=Path, required=True, help="folder of the run (created)")
    parser.add_argument("--config", type=Path, default=None, help="YAML training configuration")
    parser.add_argument("--objects", type=Path, default=default_objects_file(), help="objects.yaml")
    parser.add_argument(
        "--classes",
        nargs="+",
        default=None,
        help="class ids to train on (default: all; BOP objects are obj_XXXXXX)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest state")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    overrides = parser.add_argument_group("overrides of the configuration")
    overrides.add_argument("--steps", type=int, dest="steps")
    overrides.add_argument("--seed", type=int, dest="seed")
    overrides.add_argument("--device", dest="device")
    overrides.add_argument(
        "--init-weights", dest="init_weights", help="published .tckpt or ours to start from"
    )
    overrides.add_argument("--checkpoint-every", type=int, dest="checkpoint_every")
    overrides.add_argument("--log-every", type=int, dest="log_every")
    overrides.add_argument("--lr-max", type=float, dest="optim.lr_max")
    overrides.add_argument("--first-crop-size", type=int, dest="step.first_crop_size")
    overrides.add_argument("--zoom-crop-size", type=int, dest="step.zoom_crop_size")
    overrides.add_argument("--outer-iterations", type=int, dest="step.outer_iterations")
    overrides.add_argument("--inner-steps", type=int, dest="step.inner_steps")
    overrides.add_argument("--bop-root", dest="data.bop_root", help="train on this BOP dataset")
    overrides.add_argument("--split", dest="data.split", help="BOP split (default train)")
    overrides.add_argument("--occluders", type=int, dest="data.occluders")
    args = parser.parse_args(argv)
    names = [a.dest for a in overrides._group_actions]
    args.overrides = {name: getattr(args, name) for name in names}
    if args.overrides.get("data.bop_root"):
        args.overrides["data.kind"] = "bop"
    return args


def build_source(config, registry_path: Path, classes: list[str] | None, renderer):
    """(models, sample source) of ``config.data``: synthetic scenes of registry objects, or the
    annotated instances of a BOP split (objects ``obj_XXXXXX`` from the dataset's models)."""
    from rnnpose_ros.core.objects import ObjectRegistry
    from rnnpose_ros.core.synth import SceneSpec
    from rnnpose_ros.training.sources import Augmentation, BopSource, SyntheticSource
    from rnnpose_ros.training.trainer import TrainingError

    data = config.data
    augmentation = Augmentation(enabled=data.augment)
    spec = SceneSpec(
        size=tuple(data.image_size),
        occluders=data.occluders,
        rot_sigma_deg=data.rot_sigma_deg,
        trans_sigma=tuple(data.trans_sigma),
        max_angle_deg=data.max_angle_deg,
    )
    if data.kind == "bop":
        from rnnpose_ros.data.bop import BopDataset

        dataset = BopDataset(Path(data.bop_root))
        registry = dataset.registry()
    else:
        registry = ObjectRegistry.from_yaml(registry_path)
    class_ids = classes or registry.class_ids
    unknown = [c for c in class_ids if c not in registry]
    if unknown:
        raise TrainingError(f"unknown class(es) {unknown}; known: {registry.class_ids}")
    models = [registry[c] for c in class_ids]
    if data.kind == "bop":
        obj_ids = [int(c.removeprefix("obj_")) for c in class_ids]
        return models, BopSource(dataset, data.split, obj_ids, spec, augmentation)
    return models, SyntheticSource(models, renderer, spec, augmentation)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    from rnnpose_ros.core.checkpoint import CheckpointError
    from rnnpose_ros.core.objects import ObjectModelError
    from rnnpose_ros.core.render import Renderer
    from rnnpose_ros.data.bop import BopError
    from rnnpose_ros.training.trainer import Trainer, TrainingError, load_config

    try:
        config = load_config(args.config, args.overrides)
        renderer = Renderer()
        models, source = build_source(config, args.objects, args.classes, renderer)
        trainer = Trainer(config, args.run_dir, models, source, renderer, progress=not args.no_progress)
        if args.resume:
            print(f"resumed at step {trainer.resume()}", file=sys.stderr)
        trainer.run()
    except (TrainingError, ObjectModelError, CheckpointError, BopError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.dist.is_main:
        print(f"trained {trainer.step} steps; weights in {args.run_dir / 'weights'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
