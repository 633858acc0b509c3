"""Refiner API: input validation, per-instance statuses, batching, results and scores."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from rnnpose_ros.core.backends.classical import ClassicalBackend, ClassicalConfig, CropStage
from rnnpose_ros.core.depth_sensor import DepthSensorModel
from rnnpose_ros.core.loop import Convergence
from rnnpose_ros.core.objects import ObjectRegistry, load_pybullet_object, pybullet_mesh_available
from rnnpose_ros.core.observation import InputError, Observation
from rnnpose_ros.core.refiner import (
    Instance,
    RefinementCancelledError,
    Refiner,
    RefineStatus,
    rotation_hypotheses,
)
from rnnpose_ros.core.synth import SceneSpec, make_scene

pytestmark = pytest.mark.skipif(not pybullet_mesh_available(), reason="pybullet_data meshes not installed")

# A short schedule keeps these tests fast; accuracy is tested in test_backend_classical.py.
SHORT = replace(ClassicalBackend.default_loop(), outer_iterations=2, inner_steps=2, restart_below_score=None)
ONE_STAGE = ClassicalConfig(stages=[CropStage(0, 96, 0.5)])
MILD = SceneSpec(rot_sigma_deg=8.0)  # initial rotation noise; the default is 15° per axis


@pytest.fixture(scope="module")
def registry() -> ObjectRegistry:
    duck = load_pybullet_object("duck")
    ball = load_pybullet_object("soccerball", class_id="ball")
    return ObjectRegistry(models={"duck": duck, "ball": ball})


@pytest.fixture(scope="module")
def refiner(registry, renderer) -> Refiner:
    return Refiner(registry, config=SHORT, backend_config=ONE_STAGE, renderer=renderer)


@pytest.fixture(scope="module")
def scene(registry, renderer):
    return make_scene([registry["duck"], registry["duck"]], 3, renderer, MILD)


def test_bad_image_and_intrinsics_raise_input_error(refiner, scene):
    instances = [Instance("duck", scene.instances[0].pose_init)]
    K = scene.K
    with pytest.raises(InputError, match="shape"):
        refiner.refine(Observation(scene.image[..., 0], K), instances)
    with pytest.raises(InputError, match="dtype"):
        refiner.refine(Observation(scene.image.astype(np.int32), K), instances)
    with pytest.raises(InputError, match="NaN"):
        refiner.refine(Observation(np.full(scene.image.shape, np.nan, np.float32), K), instances)
    with pytest.raises(InputError, match="focal"):
        refiner.refine(Observation(scene.image, np.diag([0.0, 500.0, 1.0])), instances)
    with pytest.raises(InputError, match="NaN"):
        refiner.refine(Observation(scene.image, np.full((3, 3), np.nan)), instances)
    with pytest.raises(InputError, match="shape"):
        refiner.refine(Observation(scene.image, np.eye(4)), instances)


def test_bad_instances_get_a_status_not_an_exception(refiner, scene):
    good = scene.instances[0].pose_init
    behind = good.copy()
    behind[2, 3] = -0.5
    outside = good.copy()
    outside[0, 3] = 5.0  # 5 m to the side at < 1 m depth
    nan_pose = good.copy()
    nan_pose[0, 0] = np.nan
    sheared = good.copy()
    sheared[:3, :3] = sheared[:3, :3] @ np.diag([1.0, 1.3, 1.0])
    instances = [
        Instance("teapot", good, "a"),
        Instance("duck", nan_pose, "b"),
        Instance("duck", sheared, "c"),
        Instance("duck", behind, "d"),
        Instance("duck", outside, "e"),
        Instance("duck", np.eye(3), "f"),
        Instance("duck", good, "g"),
    ]
    results = refiner.refine(scene.observation, instances)
    assert [r.instance_id for r in results] == list("abcdefg")
    assert [r.status for r in results[:6]] == [
        RefineStatus.UNKNOWN_CLASS,
        RefineStatus.INVALID_POSE,
        RefineStatus.INVALID_POSE,
        RefineStatus.BEHIND_CAMERA,
        RefineStatus.OUTSIDE_IMAGE,
        RefineStatus.INVALID_POSE,
    ]
    for r in results[:6]:
        assert r.score == 0.0 and r.message and r.trace == []
    np.testing.assert_array_equal(results[3].pose, behind)
    assert results[6].status is RefineStatus.OK
    assert len(results[6].trace) == SHORT.outer_iterations * SHORT.inner_steps
    assert 0.0 <= results[6].score <= 1.0


def test_absurd_depth_costs_only_its_own_detection(refiner, scene):
    """A detection 1e17 m away is refused (TOO_FAR); the duck beside it is refined as if alone."""
    good = scene.instances[0].pose_init
    far = good.copy()
    far[:3, 3] *= 1e17 / far[2, 3]
    together = refiner.refine(scene.observation, [Instance("duck", far, "far"), Instance("duck", good, "ok")])
    alone = refiner.refine(scene.observation, [Instance("duck", good, "ok")])[0]
    assert together[0].status is RefineStatus.TOO_FAR and "depth limit" in together[0].message
    assert together[1].status is RefineStatus.OK
    np.testing.assert_allclose(together[1].pose, alone.pose, atol=1e-7)
    assert together[1].score == pytest.approx(alone.score, abs=1e-6)


class _FailsOnBall(ClassicalBackend):
    """The classical backend, failing inside a render iteration whenever a ball is in the batch."""

    def prepare_render(self, frame, poses, iteration):
        if any(model.class_id == "ball" for model in frame.models):
            raise RuntimeError("simulated stage failure")
        return super().prepare_render(frame, poses, iteration)


def test_engine_failure_costs_only_the_instances_it_concerns(registry, renderer, scene):
    backend = _FailsOnBall("cpu", ONE_STAGE, renderer)
    refiner = Refiner(registry, backend=backend, config=SHORT)
    ball = make_scene([registry["ball"]], 6, renderer).instances[0].pose_init
    duck = scene.instances[0].pose_init
    results = refiner.refine(scene.observation, [Instance("duck", duck, "d"), Instance("ball", ball, "b")])
    alone = refiner.refine(scene.observation, [Instance("duck", duck, "d")])[0]
    assert results[1].status is RefineStatus.ENGINE_ERROR and "simulated stage failure" in results[1].message
    np.testing.assert_array_equal(results[1].pose, ball)
    assert results[0].status is RefineStatus.OK
    np.testing.assert_allclose(results[0].pose, alone.pose, atol=1e-7)


def test_stop_ends_the_call_between_stages(refiner, scene):
    """``stop`` is polled before every stage: it ends the call within one stage, and a later call with
    ``stop`` never true refines normally."""
    polls = []

    def stop_after_five() -> bool:
        polls.append(1)
        return len(polls) > 5

    instances = [Instance("duck", i.pose_init) for i in scene.instances]
    with pytest.raises(RefinementCancelledError):
        refiner.refine(scene.observation, instances, stop=stop_after_five)
    assert len(polls) == 6
    assert all(
        r.status is RefineStatus.OK for r in refiner.refine(scene.observation, instances, stop=lambda: False)
    )


def test_large_frames_run_in_batches_of_max_batch(registry, renderer, scene):
    """Five instances with max_batch 2 run as batches of 2, 2, 1 and give the results of one batch."""
    chunked = Refiner(
        registry, config=replace(SHORT, max_batch=2), backend_config=ONE_STAGE, renderer=renderer
    )
    sizes = []
    prepare_frame = chunked.backend.prepare_frame
    chunked.backend.prepare_frame = lambda observation, models, poses: (
        sizes.append(len(models)) or prepare_frame(observation, models, poses)
    )
    instances = [Instance("duck", scene.instances[i % 2].pose_init, str(i)) for i in range(5)]
    whole = Refiner(registry, config=SHORT, backend_config=ONE_STAGE, renderer=renderer)
    results = zip(
        chunked.refine(scene.observation, instances), whole.refine(scene.observation, instances), strict=True
    )
    for a, b in results:
        assert a.instance_id == b.instance_id and a.status is b.status
        np.testing.assert_allclose(a.pose, b.pose, atol=1e-7)
    assert sizes == [2, 2, 1]


def test_empty_instance_list(refiner, scene):
    assert refiner.refine(scene.observation, []) == []


def test_batched_equals_one_by_one(registry, renderer):
    duck_scene = make_scene([registry["duck"], registry["duck"]], 5, renderer, MILD)
    ball_scene_pose = make_scene([registry["ball"]], 6, renderer).instances[0].pose_init
    refiner = Refiner(registry, config=SHORT, backend_config=ONE_STAGE, renderer=renderer)
    instances = [Instance(i.class_id, i.pose_init, i.instance_id) for i in duck_scene.instances]
    instances.append(Instance("ball", ball_scene_pose, "ball"))
    together = refiner.refine(duck_scene.observation, instances)
    for instance, batched in zip(instances, together, strict=True):
        alone = refiner.refine(duck_scene.observation, [instance])[0]
        assert alone.status == batched.status
        np.testing.assert_allclose(alone.pose, batched.pose, atol=1e-7)
        assert alone.score == pytest.approx(batched.score, abs=1e-6)
        for a, b in zip(alone.trace, batched.trace, strict=True):
            np.testing.assert_allclose(a.pose, b.pose, atol=1e-7)
            assert a.num_correspondences == b.num_correspondences


def test_result_fields_and_trace(refiner, scene):
    instance = scene.instances[0]
    result = refiner.refine(scene.observation, [Instance("duck", instance.pose_init, "x")])[0]
    assert result.class_id == "duck" and result.instance_id == "x"
    np.testing.assert_array_equal(result.initial_pose, instance.pose_init)
    assert result.pose.shape == (4, 4) and result.pose.dtype == np.float64
    R = result.pose[:3, :3]
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-9)
    for entry in result.trace:
        assert 0.0 <= entry.mean_weight <= 1.0
        assert entry.residual_px >= 0.0
        assert entry.num_correspondences > 0
    np.testing.assert_allclose(result.trace[-1].pose, result.pose, atol=1e-12)


def test_float_image_is_accepted(refiner, scene):
    pose = scene.instances[0].pose_init
    as_float = scene.image.astype(np.float32) / 255.0
    a = refiner.refine(Observation(as_float, scene.K), [Instance("duck", pose)])[0]
    b = refiner.refine(scene.observation, [Instance("duck", pose)])[0]
    np.testing.assert_allclose(a.pose, b.pose, atol=1e-9)


def test_unknown_backend_is_a_clear_error(registry):
    from rnnpose_ros.core.backends import BackendError

    with pytest.raises(BackendError, match="unknown backend"):
        Refiner(registry, backend="magic")


def test_rotation_hypotheses_turn_about_the_model_centre():
    rng = np.random.default_rng(0)
    pose = np.eye(4)
    pose[:3, :3] = Rotation.random(random_state=rng).as_matrix()
    pose[:3, 3] = (0.1, -0.05, 0.7)
    centre = np.array([0.01, 0.02, -0.03])
    hypotheses = rotation_hypotheses(pose, centre, 25.0)
    assert len(hypotheses) == 4
    turns = []
    for turned in hypotheses:
        np.testing.assert_allclose(
            turned[:3, :3] @ centre + turned[:3, 3], pose[:3, :3] @ centre + pose[:3, 3]
        )
        turn = Rotation.from_matrix(turned[:3, :3] @ pose[:3, :3].T).as_rotvec()
        assert np.degrees(np.linalg.norm(turn)) == pytest.approx(25.0)
        assert abs(turn[2]) < 1e-12  # about the camera's x or y axis
        turns.append(np.round(turn / np.linalg.norm(turn)).astype(int).tolist())
    assert sorted(turns) == sorted([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]])
    eight = rotation_hypotheses(pose, centre, 10.0, count=8)
    axes = [Rotation.from_matrix(t[:3, :3] @ pose[:3, :3].T).as_rotvec() for t in eight]
    azimuths = np.sort(np.degrees(np.arctan2([a[1] for a in axes], [a[0] for a in axes])) % 360)
    np.testing.assert_allclose(azimuths, np.arange(8) * 45.0, atol=1e-9)


def test_restarts_keep_the_best_scoring_hypothesis(registry, renderer, scene):
    """With every result counted weak, the refiner returns, per instance, the best-scoring OK result
    of the plain run and of the four hypotheses refined on their own."""
    plain = Refiner(registry, config=SHORT, backend_config=ONE_STAGE, renderer=renderer)
    always = Refiner(
        registry, config=replace(SHORT, restart_below_score=1.01), backend_config=ONE_STAGE, renderer=renderer
    )
    never = Refiner(
        registry, config=replace(SHORT, restart_below_score=0.0), backend_config=ONE_STAGE, renderer=renderer
    )
    instances = [Instance(i.class_id, i.pose_init, i.instance_id) for i in scene.instances]
    restarted = always.refine(scene.observation, instances)
    for instance, result in zip(instances, restarted, strict=True):
        model = registry[instance.class_id]
        starts = [instance.pose, *rotation_hypotheses(instance.pose, model.center, SHORT.restart_angle_deg)]
        candidates = [plain.refine(scene.observation, [Instance("duck", p)])[0] for p in starts]
        best = max((c for c in candidates if c.status is RefineStatus.OK), key=lambda c: c.score)
        assert result.score == pytest.approx(best.score, abs=1e-6)
        np.testing.assert_allclose(result.pose, best.pose, atol=1e-7)
        np.testing.assert_array_equal(result.initial_pose, instance.pose)
    # A threshold of 0 restarts nothing that succeeded: the plain results come back.
    expected = plain.refine(scene.observation, instances)
    for a, b in zip(never.refine(scene.observation, instances), expected, strict=True):
        np.testing.assert_allclose(a.pose, b.pose, atol=1e-9)


def test_frames_with_depth_restart_below_their_own_threshold(registry, renderer):
    """``restart_below_score_with_depth`` decides for an observation with depth, and only for it."""
    scene = make_scene([registry["duck"]], 4, renderer, replace(MILD, depth=DepthSensorModel()))
    config = replace(SHORT, restart_below_score=0.0, restart_below_score_with_depth=1.01)
    refiner = Refiner(registry, config=config, backend_config=ONE_STAGE, renderer=renderer)
    instances = [Instance(i.class_id, i.pose_init, i.instance_id) for i in scene.instances]
    rgb = Observation(scene.observation.image, scene.observation.K)
    assert [r.restarted for r in refiner.refine(rgb, instances)] == [False]
    assert [r.restarted for r in refiner.refine(scene.observation, instances)] == [True]
    assert replace(config, restart_below_score=None).restart_threshold(with_depth=True) is None


def test_converged_instances_stop_early_and_keep_their_pose(registry, renderer):
    """Started at the truth, an instance converges in its first render iteration: its pose is kept, its
    trace ends there, and a batch whose instances all converged ends early; a noisy neighbour in the
    same batch is refined as it is alone."""
    scene = make_scene([registry["duck"], registry["duck"]], 7, renderer, MILD)
    at_truth = Instance("duck", scene.instances[0].pose_gt, "truth")
    noisy = Instance("duck", scene.instances[1].pose_init, "noisy")
    rule = Convergence(min_iterations=1, flow_px=1.0, translation=0.01, rotation_rad=0.01)
    loop = replace(SHORT, outer_iterations=4, convergence=rule)
    # The default stages: the first (wide crop, translation only) settles at once on a true start.
    refiner = Refiner(registry, config=loop, renderer=renderer)
    alone = refiner.refine(scene.observation, [at_truth])[0]
    assert alone.status is RefineStatus.OK
    assert len(alone.trace) < loop.outer_iterations * loop.inner_steps
    np.testing.assert_allclose(alone.trace[-1].pose, alone.pose, atol=1e-12)
    full = Refiner(
        registry, config=replace(loop, convergence=None), backend_config=ONE_STAGE, renderer=renderer
    )
    assert (
        len(full.refine(scene.observation, [at_truth])[0].trace) == loop.outer_iterations * loop.inner_steps
    )

    together = refiner.refine(scene.observation, [at_truth, noisy])
    np.testing.assert_allclose(together[0].pose, alone.pose, atol=1e-7)
    assert len(together[0].trace) == len(alone.trace)
    noisy_alone = refiner.refine(scene.observation, [noisy])[0]
    np.testing.assert_allclose(together[1].pose, noisy_alone.pose, atol=1e-7)
    np.testing.assert_allclose(together[1].trace[-1].pose, together[1].pose, atol=1e-12)


def test_pixel_stride_counts_every_pixel_it_stands_for(registry, renderer, scene):
    """With the LM on every second row and column, a step's correspondence count (trace, and the
    too-few-correspondences rule) still counts the crop's pixels, not a quarter of them."""
    counts = {}
    for stride in (1, 2):
        loop = replace(SHORT, lm=replace(SHORT.lm, sparse=True, pixel_stride=stride))
        refiner = Refiner(registry, config=loop, backend_config=ONE_STAGE, renderer=renderer)
        result = refiner.refine(scene.observation, [Instance("duck", scene.instances[0].pose_init)])[0]
        assert result.status is RefineStatus.OK
        counts[stride] = result.trace[0].num_correspondences
    assert 0.8 < counts[2] / counts[1] < 1.25
