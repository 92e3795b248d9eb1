"""I3: how much memory one gateway needs to hold 1,000 streamed answers open at once.

A `sim` machine sends a token a second (30 tokens: a stream stays open for half a minute),
so every stream opened is still open when the last one starts. The load generator opens
them all at once over one aiohttp session, waits until each has had its first content
chunk, and then reads the gateway's resident memory (`VmRSS` in `/proc/<pid>/status`),
and the proxy worker's, against what they held idle after a warm-up; then it reads every
answer to its end and checks it.

Two limits of a deployment are lifted for this, both on purpose: the proxy worker's window
(`GPUPROXY_WORKER_WINDOW`, 64 commands by default) is raised above the stream count, and the
one machine is recorded as several instances, since the proxy opens at most 32 connections
to an instance (`workers.proxy.upstream_client.MAX_CONNECTIONS`) and a request that waits
longer than its connect bound for one fails. What is measured is the gateway, not those.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.inference import LOAD_GENERATOR
from bench.inference_system import gateway_in_front, sim_machines
from bench.measure import QUICK_PLAN, Plan, Session, WrongAnswer, expect, this_process
from bench.openai_load import BadAnswer, ChatClient, expected_answer, http_pool
from bench.stats import format_number, percentile
from bench.study import Findings, Measured, Say, Study

STREAMS = 1000
QUICK_STREAMS = 200
TOKENS = 30
TOKEN_DELAY_MS = 1000
SLOW_MACHINE = ("--ttft-ms", "0", "--token-delay-ms", str(TOKEN_DELAY_MS), "--max-batch", "0")
"""No batch limit: every stream generates at once, none waits in line at the machine."""
WINDOW = 1100
"""Commands the proxy worker takes at once: above the stream count, so none waits."""
PROXIES = 1
STREAMS_PER_INSTANCE = 24
"""Below the proxy's 32 connections to an instance, so an uneven spread still fits."""
GATEWAY_MB_AT_MOST = 400.0
"""The target: the gateway's resident memory with 1,000 streams open."""
FIRST_CHUNKS_SECONDS = 60.0
"""How long the last stream may wait for its first chunk before the scenario fails."""
WARMUP_STREAMS = 32
"""One-token answers (no wait between tokens) before the idle reading: imports, pools and
caches the first requests fill are not counted as the streams' memory."""


def streams_for(plan: Plan) -> int:
    return QUICK_STREAMS if plan.latency_calls <= QUICK_PLAN.latency_calls else STREAMS


@dataclass(frozen=True)
class Memory:
    """One process's resident memory, in MB."""

    name: str
    idle_mb: float
    """After the warm-up, before the streams."""
    open_mb: float
    """When every stream had its first chunk."""
    peak_mb: float
    """The most it held until then (`VmHWM`)."""

    def per_stream_kb(self, streams: int) -> float:
        return (self.open_mb - self.idle_mb) * 1024.0 / streams


@dataclass(frozen=True)
class StreamsFindings:
    streams: int
    instances: int
    """How many instances the one machine was recorded as."""
    window: int
    first_chunks_s: float
    """From opening the streams to the last one's first chunk."""
    first_chunk_p50_ms: float
    first_chunk_p99_ms: float
    open_when_read: int
    """Streams that had their first chunk and not yet their end when memory was read."""
    memory: tuple[Memory, ...]
    """The gateway first, then the proxy workers."""
    completed_s: float
    """From opening the streams to the end of the last answer, every one checked."""

    @property
    def gateway(self) -> Memory:
        return self.memory[0]

    @property
    def target_met(self) -> bool | None:
        """None when fewer streams than the target's were opened (`--quick`)."""
        if self.streams < STREAMS:
            return None
        return self.gateway.open_mb <= GATEWAY_MB_AT_MOST

    def lines(self, found: Mapping[str, Findings]) -> list[str]:
        proxies = len(self.memory) - 1
        header = (
            f"{'process':<12}{'RSS idle MB':>13}{'RSS open MB':>13}{'KB/stream':>11}{'peak MB':>9}"
        )
        out = [
            f"I3 open streams: {self.streams:,} SSE streams held at once by one gateway "
            f"({proxies} proxy worker{'s' if proxies > 1 else ''}, window {self.window}; one "
            f"machine as {self.instances} instances, a token a second, {TOKENS} tokens)",
            f"  all first chunks after {self.first_chunks_s:.1f} s (first chunk p50 "
            f"{format_number(self.first_chunk_p50_ms, 0)} ms, p99 "
            f"{format_number(self.first_chunk_p99_ms, 0)} ms); {self.open_when_read:,} open "
            "when memory was read",
            f"  every answer complete and checked after {self.completed_s:.1f} s",
            header,
            "-" * len(header),
        ]
        for m in self.memory:
            out.append(
                f"{m.name:<12}{m.idle_mb:>13.1f}{m.open_mb:>13.1f}"
                f"{m.per_stream_kb(self.streams):>11.1f}{m.peak_mb:>9.1f}"
            )
        goal = f"gateway RSS with {STREAMS:,} streams open <= {GATEWAY_MB_AT_MOST:g} MB"
        met = self.target_met
        verdict = (
            f"NOT MEASURED ({self.streams:,} streams)"
            if met is None
            else ("MET" if met else "MISSED")
        )
        out.append(f"Target: {goal}: measured {self.gateway.open_mb:.1f} MB  {verdict}")
        return out

    def to_json(self, found: Mapping[str, Findings]) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["memory"] = [
            dataclasses.asdict(m) | {"per_stream_kb": m.per_stream_kb(self.streams)}
            for m in self.memory
        ]
        return data | {
            "tokens": TOKENS,
            "token_delay_ms": TOKEN_DELAY_MS,
            "target_mb": GATEWAY_MB_AT_MOST,
            "target_met": self.target_met,
        }


