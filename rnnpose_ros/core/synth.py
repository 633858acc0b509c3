"""Synthetic scenes: textured meshes rendered at random plausible poses over real photographs.

A scene holds one or more object instances (the same class may appear twice), each rendered with
:class:`~rnnpose_ros.core.render.Renderer` at a random pose (object centre 0.3–1.0 m ahead, mostly in
view, uniform random rotation), composited by depth over a photograph from ``skimage.data`` (random
crop, scale and flip), optionally partly hidden by random occluder patches, then degraded with blur and
noise. Rendering is 2× supersampled so that silhouettes are anti-aliased like a camera image. The
lighting varies per scene (one point light fixed in the camera frame, random strengths and colour gain).

Ground truth per instance: pose (model→camera, metres), visible mask, visible fraction; the initial
pose is drawn with :func:`perturb_pose` (the published noise levels; see there for how its rotation
noise differs from the published sampler). What a scene may look like is a :class:`SceneSpec`;
given the spec, everything is deterministic given the seed (or ``numpy.random.Generator``).
The per-frame compositing (:func:`compose_frame`: render, paste, occlude, degrade) is shared with the
sequences of :mod:`rnnpose_ros.core.sequence`.

Depth (``SceneSpec.depth``, a :class:`~rnnpose_ros.core.depth_sensor.DepthSensorModel`): the exact
metric depth of the scene — a background plane behind the objects (tilted up to 40°), the objects
from the renderer, each occluder patch as a flat surface 2–15 cm in front of the object it hides —
through the sensor model, registered to the image. Its random draws come from a stream of their
own (spawned from the scene's), so a scene is the same image, poses and initial poses with and
without depth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from rnnpose_ros.core.depth_sensor import DepthSensorModel, simulate_depth
from rnnpose_ros.core.objects import ObjectModel
from rnnpose_ros.core.observation import Observation
from rnnpose_ros.core.pinhole import project_to_pixels
from rnnpose_ros.core.render import Lighting, Renderer

DEFAULT_SIZE = (480, 640)
#: A LINEMOD-like 640×480 camera; the principal point is the image centre (pixel centres at integers).
DEFAULT_K = np.array([[572.0, 0.0, 319.5], [0.0, 572.0, 239.5], [0.0, 0.0, 1.0]])
#: Real photographs shipped with scikit-image (no download needed).
BACKGROUNDS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "brick",
    "grass",
    "gravel",
)


class SceneError(ValueError):
    """A scene could not be generated with the requested constraints."""


# eq=False: K is an array, so a field-wise == would be ambiguous.
@dataclass(frozen=True, eq=False)
class SceneSpec:
    """What :func:`make_scene` may generate: camera, placement, occluders, image degradation, pose noise.

    Attributes:
        size: (H, W) of the image, pixels.
        K: (3, 3) intrinsics, pixels; None = a 640×480-like camera (fx = fy = 572) with the principal
            point at the centre of ``size`` (:meth:`intrinsics`).
        distance: (near, far) range of each object centre's depth, metres.
        min_in_view: minimum share of each object's evaluation points projecting into the image.
        min_visible: minimum visible fraction of each instance after inter-object occlusion and
            occluders.
        occluders: number of random occluder patches to try.
        max_occlusion: largest share of an instance's pixels that occluders may hide.
        noise_std: largest std of the additive Gaussian image noise (image in [0, 1]; each scene
            draws its std uniformly up to it).
        blur_sigma: largest Gaussian blur sigma, pixels (applied to half of the scenes).
        rot_sigma_deg: initial-pose noise, std of each Euler angle, degrees (:func:`perturb_pose`).
        trans_sigma: initial-pose noise, std along camera x, y, z, metres.
        max_angle_deg: initial-pose noise, largest total rotation, degrees.
        backgrounds: ``skimage.data`` photograph names to draw the background from.
        supersample: rendering supersampling factor (1 disables anti-aliasing).
        max_tries: attempts at a placement meeting ``min_visible``.
        depth: the depth sensor of :attr:`Scene.depth` (None: no depth image).
    """

    size: tuple[int, int] = DEFAULT_SIZE
    K: np.ndarray | None = None
    distance: tuple[float, float] = (0.3, 1.0)
    min_in_view: float = 0.9
    min_visible: float = 0.5
    occluders: int = 0
    max_occlusion: float = 0.4
    noise_std: float = 0.02
    blur_sigma: float = 1.0
    rot_sigma_deg: float = 15.0
    trans_sigma: Sequence[float] = (0.01, 0.01, 0.05)
    max_angle_deg: float = 45.0
    backgrounds: Sequence[str] = BACKGROUNDS
    supersample: int = 2
    max_tries: int = 20
    depth: DepthSensorModel | None = None

    def intrinsics(self) -> np.ndarray:
        """(3, 3) float64: ``K``, or the default camera centred on ``size``."""
        if self.K is not None:
            return np.asarray(self.K, dtype=np.float64)
        height, width = self.size
        K = DEFAULT_K.copy()
        K[0, 2], K[1, 2] = (width - 1) / 2, (height - 1) / 2
        return K

    @property
    def supersample_factor(self) -> int:
        """``supersample`` as a factor ≥ 1."""
        return max(int(self.supersample), 1)


@dataclass
class SceneInstance:
    """One object in a synthetic scene.

    Attributes:
        class_id: registry class of the object.
        pose_gt: (4, 4) float64 model→camera ground truth, metres.
        pose_init: (4, 4) float64 perturbed initial pose (:func:`perturb_pose`).
        instance_id: unique within the scene ("<class_id>_<index>").
        mask: (H, W) bool pixels where this object is visible (not hidden by others or occluders).
        visible_fraction: visible pixels / pixels the object would cover alone in the image, in [0, 1]
            (the part outside the image is not counted).
    """

    class_id: str
    pose_gt: np.ndarray
    pose_init: np.ndarray
    instance_id: str = ""
    mask: np.ndarray | None = None
    visible_fraction: float = 1.0

    @property
    def occlusion_fraction(self) -> float:
        return 1.0 - self.visible_fraction


@dataclass
class Scene:
    """A synthetic image with ground truth.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        K: (3, 3) float64 intrinsics (OpenCV, pixel centres at integer coordinates).
        instances: the objects, in generation order.
        background: name of the ``skimage.data`` photograph used.
        seed: the integer seed when one was given, else None.
        depth: (H, W) float32 sensor depth registered to ``image``, metres, 0 = no value; None unless
            the spec asked for depth.
    """

    image: np.ndarray
    K: np.ndarray
    instances: list[SceneInstance] = field(default_factory=list)
    background: str = ""
    seed: int | None = None
    depth: np.ndarray | None = None

    @property
    def visible_fraction(self) -> list[float]:
        """Per-instance visible fraction (see :class:`SceneInstance`)."""
        return [inst.visible_fraction for inst in self.instances]

    @property
    def observation(self) -> Observation:
        """What the refiner is given of this scene."""
        return Observation(self.image, self.K, depth=self.depth)


#: An occluder drawn over a frame: (region (H·f, W·f) bool at the supersampled size, index of the
#: instance it stands in front of).
Occluder = tuple[np.ndarray, int]


@dataclass
class InstanceRenders:
    """Each instance of a frame rendered alone at the supersampled size (H·f, W·f), mutual occlusion
    resolved by depth.

    Attributes:
        rgb: per instance (H·f, W·f, 3) float32 lit colour in [0, 1].
        visible: per instance (H·f, W·f) bool, where it is the nearest object.
        alone: per instance (H·f, W·f) bool, where it would be seen without the other instances.
    """

    rgb: list[np.ndarray]
    visible: list[np.ndarray]
    alone: list[np.ndarray]


@dataclass
class ComposedFrame:
    """One image made by :func:`compose_frame`, with its ground truth.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        instances: one per model, in order; ``pose_init`` is a copy of ``pose_gt`` (callers draw the
            initial pose, if any).
        occluders: the occluders drawn over the objects, at the supersampled size.
    """

    image: np.ndarray
    instances: list[SceneInstance]
    occluders: list[Occluder]


# --- initial-pose noise ----------------------------------------------------------------------------


def rotation_angle_deg(R: np.ndarray) -> float:
    """Rotation angle of a 3×3 rotation matrix, degrees in [0, 180]."""
    return float(np.degrees(np.linalg.norm(Rotation.from_matrix(R).as_rotvec())))


def perturb_pose(
    T: np.ndarray,
    rng: np.random.Generator,
    rot_sigma_deg: float = 15.0,
    trans_sigma: Sequence[float] = (0.01, 0.01, 0.05),
    max_angle_deg: float = 45.0,
) -> np.ndarray:
    """Initial-pose noise: returns a (4, 4) float64 perturbed copy of the model→camera pose T.

    Euler angles (x, y, z, extrinsic, in the camera axes) are drawn from N(0, rot_sigma_deg) each and the
    draw is repeated while the total rotation angle exceeds ``max_angle_deg`` (degrees throughout — the
    published code mixes radians in after the first redraw, so its cap is not enforced; docs/method.md §6.9).
    R_init = R_delta · R_gt rotates the object about its own origin; t_init = t_gt + N(0, trans_sigma)
    per camera axis, metres. The published sampler instead adds the noise to the Euler angles of R_gt
    itself, a pose-dependent distribution of the same per-angle spread; this one is the same for every
    pose, so that results do not depend on how the ground truth happens to be oriented.
    """
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise ValueError(f"pose must be 4x4, got {T.shape}")
    if max_angle_deg <= 0:
        raise ValueError("max_angle_deg must be > 0")
    while True:
        angles = rng.normal(0.0, rot_sigma_deg, size=3)
        delta = Rotation.from_euler("xyz", angles, degrees=True)
        if np.degrees(delta.magnitude()) <= max_angle_deg:
            break
    out = T.copy()
    out[:3, :3] = delta.as_matrix() @ T[:3, :3]
    out[:3, 3] = T[:3, 3] + rng.normal(0.0, 1.0, size=3) * np.asarray(trans_sigma, dtype=np.float64)
    return out


# --- backgrounds -----------------------------------------------------------------------------------


@functools.cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def random_background(
    rng: np.random.Generator, size: tuple[int, int], names: Sequence[str] = BACKGROUNDS
) -> tuple[np.ndarray, str]:
    """A random crop (random scale, position, horizontal flip) of a photograph resized to (H, W) uint8."""
    name = names[int(rng.integers(len(names)))]
    photo = _photo(name)
    height, width = size
    ph, pw = photo.shape[:2]
    # largest window of the output aspect ratio that fits, then a random 50-100 % of it
    side = min(pw / width, ph / height) * rng.uniform(0.5, 1.0)
    cw, ch = max(int(width * side), 1), max(int(height * side), 1)
    x0 = int(rng.integers(0, pw - cw + 1))
    y0 = int(rng.integers(0, ph - ch + 1))
    crop = photo[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=cv2.INTER_AREA), name


# --- poses -----------------------------------------------------------------------------------------


def sample_object_pose(
    model: ObjectModel,
    rng: np.random.Generator,
    K: np.ndarray,
    size: tuple[int, int],
    distance: tuple[float, float] = (0.3, 1.0),
    min_in_view: float = 0.9,
    max_tries: int = 100,
) -> np.ndarray:
    """Random (4, 4) pose: uniform rotation, bbox centre at a depth in ``distance`` (m) and at a random
    pixel, with at least ``min_in_view`` of the model's evaluation points projecting inside the image."""
    height, width = size
    K_inv = np.linalg.inv(K)
    for _ in range(max_tries):
        R = Rotation.random(random_state=rng).as_matrix()
        z = rng.uniform(*distance)
        radius_px = K[0, 0] * model.bounding_radius / z
        margin = min(0.5 * radius_px, 0.45 * min(width, height))
        u = rng.uniform(margin, width - 1 - margin)
        v = rng.uniform(margin, height - 1 - margin)
        centre = z * (K_inv @ np.array([u, v, 1.0]))
        T = np.eye(4)
        T[:3, :3] = R
        T[:3, 3] = centre - R @ model.center
        if fraction_in_view(model.eval_points, T, K, size) >= min_in_view:
            return T
    raise SceneError(f"no pose of {model.class_id!r} with {min_in_view:.0%} in view after {max_tries} tries")


