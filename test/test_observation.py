"""Observation: the engine's input, validated once at its edge."""

from __future__ import annotations

import numpy as np
import pytest

from rnnpose_ros.core.observation import InputError, Observation

K = np.array([[500.0, 0.0, 32.0], [0.0, 500.0, 24.0], [0.0, 0.0, 1.0]])
IMAGE = np.zeros((48, 64, 3), np.uint8)


def test_depth_is_float_metres_with_unknown_pixels_as_zero() -> None:
    depth = np.full((48, 64), 0.8, np.float64)
    depth[0, :3] = (np.nan, -1.0, np.inf)
    checked = Observation(IMAGE, K, depth=depth).validated().depth
    assert checked.dtype == np.float32 and checked.shape == (48, 64)
    assert checked[0, :3].tolist() == [0.0, 0.0, 0.0] and checked[1, 0] == pytest.approx(0.8)
    assert Observation(IMAGE, K).validated().depth is None


@pytest.mark.parametrize(
    ("depth", "match"),
    [
        (np.zeros((24, 32), np.float32), "image's size"),
        (np.zeros((48, 64), np.uint16), "floating-point metres"),
        ([[0.5]], "numpy array"),
    ],
)
def test_unusable_depth_is_an_input_error(depth, match: str) -> None:
    with pytest.raises(InputError, match=match):
        Observation(IMAGE, K, depth=depth).validated()
