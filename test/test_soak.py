"""The soak tool's verdict: memory growth between the first and last quarter after the warm-up minute,
and frames accounted for (the end-to-end run is a tool, not a test: it takes minutes)."""

from __future__ import annotations

import argparse

import pytest

from rnnpose_ros.tools.soak import Sample, _result, memory_growth, percentiles


def samples(rss: list[float], period_s: float = 30.0) -> list[Sample]:
    return [Sample(i * period_s, mb, 0, 0, 0, None, None) for i, mb in enumerate(rss)]


def test_growth_compares_settled_quarters() -> None:
    # The first minute (samples at 0 and 30 s) is warm-up and not compared.
    flat = samples([100, 500, 1000, 1000, 1002, 998, 1001, 1000, 999, 1003, 1000, 1001])
    start, _, growth = memory_growth(flat)
    assert start == pytest.approx(1001, abs=2) and abs(growth) < 5
    leaking = samples([900 + 20 * i for i in range(12)])
    assert memory_growth(leaking)[2] > 100


def test_percentiles() -> None:
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "max": None}
    values = percentiles([float(i) for i in range(101)])
    assert values["p50"] == 50.0 and values["max"] == 100.0


class _Traffic:
    def __init__(self, published: int, answered: int, dropped: int) -> None:
        self.published, self.answered, self.dropped, self.latencies = published, answered, dropped, [1.0]


@pytest.mark.parametrize(
    ("traffic", "rss", "exit_code", "verdict"),
    [
        (_Traffic(100, 10, 89), [1000.0] * 12, None, "memory bounded"),
        (_Traffic(100, 10, 89), [900 + 20.0 * i for i in range(12)], None, "memory grew"),
        (_Traffic(100, 10, 80), [1000.0] * 12, None, "unaccounted"),
        (_Traffic(100, 0, 99), [1000.0] * 12, None, "no frame answered"),
        (_Traffic(100, 10, 89), [1000.0] * 12, -6, "exited with -6"),
    ],
)
def test_verdicts(traffic: _Traffic, rss: list[float], exit_code: int | None, verdict: str) -> None:
    args = argparse.Namespace(minutes=6.0, rate=30.0, detections=4, backend="classical", max_growth_mb=100.0)
    result = _result(args, traffic, samples(rss), 0, exit_code)
    assert verdict in result.verdict and result.passed == (verdict == "memory bounded")
