"""Parity checks of the 2D networks against golden fixtures of the published implementation.

Kinds: ``desc2d``, ``raft_encoder``, ``corr_lookup``, ``update_block``, ``confidence`` (format and
tolerances: ``shared/golden/README.md``). Every check reads its sizes, batch and layout from the
fixture, so fixtures made at other sizes, seeds or batch sizes are checked the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rnnpose_ros.core.nets.confidence import descriptor_confidence
from rnnpose_ros.core.nets.desc2d import Desc2DNet
from rnnpose_ros.core.nets.raft import (
    BasicEncoder,
    BasicUpdateBlock,
    CorrPyramid,
    convex_upsample,
    published_encoder_input,
)
from rnnpose_ros.tools.parity_common import Comparison, FixtureCheck, compare, float_state_dict

# Golden README tolerances.
DESC2D_TOL = {"atol": 1e-5, "rtol": 1e-5}
RAFT_FEATURES_TOL = {"atol": 1e-4, "rtol": 1e-5}
CORR_TOL = {"atol": 1e-4, "rtol": 1e-5}
UPDATE_TOL = {"atol": 1e-5, "rtol": 1e-5}
CONFIDENCE_TOL = {"atol": 1e-5, "rtol": 1e-5}


def _center_crop(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Central ``height``×``width`` window of a (..., H, W) tensor (rows/cols 24:40 of 64 for 16)."""
    top = (tensor.shape[-2] - height) // 2
    left = (tensor.shape[-1] - width) // 2
    return tensor[..., top : top + height, left : left + width]


def check_desc2d(fixture: dict, fixture_dir: Path | None = None) -> list[Comparison]:
    """Descriptors, scores and the stored encoder / skip / decoder intermediates."""
    del fixture_dir
    state = float_state_dict(fixture["state_dict"])
    net = Desc2DNet(descriptor_dim=state["convDb.weight"].shape[0]).eval()
    net.load_state_dict(state)
    intermediate = fixture.get("intermediate", {})
    with torch.no_grad():
        encoded, skip_half, skip_quarter = net.encode(fixture["input_image"])
        decoded = net.decode(encoded, skip_half, skip_quarter)
        results = [
            compare("descriptors", net.descriptor_head(decoded), fixture["descriptors"], **DESC2D_TOL),
            compare("scores", net.score_head(decoded), fixture["scores"], **DESC2D_TOL),
        ]
    if "encoder_out" in intermediate:
        results.append(
            compare("intermediate.encoder_out", encoded, intermediate["encoder_out"], **DESC2D_TOL)
        )
    if "skip_16" in intermediate:
        results.append(compare("intermediate.skip_16", skip_quarter, intermediate["skip_16"], **DESC2D_TOL))
    if "decode3_out_center16" in intermediate:
        expected = intermediate["decode3_out_center16"]
        actual = _center_crop(decoded, *expected.shape[-2:])
        results.append(compare("intermediate.decode3_out_center16", actual, expected, **DESC2D_TOL))
    return results


def check_raft_encoder(fixture: dict, fixture_dir: Path | None = None) -> list[Comparison]:
    """Encoder features (and layer3 output) of the stored [0, 1] images after the published transform."""
    del fixture_dir
    state = float_state_dict(fixture["state_dict"])
    encoder = BasicEncoder(output_dim=state["conv2.weight"].shape[0]).eval()
    encoder.load_state_dict(state)
    with torch.no_grad():
        trunk = encoder.trunk(published_encoder_input(fixture["images"]))
        features = encoder.conv2(trunk)
    results = [compare("features", features, fixture["features"], **RAFT_FEATURES_TOL)]
    if "layer3_out" in fixture.get("intermediate", {}):
        results.append(
            compare(
                "intermediate.layer3_out", trunk, fixture["intermediate"]["layer3_out"], **RAFT_FEATURES_TOL
            )
        )
    return results


