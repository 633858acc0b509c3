"""Animated GIF of one refinement, like the published demo animations.

Each frame is one inner step: left, the image with the object's silhouette contour at the initial
pose (white) and at the current estimate (red); right, the correspondence weight map of the
reference crop (black = 0, yellow = 1). Built from the refiner's step observer, so it shows exactly
what the engine did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import imageio.v2 as imageio
import numpy as np

from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.observation import Observation
from rnnpose_ros.core.refiner import Instance, Refiner, RefineResult, StepSnapshot
from rnnpose_ros.core.render import Renderer

WHITE = (255, 255, 255)
RED = (255, 40, 40)


@dataclass
class InstanceRecorder:
    """Step observer keeping the pose and weight map of one input instance at every inner step."""

    instance: int
    poses: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, snapshot: StepSnapshot) -> None:
        if self.instance not in snapshot.instance_index:
            return
        row = snapshot.instance_index.index(self.instance)
        self.poses.append(snapshot.pose[row].detach().cpu().numpy())
        self.weights.append(snapshot.weight[row].detach().float().cpu().numpy())
        self.steps.append((snapshot.outer, snapshot.inner))


def draw_contour(
    image: np.ndarray, renderer: Renderer, model: ObjectModel, pose: np.ndarray, K: np.ndarray, colour
) -> None:
    """Draw the silhouette outline of ``model`` at ``pose`` on the (H, W, 3) uint8 ``image`` in place."""
    mask = renderer.render([model], pose[None], K[None], image.shape[:2]).mask[0]
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, colour, 2, lineType=cv2.LINE_AA)


def weight_panel(weight: np.ndarray, height: int) -> np.ndarray:
    """(h, w) weights in [0, 1] as an (height, height·w/h, 3) uint8 colour image."""
    scaled = (np.clip(weight, 0.0, 1.0) * 255).astype(np.uint8)
    coloured = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    width = max(1, round(height * weight.shape[1] / weight.shape[0]))
    return cv2.resize(coloured, (width, height), interpolation=cv2.INTER_NEAREST)


def record_trace_gif(
    path: Path,
    refiner: Refiner,
    renderer: Renderer,
    observation: Observation,
    instance: Instance,
    frame_seconds: float = 0.4,
    max_width: int = 800,
) -> RefineResult:
    """Refine ``instance`` alone with a recorder attached and write the GIF to ``path``.

    Frames wider than ``max_width`` pixels are scaled down (GIF size grows with the pixel count).
    """
    recorder = InstanceRecorder(0)
    result = refiner.refine(observation, [instance], observer=recorder)[0]
    image, K = observation.image, observation.K
    model = refiner.registry[instance.class_id]
    frames = []
    for pose, weight, (outer, inner) in zip(recorder.poses, recorder.weights, recorder.steps, strict=True):
        canvas = image.copy()
        draw_contour(canvas, renderer, model, np.asarray(instance.pose, dtype=np.float64), K, WHITE)
        draw_contour(canvas, renderer, model, pose, K, RED)
        cv2.putText(
            canvas, f"render {outer + 1} step {inner + 1}", (10, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, WHITE, 2
        )
        frame = np.concatenate([canvas, weight_panel(weight, image.shape[0])], axis=1)
        if frame.shape[1] > max_width:
            size = (max_width, round(frame.shape[0] * max_width / frame.shape[1]))
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        frames.append(frame)
    if frames:
        path.parent.mkdir(parents=True, exist_ok=True)
        imageio.mimsave(path, frames, duration=frame_seconds, loop=0)
    return result
