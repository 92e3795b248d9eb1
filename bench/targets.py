"""The issue's targets for the full ping through gpuproxy (O2), and checking a run on them."""

from __future__ import annotations

from dataclasses import dataclass

TARGET_SCENARIO = "o2"
P50_MS_AT_MOST = 2.5
"""Median latency of one call at a time, gRPC client to gRPC answer."""
CALLS_PER_S_AT_LEAST = 2000.0
"""Completed calls per second with 32 calls in flight."""


@dataclass(frozen=True)
class TargetCheck:
    what: str
    goal: str
    measured: float | None
    met: bool | None
    """None when the scenario did not run or failed: neither met nor missed."""

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "NOT MEASURED"
        return "MET" if self.met else "MISSED"


def check_targets(p50_ms: float | None, calls_per_s: float | None) -> list[TargetCheck]:
    return [
        TargetCheck(
            what="p50 at c=1",
            goal=f"<= {P50_MS_AT_MOST:g} ms",
            measured=p50_ms,
            met=None if p50_ms is None else p50_ms <= P50_MS_AT_MOST,
        ),
        TargetCheck(
            what="throughput at c=32",
            goal=f">= {CALLS_PER_S_AT_LEAST:,.0f} calls/s",
            measured=calls_per_s,
            met=None if calls_per_s is None else calls_per_s >= CALLS_PER_S_AT_LEAST,
        ),
    ]
