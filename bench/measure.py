"""Driving a scenario's call: a sequential latency phase and a concurrent throughput phase.

Every scenario hands over the same shape of call, `call(n)`, which sends a payload made
from `n`, waits for the answer and raises `WrongAnswer` unless the answer echoes it; so the
drivers here are shared and a scenario differs only in the path it exercises.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from bench.cpu import per_call_us, snapshot
from bench.stats import LatencySummary, ThroughputSummary, summarize_latency, summarize_throughput

Call = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Session:
    """What an opened scenario offers: its call, and the processes that do its work."""

    call: Call
    processes: Mapping[str, int] = field(default_factory=dict)
    """Name -> pid of each process on the path, this one included, for CPU accounting."""


def this_process(name: str) -> dict[str, int]:
    return {name: os.getpid()}


class WrongAnswer(AssertionError):
    """A path answered, but not with what was sent: its timings must not be reported."""


def expect(sent: str, received: str, what: str = "echo") -> None:
    if received != sent:
        raise WrongAnswer(f"{what} mismatch: sent {sent!r}, got {received!r}")


@dataclass(frozen=True)
class Plan:
    warmup: int
    """Calls before each phase, not measured: connections, consumers and caches settle."""
    latency_calls: int
    throughput_calls: int
    """Split evenly over `throughput_rounds` back-to-back rounds."""
    throughput_rounds: int
    concurrency: int
    call_timeout: float
    """Seconds one call may take before the scenario counts as broken."""
    phase_timeout: float
    """Seconds one phase may take: bounds the whole run on a machine that stalls."""


DEFAULT_PLAN = Plan(
    warmup=200,
    latency_calls=1000,
    throughput_calls=4500,
    throughput_rounds=3,
    concurrency=32,
    call_timeout=10.0,
    phase_timeout=90.0,
)
QUICK_PLAN = Plan(
    warmup=10,
    latency_calls=50,
    throughput_calls=320,
    throughput_rounds=1,
    concurrency=32,
    call_timeout=10.0,
    phase_timeout=30.0,
)


CpuPerCall = dict[str, float]
"""Process name -> microseconds of CPU per measured call."""


class Driver:
    """Runs the phases of one scenario; numbers every call so each payload is unique."""

    def __init__(self, session: Session, plan: Plan) -> None:
        self._call = session.call
        self._processes = session.processes
        self._plan = plan
        self._numbers = itertools.count()

    async def latency(self) -> tuple[LatencySummary, CpuPerCall]:
        plan = self._plan
        async with asyncio.timeout(plan.phase_timeout):
            for _ in range(plan.warmup):
                await self._call(next(self._numbers))
            _settle()
            samples: list[float] = []
            clock = time.perf_counter
            cpu_before = snapshot(self._processes)
            for _ in range(plan.latency_calls):
                n = next(self._numbers)
                start = clock()
                await self._call(n)
                samples.append(clock() - start)
            cpu = per_call_us(cpu_before, snapshot(self._processes), len(samples))
        return summarize_latency(samples), cpu

    async def throughput(self) -> tuple[ThroughputSummary, CpuPerCall]:
        plan = self._plan
        async with asyncio.timeout(plan.phase_timeout):
            await self._concurrently(plan.warmup, [])
            _settle()
            samples: list[float] = []
            rounds: list[tuple[int, float]] = []
            per_round = max(plan.throughput_calls // plan.throughput_rounds, plan.concurrency)
            cpu_before = snapshot(self._processes)
            for _ in range(plan.throughput_rounds):
                start = time.perf_counter()
                await self._concurrently(per_round, samples)
                rounds.append((per_round, time.perf_counter() - start))
            cpu = per_call_us(cpu_before, snapshot(self._processes), len(samples))
        return summarize_throughput(rounds, samples, plan.concurrency), cpu

    async def _concurrently(self, total: int, samples: list[float]) -> None:
        # A fixed number of tasks each taking the next call until `total` are done: a closed
        # loop, so the load is exactly `concurrency` calls in flight, never a growing backlog.
        first = next(self._numbers)
        taken = itertools.count(first)
        end = first + total
        clock = time.perf_counter

        async def one_lane() -> None:
            while (n := next(taken)) < end:
                start = clock()
                await self._call(n)
                samples.append(clock() - start)

        async with asyncio.TaskGroup() as group:
            for _ in range(self._plan.concurrency):
                group.create_task(one_lane())
        # Numbers after this phase must not collide with the ones it handed out.
        self._numbers = itertools.count(end + self._plan.concurrency)


def _settle() -> None:
    # Collect garbage left by setup and warm-up now, rather than inside the measured calls.
    gc.collect()
