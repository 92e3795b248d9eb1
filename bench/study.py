"""Scenarios that take several measurements on one set of servers, and what they found.

Most scenarios hand the runner one call (a `Session`) and let it drive the two phases. Some
need more than one call's two phases: the same servers measured whole and streamed, or one
workload under three routing strategies. Their opener yields a `Study`, a session that
measures itself: the runner calls `measure` instead of driving a call, and gets back
`Measured`, an optional headline row for the main table (the two phases of the study's main
call, like any scenario's) and its `Findings`, which print their own table after the main one
and give the same figures to the JSON report.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.measure import Call, CpuPerCall, Session
from bench.stats import LatencySummary, ThroughputSummary

Say = Callable[[str], None]
"""Where a study reports its progress: a line of text at a time."""


class Findings(Protocol):
    """What a study found beyond the main table's columns."""

    def lines(self, found: Mapping[str, Findings]) -> list[str]:
        """Its table for the report; `found` holds every study's findings in this run, by
        scenario name, for those compared with another scenario's."""
        ...

    def to_json(self, found: Mapping[str, Findings]) -> dict[str, Any]:
        """The same figures for a script (plain JSON types only)."""
        ...


@dataclass(frozen=True)
class Measured:
    """A scenario's figures: the two phases of its main call, and a study's findings."""

    latency: LatencySummary | None = None
    throughput: ThroughputSummary | None = None
    cpu_us_c1: CpuPerCall = field(default_factory=dict)
    cpu_us_c32: CpuPerCall = field(default_factory=dict)
    findings: Findings | None = None


async def _not_driven(n: int) -> None:
    raise TypeError("a study measures itself: the runner calls its `measure`, not its call")


@dataclass(frozen=True, kw_only=True)
class Study(Session):
    """A session that measures itself, given the run's plan and a progress line."""

    measure: Callable[[Say], Awaitable[Measured]]
    call: Call = _not_driven