def fraction_in_view(points: np.ndarray, T: np.ndarray, K: np.ndarray, size: tuple[int, int]) -> float:
    """Share of the (N, 3) model-frame ``points`` (metres) that the (4, 4) model→camera pose T puts more
    than 1 cm ahead of the camera and inside the (H, W) image of intrinsics K, in [0, 1]."""
    cam = points.astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    z = cam[:, 2]
    uv = project_to_pixels(cam, K, min_depth=1e-6)
    inside = (z > 0.01) & (uv[:, 0] >= -0.5) & (uv[:, 0] < size[1] - 0.5) & (uv[:, 1] >= -0.5)
    inside &= uv[:, 1] < size[0] - 0.5
    return float(inside.mean())


def supersampled_intrinsics(K: np.ndarray, factor: int) -> np.ndarray:
    """K for an image ``factor`` times larger whose factor×factor blocks average to the original pixels.

    With pixel centres at integer coordinates, u_hi = factor·u + (factor − 1)/2.
    """
    S = np.array([[factor, 0, (factor - 1) / 2], [0, factor, (factor - 1) / 2], [0, 0, 1.0]])
    return S @ K


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    # INTER_AREA with an integer factor is the exact block mean
    size = (image.shape[1] // factor, image.shape[0] // factor)
    return cv2.resize(image.astype(np.float32), size, interpolation=cv2.INTER_AREA)


# --- scenes ----------------------------------------------------------------------------------------


class SceneLighting(NamedTuple):
    """The light of a scene (fixed in the camera frame, so each object sees it from its own pose).

    Attributes:
        position: (3,) float64 point light in the camera frame, metres.
        strengths: ``ambient``, ``diffuse`` and ``specular`` of :class:`~rnnpose_ros.core.render.Lighting`.
        gain: (3,) float64 RGB colour gain applied to the rendered objects.
    """

    position: np.ndarray
    strengths: dict[str, float]
    gain: np.ndarray


def random_lighting(rng: np.random.Generator) -> SceneLighting:
    """A random scene light: mostly above and behind the camera, 1–2 m from it; random strengths and gain."""
    direction = np.array([rng.uniform(-1, 1), rng.uniform(-1, 0.2), rng.uniform(-1, -0.2)])
    position = direction / np.linalg.norm(direction) * rng.uniform(1.0, 2.0)
    strengths = {
        "ambient": rng.uniform(0.4, 0.7),
        "diffuse": rng.uniform(0.2, 0.5),
        "specular": rng.uniform(0.0, 0.15),
    }
    gain = rng.uniform(0.85, 1.1, size=3)
    return SceneLighting(position, strengths, gain)


def _add_occluders(
    image: np.ndarray,
    object_masks: list[np.ndarray],
    rng: np.random.Generator,
    count: int,
    max_occlusion: float,
    factor: int,
) -> list[Occluder]:
    """Draw up to ``count`` random patches (photo texture or flat colour) over objects, in place, keeping
    every object's occluded share <= max_occlusion.

    Returns:
        (patch mask (H, W) bool, index of the object it was placed on) of every patch drawn.
    """
    height, width = image.shape[:2]
    occluder_mask = np.zeros((height, width), dtype=bool)
    alone = [max(int(m.sum()), 1) for m in object_masks]
    patches = []
    for _ in range(count):
        for _attempt in range(10):
            target_index = int(rng.integers(len(object_masks)))
            target = object_masks[target_index]
            ys, xs = np.nonzero(target)
            if len(xs) == 0:
                break
            k = int(rng.integers(len(xs)))
            extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            patch = np.zeros((height, width), dtype=np.uint8)
            if rng.random() < 0.5:
                axes = (int(extent * rng.uniform(0.1, 0.35)) + 1, int(extent * rng.uniform(0.1, 0.35)) + 1)
                angle = float(rng.uniform(0, 180))
                cv2.ellipse(patch, (int(xs[k]), int(ys[k])), axes, angle, 0, 360, 1, thickness=-1)
            else:
                n = int(rng.integers(3, 7))
                angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
                radii = extent * rng.uniform(0.1, 0.4, size=n)
                pts = np.stack([xs[k] + radii * np.cos(angles), ys[k] + radii * np.sin(angles)], 1)
                cv2.fillPoly(patch, [pts.astype(np.int32)], 1)
            new = occluder_mask | patch.astype(bool)
            if all((m & new).sum() / a <= max_occlusion for m, a in zip(object_masks, alone, strict=True)):
                break
        else:
            continue
        if len(xs) == 0:
            break
        region = patch.astype(bool)
        if rng.random() < 0.5:
            texture, _ = random_background(rng, (height // factor, width // factor))
            texture = cv2.resize(texture, (width, height), interpolation=cv2.INTER_LINEAR)
            image[region] = texture[region].astype(np.float32) / 255.0
        else:
            image[region] = rng.uniform(0, 1, size=3).astype(np.float32)
        occluder_mask |= region
        patches.append((region, target_index))
    return patches


def compose_frame(
    renderer: Renderer,
    models: Sequence[ObjectModel],
    poses: np.ndarray,
    background: np.ndarray,
    lighting: SceneLighting,
    rng: np.random.Generator,
    spec: SceneSpec,
    occlude: Callable[[np.ndarray, InstanceRenders], list[Occluder]] | None = None,
    renders: InstanceRenders | None = None,
) -> ComposedFrame:
    """One camera image of the objects at ``poses``: render each instance supersampled, paste it over the
    background, draw occluders, then downsample and degrade (blur, noise) like a camera.

    Random draws, in order: those of ``occlude``, then the blur and noise of the image.

    Args:
        renderer: the process's renderer.
        models: the N objects, one instance each.
        poses: (N, 4, 4) float64 model→camera, metres.
        background: (H, W, 3) uint8 photograph, (H, W) = ``spec.size``.
        lighting: the scene light (:func:`random_lighting`); its gain colours the objects.
        rng: the generator for the degradation (and whatever ``occlude`` draws).
        spec: size, intrinsics (:meth:`SceneSpec.intrinsics`), supersampling and degradation.
        occlude: paints occluders in place on the (H·f, W·f, 3) float32 [0, 1] composite, given the
            instances' renders, and returns them; what it covers is not visible in the instances' masks.
        renders: the instances already rendered at ``poses`` with ``lighting`` (e.g. while checking a
            placement); None renders them here.

    Returns:
        The image and, per instance, its pose, visible (H, W) bool mask (at least half of each pixel's
        supersamples visible) and visible fraction.
    """
    models = list(models)
    height, width = spec.size
    if background.shape[:2] != (height, width):
        raise ValueError(f"background is {background.shape[:2]}, the spec's image size is {spec.size}")
    factor = spec.supersample_factor
    if renders is None:
        K_hi = supersampled_intrinsics(spec.intrinsics(), factor)
        renders = _render_instances(
            renderer, models, poses, K_hi, (height * factor, width * factor), lighting
        )
    image_hi = _composite(background, renders.rgb, renders.visible, lighting.gain, factor)
    occluders = occlude(image_hi, renders) if occlude is not None else []
    hidden = np.zeros(image_hi.shape[:2], dtype=bool)
    for region, _ in occluders:
        hidden |= region
    image = _degrade(_downsample(image_hi, factor), rng, spec)
    instances = []
    for i, (model, pose) in enumerate(zip(models, poses, strict=True)):
        visible_hi = renders.visible[i] & ~hidden
        instances.append(
            SceneInstance(
                class_id=model.class_id,
                pose_gt=pose,
                pose_init=pose.copy(),
                instance_id=f"{model.class_id}_{i}",
                mask=_downsample(visible_hi.astype(np.float32), factor) >= 0.5,
                visible_fraction=float(visible_hi.sum() / max(renders.alone[i].sum(), 1)),
            )
        )
    return ComposedFrame(image, instances, occluders)


def make_scene(
    models: Sequence[ObjectModel],
    rng: np.random.Generator | int,
    renderer: Renderer,
    spec: SceneSpec = SceneSpec(),
) -> Scene:
    """Generate one scene; each entry of ``models`` becomes one instance (repeat a model for two copies).

    Args:
        models: objects to place (at least one).
        rng: a seed or a numpy Generator; the same seed and spec give the same scene.
        renderer: the process's renderer.
        spec: what the scene may look like (``dataclasses.replace(spec, occluders=2)`` for a variant).

    Raises:
        SceneError: no model, or no placement meeting the spec's visibility constraints.
    """
    seed = int(rng) if isinstance(rng, int | np.integer) else None
    rng = np.random.default_rng(rng) if seed is not None else rng
    models = list(models)
    if not models:
        raise SceneError("make_scene needs at least one model")
    K = spec.intrinsics()
    factor = spec.supersample_factor

    background, background_name = random_background(rng, spec.size, spec.backgrounds)
    lighting = random_lighting(rng)
    poses, renders = _place_instances(renderer, models, rng, spec, K, lighting)

    def occlude(image_hi: np.ndarray, renders: InstanceRenders) -> list[Occluder]:
        return _add_occluders(image_hi, renders.visible, rng, spec.occluders, spec.max_occlusion, factor)

    frame = compose_frame(
        renderer,
        models,
        poses,
        background,
        lighting,
        rng,
        spec,
        occlude=occlude if spec.occluders > 0 else None,
        renders=renders,
    )
    for instance in frame.instances:
        instance.pose_init = perturb_pose(
            instance.pose_gt, rng, spec.rot_sigma_deg, spec.trans_sigma, spec.max_angle_deg
        )
    depth = None
    if spec.depth is not None:
        # A stream of its own: the draws above (and so the RGB scene) do not depend on the depth.
        depth_rng = rng.spawn(1)[0]
        exact = _exact_depth(renderer, models, poses, K, spec.size, frame.occluders, factor, depth_rng)
        depth = simulate_depth(exact, K, depth_rng, spec.depth)
    return Scene(
        image=frame.image, K=K, instances=frame.instances, background=background_name, seed=seed, depth=depth
    )


def _exact_depth(
    renderer: Renderer,
    models: list[ObjectModel],
    poses: np.ndarray,
    K: np.ndarray,
    size: tuple[int, int],
    patches: list[Occluder],
    factor: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(H, W) float64 exact depth of a scene, metres (0 = nothing): a background plane, the objects at
    their poses, and each occluder patch (supersampled masks) as a flat surface in front of its object.
    """
    out = renderer.render(models, poses, K, size)
    object_depth = np.where(out.mask, out.depth, np.inf).min(axis=0)
    on_object = np.isfinite(object_depth)
    depth = _background_plane(K, size, object_depth, rng)
    depth = np.where(on_object, object_depth, depth)
    for region_hi, target in patches:
        region = _downsample(region_hi.astype(np.float32), factor) >= 0.5
        nearest = float(out.depth[target][out.mask[target]].min()) if out.mask[target].any() else 0.3
        depth[region] = max(nearest - rng.uniform(0.02, 0.15), 0.12)
    return depth


def _background_plane(
    K: np.ndarray, size: tuple[int, int], object_depth: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(H, W) float64 depth of a random plane (normal within 40° of the optical axis) lying 3–40 cm
    behind every object pixel (``object_depth``, inf elsewhere), metres; 0 where the ray misses it."""
    height, width = size
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    rays = np.stack(((u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)), -1)
    tilt = np.radians(rng.uniform(0.0, 40.0))
    azimuth = rng.uniform(0.0, 2.0 * np.pi)
    normal = np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])
    facing = rays @ normal  # plane n·X = d: depth along a ray = d / (n·ray)
    on_object = np.isfinite(object_depth)
    # The smallest d that keeps the plane behind every object pixel, then a random gap.
    needed = float((object_depth[on_object] * facing[on_object]).max()) if on_object.any() else 0.5
    offset = needed + rng.uniform(0.03, 0.4) * float(normal[2])
    depth = offset / np.where(facing > 1e-3, facing, np.inf)
    return np.where(facing > 1e-3, depth, 0.0)


def _place_instances(
    renderer: Renderer,
    models: list[ObjectModel],
    rng: np.random.Generator,
    spec: SceneSpec,
    K: np.ndarray,
    lighting: SceneLighting,
) -> tuple[np.ndarray, InstanceRenders]:
    """Draw poses until every instance is at least ``spec.min_visible`` visible; render them supersampled.

    Returns:
        poses (N, 4, 4) float64 model→camera, and their renders at the supersampled size.

    Raises:
        SceneError: no such placement in ``spec.max_tries`` attempts.
    """
    factor = spec.supersample_factor
    K_hi = supersampled_intrinsics(K, factor)
    size_hi = (spec.size[0] * factor, spec.size[1] * factor)
    for _ in range(spec.max_tries):
        poses = np.stack(
            [sample_object_pose(m, rng, K, spec.size, spec.distance, spec.min_in_view) for m in models]
        )
        renders = _render_instances(renderer, models, poses, K_hi, size_hi, lighting)
        if all(
            m.sum() >= spec.min_visible * max(a.sum(), 1)
            for m, a in zip(renders.visible, renders.alone, strict=True)
        ):
            return poses, renders
    raise SceneError(
        f"could not place {len(models)} objects with {spec.min_visible:.0%} visible in {spec.max_tries} tries"
    )


def _composite(
    background: np.ndarray,
    rgbs: list[np.ndarray],
    masks: list[np.ndarray],
    gain: np.ndarray,
    factor: int,
) -> np.ndarray:
    """(H·factor, W·factor, 3) float32 in [0, 1]: the (H, W, 3) uint8 background upsampled by pixel
    repetition, each instance's colour (times the RGB ``gain``) pasted where it is visible."""
    image = np.repeat(np.repeat(background.astype(np.float32) / 255.0, factor, 0), factor, 1)
    for rgb, mask in zip(rgbs, masks, strict=True):
        image[mask] = np.clip(rgb[mask] * gain, 0.0, 1.0)
    return image


def _degrade(image: np.ndarray, rng: np.random.Generator, spec: SceneSpec) -> np.ndarray:
    """(H, W, 3) uint8 camera-like image of the float [0, 1] ``image``: random blur, then noise."""
    if spec.blur_sigma > 0 and rng.random() < 0.5:
        sigma = rng.uniform(0.3, spec.blur_sigma)
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma)
    if spec.noise_std > 0:
        image = image + rng.normal(0.0, rng.uniform(0.0, spec.noise_std), size=image.shape).astype(np.float32)
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _render_instances(
    renderer: Renderer,
    models: list[ObjectModel],
    poses: np.ndarray,
    K: np.ndarray,
    size: tuple[int, int],
    lighting: SceneLighting,
) -> InstanceRenders:
    """Render each instance alone at (H, W) with intrinsics K and resolve mutual occlusion by depth."""
    rgbs, alone, depths = [], [], []
    for model, pose in zip(models, poses, strict=True):
        # the scene light in this object's frame
        light_obj = pose[:3, :3].T @ (lighting.position - pose[:3, 3])
        phong = Lighting(light_position=tuple(float(x) for x in light_obj), **lighting.strengths)
        out = renderer.render([model], pose, K, size, lighting=phong)
        rgbs.append(out.rgb[0])
        alone.append(out.mask[0])
        depths.append(np.where(out.mask[0], out.depth[0], np.inf))
    if len(models) == 1:
        return InstanceRenders(rgbs, alone, alone)
    nearest = np.argmin(np.stack(depths), axis=0)
    visible = [a & (nearest == i) for i, a in enumerate(alone)]
    return InstanceRenders(rgbs, visible, alone)
