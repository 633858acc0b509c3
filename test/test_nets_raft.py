"""RAFT encoder, correlation pyramid, update block and convex upsampling.

Golden parity (published fixtures) plus fixture-free properties: batching, non-square maps,
channel order of the correlation window, convex-upsampling layout, mixed-precision selection.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rnnpose_ros.core.nets.raft import (
    BasicEncoder,
    BasicUpdateBlock,
    CorrelationInputError,
    CorrPyramid,
    autocast_context,
    autocast_enabled,
    convex_upsample,
    coords_grid,
    encode_image_pair,
    published_encoder_input,
    run_update_block,
)
from rnnpose_ros.tools.parity_common import load_fixture
from rnnpose_ros.tools.parity_nets2d import check_corr_lookup

from conftest import STATE_DICT_SPEC, run_check_parity


def published_shapes(prefix: str) -> dict[str, list[int]]:
    if not STATE_DICT_SPEC.is_file():
        pytest.skip(f"published state-dict listing not found at {STATE_DICT_SPEC}")
    entries = json.loads(STATE_DICT_SPEC.read_text())
    return {k[len(prefix) :]: shape for k, shape in entries if k.startswith(prefix)}


@pytest.fixture(scope="module")
def encoder() -> BasicEncoder:
    torch.manual_seed(0)
    return BasicEncoder().eval()


@pytest.fixture(scope="module")
def update_block() -> BasicUpdateBlock:
    torch.manual_seed(1)
    return BasicUpdateBlock().eval()


# -- golden ---------------------------------------------------------------------------------------


def test_golden_parity_encoder_and_update_block(golden: Path) -> None:
    result = run_check_parity(golden, "raft_encoder", "update_block")
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "update_block.pt:upsample_nonsquare" in result.stdout


def test_golden_parity_corr_lookup(golden: Path) -> None:
    # Matmul + pooling + grid_sample only: no oneDNN kernel choice involved, so it runs in-process.
    comparisons = check_corr_lookup(load_fixture(golden / "corr_lookup.pt"))
    assert len(comparisons) == 4
    assert all(c.passed for c in comparisons), comparisons


# -- state dict layout ------------------------------------------------------------------------------


def test_state_dict_keys_match_published_checkpoint(
    encoder: BasicEncoder, update_block: BasicUpdateBlock
) -> None:
    for module, prefix in [
        (encoder, "motion_net.image_fea_enc.fnet."),
        (update_block, "motion_net.cf_net.update_block."),
    ]:
        ours = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert ours == published_shapes(prefix)


# -- encoder --------------------------------------------------------------------------------------------


def test_published_input_transform_range() -> None:
    out = published_encoder_input(torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(out, torch.tensor([-1.0, 2 * 0.5 / 255 - 1, 2 / 255 - 1]))


def test_encoder_non_square_and_batching(encoder: BasicEncoder) -> None:
    images = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        batched = encoder(published_encoder_input(images))
        singles = torch.cat([encoder(published_encoder_input(images[i : i + 1])) for i in range(2)])
    assert batched.shape == (2, 256, 6, 8)
    torch.testing.assert_close(batched, singles, atol=1e-4, rtol=1e-5)


def test_encode_image_pair_splits_rendered_and_observed(encoder: BasicEncoder) -> None:
    rendered, observed = torch.rand(1, 3, 32, 40), torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        f_rendered, f_observed = encode_image_pair(encoder, rendered, observed, mixed_precision=True)
        direct = encoder(published_encoder_input(torch.cat([rendered, observed])))
    assert f_rendered.dtype == torch.float32
    # mixed_precision has no effect on CPU: same numbers as the plain float32 call.
    torch.testing.assert_close(torch.cat([f_rendered, f_observed]), direct, atol=0, rtol=0)


# -- correlation ---------------------------------------------------------------------------------------


def test_lookup_at_integer_coords_matches_dot_products_and_channel_order() -> None:
    torch.manual_seed(2)
    batch, channels, height, width = 2, 8, 5, 7
    fmap1, fmap2 = torch.randn(batch, channels, height, width), torch.randn(batch, channels, height, width)
    radius = 2
    pyramid = CorrPyramid(fmap1, fmap2, num_levels=1, radius=radius)
    coords = coords_grid(batch, height, width)
    coords[:, 0] += 1.0  # shift x so that windows reach outside the map on the right
    corr = pyramid.lookup(coords)
    side = 2 * radius + 1
    assert corr.shape == (batch, side * side, height, width)
    for b, y, x in [(0, 0, 0), (1, 4, 6), (1, 2, 3)]:
        for a in range(side):
            for c in range(side):
                qx, qy = x + 1 + a - radius, y + c - radius  # first window index moves x
                inside = 0 <= qx < width and 0 <= qy < height
                expected = (fmap1[b, :, y, x] @ fmap2[b, :, qy, qx]) / math.sqrt(channels) if inside else 0.0
                torch.testing.assert_close(
                    corr[b, side * a + c, y, x], torch.as_tensor(expected), atol=1e-5, rtol=1e-5
                )


def test_pyramid_levels_are_average_pooled_over_the_second_map() -> None:
    fmap1, fmap2 = torch.randn(1, 4, 3, 5), torch.randn(1, 4, 9, 6)
    pyramid = CorrPyramid(fmap1, fmap2, num_levels=3, radius=1)
    assert [tuple(level.shape) for level in pyramid.levels] == [(15, 1, 9, 6), (15, 1, 4, 3), (15, 1, 2, 1)]
    torch.testing.assert_close(pyramid.levels[1], F.avg_pool2d(pyramid.levels[0], 2, 2))
    coords = coords_grid(1, 3, 5) + 0.3
    corr = pyramid.lookup(coords)
    assert corr.shape == (1, 3 * 9, 3, 5)
    # The 2×1 top level: at its own pixel (0, 0) (window centre offset 0, 0 → channel 18 + 4) the
    # lookup returns the stored value; one pixel right of a 1-wide map it is zero.
    top = pyramid.levels[2].view(3, 5, 2, 1)
    at_origin = CorrPyramid(fmap1, fmap2, num_levels=3, radius=1).lookup(torch.zeros(1, 2, 3, 5))
    torch.testing.assert_close(at_origin[0, 18 + 4], top[:, :, 0, 0])
    torch.testing.assert_close(at_origin[0, 18 + 7], torch.zeros(3, 5))


def test_lookup_batch_equals_singles() -> None:
    fmap1, fmap2 = torch.randn(2, 16, 8, 12), torch.randn(2, 16, 8, 12)
    coords = coords_grid(2, 8, 12) + 3 * torch.randn(2, 2, 8, 12)
    batched = CorrPyramid(fmap1, fmap2).lookup(coords)
    singles = [CorrPyramid(fmap1[i : i + 1], fmap2[i : i + 1]).lookup(coords[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(batched, torch.cat(singles), atol=1e-5, rtol=1e-5)


def test_correlation_shape_errors() -> None:
    with pytest.raises(CorrelationInputError):
        CorrPyramid(torch.randn(1, 8, 4, 4), torch.randn(1, 6, 4, 4))
    with pytest.raises(CorrelationInputError, match="too small"):
        CorrPyramid(torch.randn(1, 8, 6, 10), torch.randn(1, 8, 6, 10), num_levels=4)
    pyramid = CorrPyramid(torch.randn(1, 8, 4, 5), torch.randn(1, 8, 4, 5), num_levels=2)
    with pytest.raises(CorrelationInputError):
        pyramid.lookup(torch.zeros(1, 2, 5, 4))


# -- update block ----------------------------------------------------------------------------------------


def _update_inputs(batch: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
    net = torch.tanh(torch.randn(batch, 128, height, width))
    inp = torch.relu(torch.randn(batch, 128, height, width))
    corr = torch.randn(batch, 324, height, width)
    flow = torch.randn(batch, 2, height, width)
    return net, inp, corr, flow


def test_update_block_non_square_batch_equals_singles(update_block: BasicUpdateBlock) -> None:
    inputs = _update_inputs(2, 6, 10)
    with torch.no_grad():
        batched = update_block(*inputs)
        singles = [update_block(*(t[i : i + 1] for t in inputs)) for i in range(2)]
    assert batched.net.shape == (2, 128, 6, 10)
    assert batched.up_mask.shape == (2, 576, 6, 10)
    assert batched.delta_flow.shape == (2, 2, 6, 10)
    for field in range(3):
        torch.testing.assert_close(
            batched[field], torch.cat([s[field] for s in singles]), atol=1e-5, rtol=1e-5
        )


def test_mixed_precision_selection_is_cuda_only(update_block: BasicUpdateBlock) -> None:
    assert autocast_enabled("cuda", True)
    assert autocast_enabled(torch.device("cuda", 0), True)
    assert not autocast_enabled("cuda", False)
    assert not autocast_enabled("cpu", True)
    assert isinstance(autocast_context("cpu", True), contextlib.nullcontext)
    inputs = _update_inputs(1, 4, 6)
    with torch.no_grad():
        mixed = run_update_block(update_block, *inputs, mixed_precision=True)
        plain = update_block(*inputs)
    for field in range(3):
        assert mixed[field].dtype == torch.float32
        torch.testing.assert_close(mixed[field], plain[field], atol=0, rtol=0)


# -- convex upsampling ------------------------------------------------------------------------------------


def _naive_convex_upsample(flow: torch.Tensor, mask: torch.Tensor, factor: int) -> torch.Tensor:
    batch, channels, height, width = flow.shape
    padded = F.pad(factor * flow, (1, 1, 1, 1))
    out = torch.zeros(batch, channels, factor * height, factor * width, dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            for i in range(factor):
                for j in range(factor):
                    logits = torch.stack(
                        [mask[:, k * factor * factor + i * factor + j, y, x] for k in range(9)], dim=1
                    )
                    weights = torch.softmax(logits.double(), dim=1)  # (B, 9)
                    neighbours = torch.stack(
                        [padded[:, :, y + k // 3, x + k % 3] for k in range(9)], dim=-1
                    ).double()  # (B, C, 9)
                    out[:, :, factor * y + i, factor * x + j] = (neighbours * weights[:, None]).sum(-1)
    return out.float()


def test_convex_upsample_matches_naive_definition_non_square() -> None:
    factor = 2
    flow, mask = torch.randn(2, 2, 3, 4), torch.randn(2, 9 * factor * factor, 3, 4)
    out = convex_upsample(flow, mask, factor=factor)
    assert out.shape == (2, 2, 6, 8)
    torch.testing.assert_close(out, _naive_convex_upsample(flow, mask, factor), atol=1e-5, rtol=1e-5)


def test_convex_upsample_of_constant_flow() -> None:
    height, width = 5, 7
    flow = torch.tensor([1.5, -0.25]).view(1, 2, 1, 1).expand(1, 2, height, width)
    expected = 8 * flow[:, :, :1, :1]
    # Any mask: away from the zero-padded border every neighbour carries the constant.
    out = convex_upsample(flow, torch.randn(1, 576, height, width))
    assert out.shape == (1, 2, 8 * height, 8 * width)
    torch.testing.assert_close(out[:, :, 8:-8, 8:-8], expected.expand(1, 2, 8 * height - 16, 8 * width - 16))
    # All weight on the centre neighbour: the whole field, borders included.
    centre = torch.full((1, 9, 64, height, width), -1e4)
    centre[:, 4] = 0.0
    out = convex_upsample(flow, centre.view(1, 576, height, width))
    torch.testing.assert_close(out, expected.expand(1, 2, 8 * height, 8 * width))


def test_convex_upsample_rejects_mismatched_mask() -> None:
    with pytest.raises(ValueError):
        convex_upsample(torch.zeros(1, 2, 4, 6), torch.zeros(1, 576, 6, 4))
