"""CPU thread settings (core/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import pytest
import torch

from rnnpose_ros.core.threads import available_cores, configure_threads


def test_configure_threads_sets_the_pool() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 == torch.get_num_threads() == cv2.getNumThreads()
        assert configure_threads(0) == available_cores()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads"):
        configure_threads(-1)


def test_passive_waiting_applies_before_torch_and_keeps_a_user_value() -> None:
    """In a fresh interpreter: set before torch is imported, a user's value is kept."""
    code = (
        "import os, sys\n"
        "from rnnpose_ros.core.threads import prefer_passive_waiting\n"
        "print(prefer_passive_waiting(), os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    fresh = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert fresh.stdout.split() == ["True", "PASSIVE"]
    kept = subprocess.run(
        [sys.executable, "-c", code],
        env=env | {"OMP_WAIT_POLICY": "ACTIVE"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert kept.stdout.split() == ["True", "ACTIVE"]
