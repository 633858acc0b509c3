"""CPU thread settings of the engine: passive waiting and a bounded intra-op pool.

On a CPU shared with other processes (a robot's computer, a CI machine), OpenMP worker threads that
spin while waiting for work take cores from the threads doing it: measured on a loaded 2-core
machine, stages ran 1.6–7× slower with the default (spinning) wait policy than with passive
waiting. Two settings fix that:

- ``OMP_WAIT_POLICY=PASSIVE`` (:func:`prefer_passive_waiting`): read by the OpenMP runtime when it
  loads, i.e. on the first ``import torch``; it must be set before that, so entry points call this
  first. A value the user set is kept.
- the size of torch's intra-op pool and of OpenCV's (the classical backend's flow) pool
  (:func:`configure_threads`): by default the cores this process may run on, as given by its CPU
  affinity (a container or ``taskset`` limit), not the machine's count; one inter-op thread (the
  engine runs one stage at a time).
"""

from __future__ import annotations

import contextlib
import os
import sys

#: Environment defaults applied by :func:`prefer_passive_waiting` (never over a user's value).
PASSIVE_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def prefer_passive_waiting() -> bool:
    """Set :data:`PASSIVE_ENVIRONMENT` where unset; returns whether it can still take effect (torch
    not imported yet in this process)."""
    for name, value in PASSIVE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    return "torch" not in sys.modules


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without affinity masks
        return max(1, os.cpu_count() or 1)


def configure_threads(num_threads: int = 0) -> int:
    """Size torch's thread pools for the engine.

    Args:
        num_threads: intra-op threads of torch and OpenCV; 0 = :func:`available_cores`.

    Returns:
        The intra-op thread count now in effect.

    Raises:
        ValueError: ``num_threads`` is negative.
    """
    import cv2
    import torch

    if num_threads < 0:
        raise ValueError(f"num_threads must be ≥ 0 (0 = all available cores), got {num_threads}")
    torch.set_num_threads(num_threads or available_cores())
    cv2.setNumThreads(torch.get_num_threads())
    # Only possible before the first inter-op work; after it the pool stays as it is.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()
