"""Parity checks of the training losses (``core/losses.py``) against the golden ``training`` fixtures.

The fixtures keep the published singleton frame axis (B, 1, …), dropped before calling our
batched API. Recorded random draws are replayed. Tolerances are those of the fixtures' README.
"""

from __future__ import annotations

import numpy as np
import torch

from rnnpose_ros.core.losses import (
    CircleConfig,
    DescriptorCorrespondences,
    LossWeights,
    circle_loss,
    descriptor_correspondences,
    descriptor_loss,
    descriptor_recall,
    flow_loss,
    flow_metrics,
    flow_targets,
    point_alignment_loss,
    relative_target,
    reprojection_loss,
)
from rnnpose_ros.tools.parity_common import Comparison, FixtureCheck, compare

EXACT = {"atol": 0.0, "rtol": 0.0}
POINTS_TOL = {"atol": 1e-6, "rtol": 0.0}
COORDS_TOL = {"atol": 1e-5, "rtol": 1e-6}
FEATS_TOL = {"atol": 1e-3, "rtol": 1e-5}
FEATS_LARGE_TOL = {"atol": 1e-5, "rtol": 1e-5}
CIRCLE_TOL = {"atol": 1e-6, "rtol": 1e-5}
RECALL_TOL = {"atol": 1e-7, "rtol": 0.0}
CIRCLE_GRAD_TOL = {"atol": 1e-6, "rtol": 1e-4}
FEATS_GRAD_TOL = {"atol": 1e-7, "rtol": 1e-4}
POSE_TOL = {"atol": 1e-6, "rtol": 0.0}
FLOW_STAR_TOL = {"atol": 1e-3, "rtol": 1e-5}
FLOW_LOSS_TOL = {"atol": 1e-6, "rtol": 1e-5}
REPROJ_TOL = {"atol": 1e-5, "rtol": 1e-5}
FLOW_GRAD_TOL = {"atol": 1e-10, "rtol": 1e-5}
REPROJ_GRAD_TOL = {"atol": 1e-3, "rtol": 1e-4}
ALIGN_TOL = {"atol": 2e-7, "rtol": 1e-5}
ALIGN_GRAD_TOL = {"atol": 1e-6, "rtol": 1e-5}
TOTAL_TOL = {"atol": 1e-5, "rtol": 1e-5}
#: feats_dist entries above this are compared with the tighter tolerance (README).
FEATS_LARGE = 0.05


def _circle(
    descriptor_map: torch.Tensor,
    descriptors_3d: torch.Tensor,
    depth: torch.Tensor,
    correspondences: DescriptorCorrespondences,
    random: dict,
):
    """Our circle loss at the published call site, replaying the recorded draws."""
    replay = (random["bg_sample_inds"].numpy(), random.get("permutation", torch.zeros(0)).long().numpy())
    return descriptor_loss(
        descriptor_map[0],
        descriptors_3d,
        depth[0, 0] > 0,
        correspondences,
        np.random.RandomState(int(random["np_seed"])),
        CircleConfig(),
        replay=replay,
    )


def _feats_comparisons(name: str, actual: torch.Tensor, expected: torch.Tensor) -> list[Comparison]:
    large = expected > FEATS_LARGE
    return [
        compare(name, actual, expected, **FEATS_TOL),
        compare(name + "[>0.05]", actual[large], expected[large], **FEATS_LARGE_TOL),
    ]


def _sections(fixture: dict) -> tuple[dict, dict, dict, dict]:
    """The inputs, intermediate values, outputs and gradients of a training-loss fixture."""
    return fixture["inputs"], fixture["intermediate"], fixture["outputs"], fixture["grads"]


