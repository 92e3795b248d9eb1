"""Percentiles, summaries and ratios: the arithmetic of the report, free of any I/O."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(samples: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) with linear interpolation between closest ranks.

    Same definition as numpy's default, so figures can be checked against other tools.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencySummary:
    """Sequential call latencies, in milliseconds."""

    calls: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float


def summarize_latency(seconds: Sequence[float]) -> LatencySummary:
    ms = [s * 1000.0 for s in seconds]
    return LatencySummary(
        calls=len(ms),
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        mean_ms=sum(ms) / len(ms),
        min_ms=min(ms),
        max_ms=max(ms),
    )


@dataclass(frozen=True)
class ThroughputSummary:
    calls: int
    concurrency: int
    seconds: float
    calls_per_s: float
    """The median of the rounds' rates: one stall of the machine moves it less than a mean."""
    round_rates: tuple[float, ...]
    p50_ms: float
    """Median latency under this load: shows queueing, not just the rate."""
    p99_ms: float


def summarize_throughput(
    rounds: Sequence[tuple[int, float]], latencies: Sequence[float], concurrency: int
) -> ThroughputSummary:
    """`rounds` holds (calls, seconds) of each back-to-back round at `concurrency`."""
    if not rounds:
        raise ValueError("no throughput rounds")
    if any(seconds <= 0 for _, seconds in rounds):
        raise ValueError("a throughput round must take some time")
    rates = tuple(calls / seconds for calls, seconds in rounds)
    ms = [s * 1000.0 for s in latencies]
    return ThroughputSummary(
        calls=sum(calls for calls, _ in rounds),
        concurrency=concurrency,
        seconds=sum(seconds for _, seconds in rounds),
        calls_per_s=statistics.median(rates),
        round_rates=rates,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
    )


def ratio(ours: float | None, baseline: float | None) -> float | None:
    """`ours / baseline`, or None when either side is missing or the baseline is zero."""
    if ours is None or baseline is None or baseline == 0:
        return None
    return ours / baseline


def format_ratio(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x"


def format_number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"
