"""Training samples: on the fly from the synthetic generator, or from a BOP dataset on disk.

Every source is indexed: ``source.sample(index, seed)`` returns the same sample for the same
(index, seed) whatever happened before, so a resumed run sees exactly the samples it would have seen
(the sample index is the global step times the world size plus the rank).

Augmentation as published (docs/method.md §4.2): Gaussian blur with probability 0.5 and a kernel
of 3, 5, 7 or 9 pixels (σ from the kernel size, as OpenCV chooses it), then a colour jitter of
brightness ±0.1, contrast ±0.1, saturation ±0.05 and hue ±0.05 (of a full turn). No geometric
augmentation. Initial poses: :func:`rnnpose_ros.core.synth.perturb_pose` (the published noise
levels with the 45° cap enforced in degrees throughout, which fixes the published resampling bug,
docs/method.md §6.9), or a file of detector poses for BOP data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.synth import SceneError, SceneSpec, make_scene, perturb_pose
from rnnpose_ros.data.bop import BopAnnotation, BopDataset, BopError, BopImage
from rnnpose_ros.training.step import TrainingSample

BLUR_KERNELS = (3, 5, 7, 9)
#: Synthetic training scenes: the default scene spec with two occluder patches.
DEFAULT_SPEC = SceneSpec(occluders=2)


@dataclass(frozen=True)
class Augmentation:
    """Published photometric augmentation (fractions as in torchvision's ColorJitter)."""

    blur_probability: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.05
    hue: float = 0.05
    enabled: bool = True


def augment(image: np.ndarray, rng: np.random.Generator, config: Augmentation = Augmentation()) -> np.ndarray:
    """(H, W, 3) uint8 RGB → augmented copy (blur, then brightness, contrast, saturation, hue in a
    random order, as ColorJitter applies them)."""
    if not config.enabled:
        return image
    out = image.astype(np.float32) / 255.0
    if rng.random() < config.blur_probability:
        kernel = int(rng.choice(BLUR_KERNELS))
        out = cv2.GaussianBlur(out, (kernel, kernel), 0)
    for op in rng.permutation(4):
        if op == 0 and config.brightness > 0:
            out = out * rng.uniform(1 - config.brightness, 1 + config.brightness)
        elif op == 1 and config.contrast > 0:
            grey = cv2.cvtColor(np.clip(out, 0, 1), cv2.COLOR_RGB2GRAY).mean()
            out = (out - grey) * rng.uniform(1 - config.contrast, 1 + config.contrast) + grey
        elif op == 2 and config.saturation > 0:
            grey = cv2.cvtColor(np.clip(out, 0, 1), cv2.COLOR_RGB2GRAY)[..., None]
            out = (out - grey) * rng.uniform(1 - config.saturation, 1 + config.saturation) + grey
        elif op == 3 and config.hue > 0:
            hsv = cv2.cvtColor(np.clip(out, 0, 1).astype(np.float32), cv2.COLOR_RGB2HSV)
            hsv[..., 0] = (hsv[..., 0] + 360.0 * rng.uniform(-config.hue, config.hue)) % 360.0
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        out = np.clip(out, 0, 1)
    return np.round(out * 255).astype(np.uint8)


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of a run seeded ``seed`` (independent streams)."""
    return np.random.default_rng([int(seed), int(index)])


class SyntheticSource:
    """One object per sample rendered over a real photograph (``core/synth``), with occluders,
    blur/noise from the scene spec, the published augmentation and a perturbed initial pose.

    Objects are cycled by index (sample i shows ``models[i % len(models)]``).
    """

    def __init__(
        self,
        models: Sequence[ObjectModel],
        renderer,
        spec: SceneSpec = DEFAULT_SPEC,
        augmentation: Augmentation = Augmentation(),
    ) -> None:
        if not models:
            raise ValueError("a synthetic source needs at least one object")
        self.models = list(models)
        self.renderer = renderer
        self.spec = spec
        self.augmentation = augmentation

    def sample(self, index: int, seed: int) -> TrainingSample:
        """Sample ``index`` of the stream ``seed`` (deterministic)."""
        rng = sample_rng(seed, index)
        model = self.models[index % len(self.models)]
        for _ in range(5):
            try:
                scene = make_scene([model], rng, self.renderer, self.spec)
                break
            except SceneError:
                continue
        else:
            raise SceneError(f"no synthetic scene of {model.class_id!r} for sample {index}")
        instance = scene.instances[0]
        return TrainingSample(
            model=model,
            image=augment(scene.image, rng, self.augmentation),
            K=scene.K,
            pose_gt=instance.pose_gt,
            pose_init=instance.pose_init,
        )


class BopSource:
    """Annotated instances of a BOP split, each sample with a freshly perturbed initial pose and the
    published augmentation; sample i uses instance ``i % len(items)`` (in scene, image, annotation
    order).

    Args:
        dataset: the :class:`~rnnpose_ros.data.bop.BopDataset`; split: e.g. "train" or "train_pbr".
        obj_ids: the objects to train on (None: all).
        spec: its noise fields (``rot_sigma_deg``, ``trans_sigma``, ``max_angle_deg``) perturb the poses.
        min_visible: instances less visible than this (``visib_fract``) are left out.
    """

    def __init__(
        self,
        dataset: BopDataset,
        split: str,
        obj_ids: Sequence[int] | None = None,
        spec: SceneSpec = DEFAULT_SPEC,
        augmentation: Augmentation = Augmentation(),
        min_visible: float = 0.1,
    ) -> None:
        wanted = set(dataset.obj_ids if obj_ids is None else obj_ids)
        self.dataset = dataset
        self.items: list[tuple[BopImage, BopAnnotation]] = [
            (image, annotation)
            for image in dataset.images(split)
            for annotation in image.annotations
            if annotation.obj_id in wanted and annotation.visib_fract >= min_visible
        ]
        if not self.items:
            raise BopError(
                f"no annotated instance of objects {sorted(wanted)} in split {split!r} of {dataset.root}"
            )
        self.spec = spec
        self.augmentation = augmentation

    def sample(self, index: int, seed: int) -> TrainingSample:
        """Sample ``index`` of the stream ``seed`` (deterministic)."""
        rng = sample_rng(seed, index)
        image, annotation = self.items[index % len(self.items)]
        spec = self.spec
        return TrainingSample(
            model=self.dataset.model(annotation.obj_id),
            image=augment(image.rgb(), rng, self.augmentation),
            K=image.K,
            pose_gt=annotation.pose,
            pose_init=perturb_pose(
                annotation.pose, rng, spec.rot_sigma_deg, spec.trans_sigma, spec.max_angle_deg
            ),
        )
