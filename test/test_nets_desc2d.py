"""2D descriptor U-Net: golden parity (published fixture) and fixture-free properties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rnnpose_ros.core.nets.desc2d import Desc2DInputError, Desc2DNet

from conftest import STATE_DICT_SPEC, run_check_parity

PREFIX = "hybrid_desc_net.corr_fea_extractor_2d."


@pytest.fixture(scope="module")
def net() -> Desc2DNet:
    torch.manual_seed(0)
    return Desc2DNet().eval()


def test_golden_parity(golden: Path) -> None:
    result = run_check_parity(golden, "desc2d")
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "desc2d.pt:intermediate.decode3_out_center16" in result.stdout


def test_state_dict_keys_match_published_checkpoint(net: Desc2DNet) -> None:
    if not STATE_DICT_SPEC.is_file():
        pytest.skip(f"published state-dict listing not found at {STATE_DICT_SPEC}")
    published = {
        k[len(PREFIX) :]: shape
        for k, shape in json.loads(STATE_DICT_SPEC.read_text())
        if k.startswith(PREFIX)
    }
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert ours == published


def test_non_square_shapes_and_unit_descriptors(net: Desc2DNet) -> None:
    image = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        out = net(image)
        with_scores = net(image, with_scores=True)
    assert out.scores is None
    assert out.descriptors.shape == (1, 32, 32, 48)
    torch.testing.assert_close(out.descriptors.norm(dim=1), torch.ones(1, 32, 48))
    assert with_scores.scores.shape == (1, 1, 32, 48)
    assert bool(((with_scores.scores > 0) & (with_scores.scores < 1)).all())
    torch.testing.assert_close(with_scores.descriptors, out.descriptors, rtol=0, atol=0)


def test_batch_of_two_equals_two_singles(net: Desc2DNet) -> None:
    images = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        batched = net(images, with_scores=True)
        singles = [net(images[i : i + 1], with_scores=True) for i in range(2)]
    torch.testing.assert_close(
        batched.descriptors, torch.cat([s.descriptors for s in singles]), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(batched.scores, torch.cat([s.scores for s in singles]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 30, 32), (1, 3, 32, 36), (3, 32, 32), (1, 1, 32, 32)])
def test_rejects_images_it_cannot_process(net: Desc2DNet, shape: tuple[int, ...]) -> None:
    with pytest.raises(Desc2DInputError):
        net(torch.rand(*shape))