def check_corr_lookup(fixture: dict, fixture_dir: Path | None = None) -> list[Comparison]:
    """Lookup output and the pooled pyramid levels 1… from the stored feature maps and coordinates."""
    del fixture_dir
    pyramid = CorrPyramid(
        fixture["fmap1"],
        fixture["fmap2"],
        num_levels=int(fixture.get("num_levels", 4)),
        radius=int(fixture.get("radius", 4)),
    )
    results = [compare("corr", pyramid.lookup(fixture["coords"]), fixture["corr"], **CORR_TOL)]
    for level, expected in enumerate(fixture.get("pyramid_levels_1_to_3", []), start=1):
        results.append(compare(f"pyramid_level_{level}", pyramid.levels[level], expected, **CORR_TOL))
    return results


def check_update_block(fixture: dict, fixture_dir: Path | None = None) -> list[Comparison]:
    """One update-block call, and convex upsampling (square and non-square) from the stored inputs."""
    del fixture_dir
    state = float_state_dict(fixture["state_dict"])
    radius = int(fixture.get("radius", 4))
    corr_channels = state["encoder.convc1.weight"].shape[1]
    block = BasicUpdateBlock(
        corr_levels=corr_channels // (2 * radius + 1) ** 2,
        corr_radius=radius,
        hidden_dim=fixture["net"].shape[1],
        input_dim=fixture["inp"].shape[1],
    ).eval()
    block.load_state_dict(state)
    with torch.no_grad():
        out = block(fixture["net"], fixture["inp"], fixture["corr"], fixture["flow"])
        results = [
            compare("net_out", out.net, fixture["net_out"], **UPDATE_TOL),
            compare("up_mask", out.up_mask, fixture["up_mask"], **UPDATE_TOL),
            compare("delta_flow", out.delta_flow, fixture["delta_flow"], **UPDATE_TOL),
            compare(
                "upsample_input_flow",
                fixture["flow"] + out.delta_flow,
                fixture["upsample_input_flow"],
                **UPDATE_TOL,
            ),
            compare(
                "upsampled_flow",
                convex_upsample(fixture["upsample_input_flow"], fixture["up_mask"]),
                fixture["upsampled_flow"],
                **UPDATE_TOL,
            ),
        ]
        if "upsample_nonsquare" in fixture:
            case = fixture["upsample_nonsquare"]
            results.append(
                compare(
                    "upsample_nonsquare",
                    convex_upsample(case["flow"], case["mask"]),
                    case["out"],
                    **UPDATE_TOL,
                )
            )
    return results


def check_confidence(fixture: dict, fixture_dir: Path | None = None) -> list[Comparison]:
    """Targets, warped descriptors, similarity and weight under the published sampling conventions.

    The fixture keeps the published frame axis ((B, 1, H, W, k) layouts); ours has none, so the
    references are reshaped to our layout before comparing.
    """
    del fixture_dir
    with torch.no_grad():
        result = descriptor_confidence(
            fixture["geofea_rendered"],
            fixture["geofea_observed"],
            fixture["flow"],
            fixture["syn_depth"],
            fixture["sigma"],
            published_conventions=True,
        )
    batch, height, width = result.similarity.shape

    def as_ours(name: str, *trailing: int) -> torch.Tensor:
        return fixture[name].reshape(batch, height, width, *trailing)

    return [
        compare(
            "correspondence_target", result.target, as_ours("correspondence_target", 2), **CONFIDENCE_TOL
        ),
        compare("warped_observed", result.warped_observed, fixture["warped_observed"], **CONFIDENCE_TOL),
        compare("similarity", result.similarity, as_ours("similarity"), **CONFIDENCE_TOL),
        compare("weight", result.weight, as_ours("weight"), **CONFIDENCE_TOL),
    ]


CHECKS: dict[str, FixtureCheck] = {
    "desc2d": check_desc2d,
    "raft_encoder": check_raft_encoder,
    "corr_lookup": check_corr_lookup,
    "update_block": check_update_block,
    "confidence": check_confidence,
}
