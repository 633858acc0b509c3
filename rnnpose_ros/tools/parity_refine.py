"""Parity of one render iteration of the recurrent refiner (kind ``refine_core``).

The fixture holds the fixed rendered/observed inputs, every per-step tensor of the published
``PoseRefiner.forward`` and, under ``weights_from``, the sibling fixture files whose weights it
used (RAFT encoder, update block, σ). Tolerances: ``shared/golden/README.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rnnpose_ros.core.loop import run_render_iteration
from rnnpose_ros.core.model import RNNPoseNet, published_to_ours
from rnnpose_ros.core.recurrent import (
    RenderedReference,
    predict_correspondences,
    solver_depth,
    start_render_iteration,
)
from rnnpose_ros.core.solver import LMConfig
from rnnpose_ros.tools.parity_common import Comparison, FixtureCheck, compare, float_state_dict, load_fixture

FLOW_TOL = {"atol": 1e-3, "rtol": 1e-4}
WEIGHT_TOL = {"atol": 1e-4, "rtol": 1e-4}
POSE_TOL = {"atol": 1e-5, "rtol": 0.0}
GRU_TOL = {"atol": 1e-5, "rtol": 1e-5}
LM_TOL = {"atol": 0.0, "rtol": 1e-6}
DELTA_TOL = {"atol": 1e-6, "rtol": 1e-6}
#: Not listed in the README table: H and b follow the flow, so they inherit its looser agreement.
H_TOL = {"atol": 0.0, "rtol": 1e-3}


def load_referenced_weights(fixture: dict, fixture_dir: Path) -> RNNPoseNet:
    """An RNNPoseNet whose fnet / update block / σ come from the files named in ``weights_from``."""
    net = RNNPoseNet().eval()
    ours = net.state_dict()
    for prefix, source in fixture["weights_from"].items():
        sibling = load_fixture(fixture_dir / source.split()[0])
        if "sigma" in source:
            ours["sigma"] = sibling["sigma"].float().reshape(ours["sigma"].shape)
            continue
        for key, value in float_state_dict(sibling["state_dict"]).items():
            ours[published_to_ours(prefix + key)] = value
    net.load_state_dict(ours)
    return net


def reference_from_fixture(inputs: dict) -> RenderedReference:
    """Expand the fixture's compact inputs exactly as its ``*_rule`` strings describe."""
    depth = inputs["syn_depth"][:, 0]
    height, width = depth.shape[-2:]
    factor_h = height // inputs["rendered_feat_lowres"].shape[-2]
    factor_w = width // inputs["rendered_feat_lowres"].shape[-1]
    features = inputs["rendered_feat_lowres"].repeat_interleave(factor_h, 2).repeat_interleave(factor_w, 3)
    features = features * (inputs["syn_depth"] > 0)
    observed = inputs["observed_desc2d_lowres"].repeat_interleave(factor_h, 2).repeat_interleave(factor_w, 3)
    return RenderedReference(
        rgb=inputs["rendered_rgb"],
        context=features[:, :256],
        descriptors=features[:, 256:],
        depth=depth,
        observed_rgb=inputs["observed_rgb"],
        observed_descriptors=observed,
        K=inputs["K240"],
    )


def check_refine_core(fixture: dict, fixture_dir: Path) -> list[Comparison]:
    """Per-step flows, weights, GRU state, normal equations and poses, plus the final pose."""
    net = load_referenced_weights(fixture, fixture_dir)
    inputs = fixture["inputs"]
    reference = reference_from_fixture(inputs)
    expected = fixture["per_step"]
    num_steps = expected["Tij_in"].shape[0]
    results = [
        compare(
            "inputs.rendered_feat_checksum",
            torch.cat([reference.context, reference.descriptors], 1).double().sum(),
            torch.tensor(inputs["rendered_feat_checksum"], dtype=torch.float64),
            atol=1e-3,
            rtol=1e-9,
        )
    ]
    with torch.no_grad():
        state = start_render_iteration(net, reference)
        results.append(compare("gru_init_net", state.hidden, fixture["gru_init_net"], **GRU_TOL))
        results.append(compare("gru_init_inp", state.context, fixture["gru_init_inp"], **GRU_TOL))
        trace = list(
            run_render_iteration(
                lambda Tij, _: predict_correspondences(net, state, Tij),
                solver_depth(reference.depth),
                reference.K,
                inputs["Tij0"][:, 0],
                num_steps,
                LMConfig(),
            )
        )
    Tij = trace[-1].solve.pose
    per_step = {
        "Tij_in": [s.pose_in for s in trace],
        "flow_init": [s.correspondences.flow_init for s in trace],
        "coarse_flow_in": [s.correspondences.coarse_flow for s in trace],
        "delta_flow": [s.correspondences.delta_flow for s in trace],
        "flow": [s.correspondences.flow for s in trace],
        "weight": [s.correspondences.weight for s in trace],
        "gru_net": [s.correspondences.hidden for s in trace],
        "H_damped": [s.solve.hessian for s in trace],
        "b": [s.solve.gradient for s in trace],
        "delta": [s.solve.delta for s in trace],
        "Tij_out": [s.solve.pose for s in trace],
    }
    tolerances = {
        "Tij_in": POSE_TOL,
        "flow_init": FLOW_TOL,
        "coarse_flow_in": FLOW_TOL,
        "delta_flow": FLOW_TOL,
        "flow": FLOW_TOL,
        "weight": WEIGHT_TOL,
        "gru_net": GRU_TOL,
        "H_damped": H_TOL,
        "b": H_TOL,
        "delta": POSE_TOL,
        "Tij_out": POSE_TOL,
    }
    for name, values in per_step.items():
        reference_values = expected[name]
        actual = torch.stack(values).reshape(reference_values.shape)
        results.append(compare(f"per_step.{name}", actual, reference_values, **tolerances[name]))
    Ti_pred = Tij @ inputs["Ti"]
    results.append(
        compare("Ti_pred", Ti_pred.reshape(fixture["Ti_pred"].shape), fixture["Ti_pred"], **POSE_TOL)
    )
    return results


CHECKS: dict[str, FixtureCheck] = {"refine_core": check_refine_core}