def check_circle_loss(fixture: dict) -> list[Comparison]:
    """Pre-processing (lifting, radius matches), the sampled pairs, distances, loss, recall and the
    gradients of the circle loss; the core formula alone on the stored distances too."""
    pre = fixture["preprocess"]
    inputs, inter, out, grads = _sections(fixture)
    results: list[Comparison] = []
    corr = descriptor_correspondences(
        pre["raw_model_points"].numpy(), pre["depth_f64"].numpy(), pre["K"].numpy(), pre["RT"].numpy()
    )
    results += [
        compare(
            "preprocess.model_points", torch.from_numpy(corr.model_points), pre["model_points"], **POINTS_TOL
        ),
        compare(
            "preprocess.lifted_points",
            torch.from_numpy(corr.lifted_points),
            pre["lifted_points"],
            **POINTS_TOL,
        ),
        compare(
            "preprocess.correspondences_2d3d",
            torch.from_numpy(corr.matches),
            pre["correspondences_2d3d"],
            **EXACT,
        ),
    ]
    # The call site, on the stored pre-processing (so the rest is checked independently of it).
    stored = DescriptorCorrespondences(
        pre["model_points"].numpy(),
        pre["lifted_points"].numpy(),
        np.zeros((len(pre["lifted_points"]), 2), np.int64),
        pre["correspondences_2d3d"].numpy(),
    )
    descriptor_map = inputs["descriptors_2d_map"].clone().requires_grad_(True)
    descriptors_3d = inputs["descriptors_3d"].clone().requires_grad_(True)
    terms = _circle(descriptor_map, descriptors_3d, inputs["depth"], stored, fixture["random"])
    terms.loss.backward()
    selected = torch.from_numpy(terms.pairs.pairs)
    results += [
        compare("intermediate.correspondence_selected", selected, inter["correspondence_selected"], **EXACT),
        compare("intermediate.coords_dist", terms.coords_dist.detach(), inter["coords_dist"], **COORDS_TOL),
        *_feats_comparisons("intermediate.feats_dist", terms.feats_dist.detach(), inter["feats_dist"]),
        compare("outputs.circle_loss", terms.loss.detach(), out["circle_loss"], **CIRCLE_TOL),
        compare("outputs.loss", LossWeights().circle * terms.loss.detach(), out["loss"], **CIRCLE_TOL),
        compare("outputs.recall", terms.recall, out["recall"], **RECALL_TOL),
        compare(
            "grads.descriptors_2d_map", descriptor_map.grad, grads["descriptors_2d_map"], **CIRCLE_GRAD_TOL
        ),
        compare("grads.descriptors_3d", descriptors_3d.grad, grads["descriptors_3d"], **CIRCLE_GRAD_TOL),
    ]
    # The core formula alone on the stored distances.
    feats = inter["feats_dist"].clone().requires_grad_(True)
    core = circle_loss(inter["coords_dist"], feats)
    core.backward()
    results += [
        compare("core.circle_loss", core.detach(), out["circle_loss"], **CIRCLE_TOL),
        compare(
            "core.recall",
            descriptor_recall(inter["coords_dist"], inter["feats_dist"]),
            out["recall"],
            **RECALL_TOL,
        ),
        compare("grads.feats_dist", feats.grad, grads["feats_dist"], **FEATS_GRAD_TOL),
    ]
    return results


def check_flow_loss(fixture: dict) -> list[Comparison]:
    """Ground-truth flow and masks, flow loss, reprojection loss, metrics and gradients."""
    inputs, inter, out, grads = _sections(fixture)
    weights = LossWeights()
    K, Ti, T_gt = inputs["K"], inputs["Ti"][:, 0], inputs["T_gt"][:, 0]
    Tij = inputs["Tij"][:, 0].clone().requires_grad_(True)
    flow_pred = inputs["flow_pred"].clone().requires_grad_(True)
    targets = flow_targets(inputs["syn_depth"][:, 0], K, Ti, T_gt, Tij)
    loss, valid = flow_loss(flow_pred, targets)
    reproj = reprojection_loss(Tij, targets, K)
    (flow_grad,) = torch.autograd.grad(loss, flow_pred, retain_graph=True)
    (reproj_grad,) = torch.autograd.grad(reproj, Tij)
    total = weights.flow * loss + weights.reproj * reproj.detach()
    metrics = flow_metrics(flow_pred, targets, valid)
    results = [
        compare("intermediate.Gij", targets.relative_gt, inter["Gij"][:, 0], **POSE_TOL),
        compare(
            "intermediate.flow_star",
            targets.flow.permute(0, 2, 3, 1),
            inter["flow_star"][:, 0],
            **FLOW_STAR_TOL,
        ),
        compare("intermediate.valid_mask", targets.valid, inter["valid_mask"][:, 0, ..., 0], **EXACT),
        compare("intermediate.valid_final", valid, inter["valid_final"], **EXACT),
        compare("outputs.flow_loss", loss.detach(), out["flow_loss"], **FLOW_LOSS_TOL),
        compare("outputs.reproj_loss", reproj.detach(), out["reproj_loss"], **REPROJ_TOL),
        compare("outputs.total_loss", total.detach(), out["total_loss"], **FLOW_LOSS_TOL),
        compare("grads.flow_pred__flow_loss", flow_grad, grads["flow_pred__flow_loss"], **FLOW_GRAD_TOL),
        compare("grads.Tij__reproj_loss", reproj_grad[:, None], grads["Tij__reproj_loss"], **REPROJ_GRAD_TOL),
    ]
    results += [
        compare(f"outputs.metrics.{name}", torch.tensor(metrics[name]), torch.tensor(value), **FLOW_LOSS_TOL)
        for name, value in out["metrics"].items()
    ]
    return results


def check_align_loss(fixture: dict) -> list[Comparison]:
    """Point alignment loss and its gradients with respect to Tij and the predicted (R, t)."""
    inputs, inter, out, grads = _sections(fixture)
    Ti, T_gt = inputs["Ti"][:, 0], inputs["T_gt"][:, 0]
    Tij = inputs["Tij"][:, 0].clone().requires_grad_(True)
    relative_gt = relative_target(T_gt, Ti)
    pose_pred = Tij @ Ti
    pose_pred.retain_grad()
    pose_gt = relative_gt @ Ti
    loss = point_alignment_loss(inputs["points"], pose_pred, pose_gt).sum()
    loss.backward()
    return [
        compare("intermediate.Gij", relative_gt, inter["Gij"][:, 0], **POSE_TOL),
        compare("intermediate.Tj_pred", pose_pred.detach(), inter["Tj_pred"][:, 0], **POSE_TOL),
        compare("intermediate.Tj_gt", pose_gt, inter["Tj_gt"][:, 0], **POSE_TOL),
        compare("outputs.loss", loss.detach(), out["loss"], **ALIGN_TOL),
        compare("outputs.loss_per_sample_sum", loss.detach(), out["loss_per_sample_sum"], **ALIGN_TOL),
        compare("grads.Tij", Tij.grad[:, None], grads["Tij"], **ALIGN_GRAD_TOL),
        compare("grads.R_pred", pose_pred.grad[:, :3, :3], grads["R_pred"], **ALIGN_GRAD_TOL),
        compare("grads.t_pred", pose_pred.grad[:, :3, 3], grads["t_pred"], **ALIGN_GRAD_TOL),
    ]