def resident_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process, in MB."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024.0  # given in kB
    return fields["VmRSS"], fields["VmHWM"]


class _Streams:
    """`count` streams opened at once; `all_first` is set once each had its first chunk."""

    def __init__(self, client: ChatClient, count: int) -> None:
        self._client = client
        self.count = count
        self.started = 0
        self.finished = 0
        self.all_first = asyncio.Event()
        self.first_at: list[float] = []

    def _first(self) -> None:
        self.first_at.append(time.perf_counter())
        if len(self.first_at) == self.count:
            self.all_first.set()

    async def one(self, n: int) -> None:
        messages = [{"role": "user", "content": f"open stream {n}: tell a slow story"}]
        answer = await self._client.chat(
            messages, stream=True, max_tokens=TOKENS, on_first_token=self._first
        )
        self.finished += 1
        expect(expected_answer(messages, TOKENS), answer.text, "answer")


async def _warm_up(client: ChatClient) -> None:
    async def one(n: int) -> None:
        messages = [{"role": "user", "content": f"warm-up {n}"}]
        answer = await client.chat(messages, stream=True, max_tokens=1)
        expect(expected_answer(messages, 1), answer.text, "answer")

    async with asyncio.TaskGroup() as group:
        for n in range(WARMUP_STREAMS):
            group.create_task(one(n))


async def measure_streams(
    client: ChatClient, count: int, pids: Mapping[str, int], instances: int, say: Say
) -> StreamsFindings:
    """Open `count` streams, read memory once all are flowing, then read them to the end."""
    await _warm_up(client)
    idle = {name: resident_mb(pid)[0] for name, pid in pids.items()}
    streams = _Streams(client, count)
    say(f"opening {count:,} streams")
    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for n in range(count):
            group.create_task(streams.one(n))
        try:
            async with asyncio.timeout(FIRST_CHUNKS_SECONDS):
                await streams.all_first.wait()
        except TimeoutError:
            raise BadAnswer(
                f"{len(streams.first_at):,} of {count:,} streams had their first chunk "
                f"within {FIRST_CHUNKS_SECONDS:g} s"
            ) from None
        first_s = time.perf_counter() - start
        read = {name: resident_mb(pid) for name, pid in pids.items()}
        open_now = len(streams.first_at) - streams.finished
        say(f"all first chunks after {first_s:.1f} s; gateway RSS {read['gateway'][0]:.0f} MB")
    if streams.finished != count:
        raise WrongAnswer(f"{streams.finished:,} of {count:,} streams ended")
    ms = [(t - start) * 1000.0 for t in streams.first_at]
    return StreamsFindings(
        streams=count,
        instances=instances,
        window=WINDOW,
        first_chunks_s=first_s,
        first_chunk_p50_ms=percentile(ms, 50),
        first_chunk_p99_ms=percentile(ms, 99),
        open_when_read=open_now,
        memory=tuple(Memory(name, idle[name], read[name][0], read[name][1]) for name in pids),
        completed_s=time.perf_counter() - start,
    )


@contextlib.asynccontextmanager
async def open_streams(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
    """I3: one gateway, PROXIES proxy workers, one slow machine; `count` streams at once."""
    count = streams_for(plan)
    instances = math.ceil(count / STREAMS_PER_INSTANCE)
    # A stream lasts TOKENS seconds after its first chunk, and all of them may wait a while
    # for theirs: the pool's per-request bound must cover both.
    timeout = FIRST_CHUNKS_SECONDS + TOKENS * TOKEN_DELAY_MS / 1000.0 + 30.0
    settings = {"GPUPROXY_WORKER_WINDOW": str(WINDOW)}
    with sim_machines(workdir, 1, SLOW_MACHINE) as machines:
        async with (
            http_pool(timeout, size=count + WARMUP_STREAMS) as http,
            gateway_in_front(
                workdir, machines * instances, http, proxies=PROXIES, settings=settings
            ) as gateway,
        ):
            client = ChatClient(http, gateway.openai_base, gateway.api_key)
            watched = {
                name: pid for name, pid in gateway.processes.items() if name != "nats-server"
            }
            # The gateway first: the findings name it by position.
            pids = {"gateway": watched.pop("gateway"), **watched}

            async def measure(say: Say) -> Measured:
                found = await measure_streams(client, count, pids, instances, say)
                return Measured(findings=found)

            processes = {
                **this_process(LOAD_GENERATOR),
                **gateway.processes,
                "sim machine": machines[0].process.pid,
            }
            yield Study(measure=measure, processes=processes)