def check_total_loss(fixture: dict) -> list[Comparison]:
    """Circle + the 12-iteration motion loss, per-iteration terms and all gradients."""
    inputs, inter, out, grads = _sections(fixture)
    weights = LossWeights()
    iterations = len(inputs["Tij"])
    per_render = iterations // len(inputs["Ti"])
    corr = DescriptorCorrespondences(
        inputs["model_points"].numpy(),
        inputs["lifted_points"].numpy(),
        np.zeros((len(inputs["lifted_points"]), 2), np.int64),
        inputs["correspondences_2d3d"].numpy(),
    )
    descriptor_map = inputs["descriptors_2d_map"].clone().requires_grad_(True)
    descriptors_3d = inputs["descriptors_3d"].clone().requires_grad_(True)
    circle = _circle(descriptor_map, descriptors_3d, inputs["depth"], corr, fixture["random"])
    Tij = inputs["Tij"][:, 0].clone().requires_grad_(True)
    flow = inputs["flow"].clone().requires_grad_(True)
    T_gt = inputs["T_gt"][:, 0]
    align_terms, flow_terms, reproj_terms, totals, relative_gts, valids = [], [], [], [], [], []
    loss = weights.circle * circle.loss
    motion = torch.zeros((), dtype=torch.float32)
    for i in range(iterations):
        r = i // per_render
        Ti = inputs["Ti"][r : r + 1, 0].detach()
        targets = flow_targets(
            inputs["syn_depth"][r : r + 1, 0], inputs["K"][r : r + 1], Ti, T_gt, Tij[i : i + 1]
        )
        flow_i, valid = flow_loss(flow[i : i + 1], targets)
        align_i = point_alignment_loss(
            inputs["original_model_points"], Tij[i : i + 1] @ Ti, targets.relative_gt @ Ti
        ).sum()
        reproj_i = reprojection_loss(Tij[i : i + 1].detach(), targets, inputs["K"][r : r + 1])
        total_i = weights.align * align_i + weights.flow * flow_i + weights.reproj * reproj_i
        motion = motion + total_i
        align_terms.append(align_i.detach())
        flow_terms.append(flow_i.detach())
        reproj_terms.append(reproj_i.detach())
        totals.append(total_i.detach())
        relative_gts.append(targets.relative_gt)
        valids.append(valid[0])
    loss = loss + motion
    loss.backward()
    return [
        compare("intermediate.Tij_gt", torch.stack(relative_gts), inter["Tij_gt"], **POSE_TOL),
        compare("intermediate.valid_final", torch.stack(valids), inter["valid_final"], **EXACT),
        compare(
            "intermediate.per_iteration_align",
            torch.stack(align_terms),
            inter["per_iteration_align"],
            **ALIGN_TOL,
        ),
        compare(
            "intermediate.per_iteration_flow",
            torch.stack(flow_terms),
            inter["per_iteration_flow"],
            **FLOW_LOSS_TOL,
        ),
        compare(
            "intermediate.per_iteration_reproj",
            torch.stack(reproj_terms),
            inter["per_iteration_reproj"],
            **REPROJ_TOL,
        ),
        compare(
            "intermediate.per_iteration_total",
            torch.stack(totals),
            inter["per_iteration_total"],
            **FLOW_LOSS_TOL,
        ),
        compare("outputs.circle_loss", circle.loss.detach(), out["circle_loss"], **CIRCLE_TOL),
        compare("outputs.recall", circle.recall, out["recall"], **RECALL_TOL),
        compare("outputs.loss", loss.detach(), out["loss"], **TOTAL_TOL),
        compare("grads.Tij", Tij.grad[:, None], grads["Tij"], **ALIGN_GRAD_TOL),
        compare("grads.flow", flow.grad, grads["flow"], **FLOW_GRAD_TOL),
        compare(
            "grads.descriptors_2d_map", descriptor_map.grad, grads["descriptors_2d_map"], **CIRCLE_GRAD_TOL
        ),
        compare("grads.descriptors_3d", descriptors_3d.grad, grads["descriptors_3d"], **CIRCLE_GRAD_TOL),
    ]


CHECKS: dict[str, FixtureCheck] = {
    "circle_loss": check_circle_loss,
    "flow_loss": check_flow_loss,
    "align_loss": check_align_loss,
    "total_loss": check_total_loss,
}
