"""I0 and I1: OpenAI chat completions straight to a machine, then through gpuproxy.

I0 is the baseline: the load generator (`bench.openai_load`) calls one `gpuproxy
sim-upstream` that answers at once (no time to first token, no delay between tokens, 16
tokens), so what it measures is the cost of the HTTP exchange itself. I1 sends the same
requests to `gpuproxy gateway`, which hands each to `gpuproxy worker proxy` over NATS; the
worker calls the same kind of machine and sends the answer back, chunk by chunk when it is
streamed. Each is measured whole
and streamed (server-sent events), at concurrency 1 and 32, with the framework's driver and
plan. The main table shows the whole answers; the findings table shows both modes, the time
to first token of streamed answers, and I1 against I0: requests per second as a ratio,
latencies as milliseconds added.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.inference_system import gateway_in_front, sim_machines, wait_answering
from bench.measure import CpuPerCall, Driver, Plan, Session, this_process
from bench.openai_load import MAX_TOKENS, ChatClient, chat_call, http_pool
from bench.stats import format_number, format_ratio, percentile, ratio
from bench.study import Findings, Measured, Say, Study

FAST_MACHINE = ("--ttft-ms", "0", "--token-delay-ms", "0")
LOAD_GENERATOR = "bench: load generator"
ADDED = (
    "requests_per_s_ratio",
    "p50_added_ms",
    "p99_added_ms",
    "ttft_p50_added_ms",
    "ttft_p99_added_ms",
)


@dataclass(frozen=True)
class ChatFigures:
    """One mode at one concurrency, as the client saw it."""

    streamed: bool
    concurrency: int
    requests_per_s: float
    """At c=1, one over the mean latency; at c=32, the median of the rounds' rates."""
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float | None
    """Streamed only: from sending to the first chunk with content."""
    ttft_p99_ms: float | None
    cpu_us: CpuPerCall

    @property
    def mode(self) -> str:
        return "sse" if self.streamed else "whole"


@dataclass(frozen=True)
class ChatFindings:
    """A path's figures, shown beside its baseline's when that ran too."""

    name: str
    label: str
    figures: tuple[ChatFigures, ...]
    baseline: str | None = None
    """The scenario these are compared with, by name."""

    def lines(self, found: Mapping[str, Findings]) -> list[str]:
        if self.baseline is None and any(
            isinstance(f, ChatFindings) and f.baseline == self.name for f in found.values()
        ):
            return []  # shown beside the path compared with it
        base = self._base(found)
        paths = [self] if base is None else [base, self]
        title = f"{self.label} against {base.label}" if base else self.label
        header = (
            f"{'mode':<6}{'conc':>5}  {'path':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'TTFT p50':>10}{'TTFT p99':>10}"
        )
        out = [
            f"{title}: OpenAI chat, max_tokens {MAX_TOKENS}, a machine that answers at once",
            "(TTFT: to the first content chunk of a streamed answer; "
            f"{'last row: ratio of req/s, ms added' if base else 'no baseline in this run'})",
            header,
            "-" * len(header),
        ]
        for ours in self.figures:
            for path in paths:
                figures = path.figures_at(ours.streamed, ours.concurrency)
                if figures is None:
                    continue
                out.append(
                    f"{ours.mode:<6}{ours.concurrency:>5}  {path.label:<14}"
                    f"{figures.requests_per_s:>9,.0f}{figures.p50_ms:>9.2f}"
                    f"{figures.p99_ms:>9.2f}{_ms(figures.ttft_p50_ms):>10}"
                    f"{_ms(figures.ttft_p99_ms):>10}"
                )
            if base is not None:
                added = added_over(ours, base.figures_at(ours.streamed, ours.concurrency))
                out.append(
                    f"{'':<11}  {'added':<14}{format_ratio(added['requests_per_s_ratio']):>9}"
                    f"{_plus(added['p50_added_ms']):>9}{_plus(added['p99_added_ms']):>9}"
                    f"{_plus(added['ttft_p50_added_ms']):>10}"
                    f"{_plus(added['ttft_p99_added_ms']):>10}"
                )
        return out

    def to_json(self, found: Mapping[str, Findings]) -> dict[str, Any]:
        base = self._base(found)
        return {
            "label": self.label,
            "figures": [dataclasses.asdict(f) | {"mode": f.mode} for f in self.figures],
            "against": None if base is None else self.baseline,
            "added": (
                None
                if base is None
                else [
                    {"mode": f.mode, "concurrency": f.concurrency}
                    | added_over(f, base.figures_at(f.streamed, f.concurrency))
                    for f in self.figures
                ]
            ),
        }

    def _base(self, found: Mapping[str, Findings]) -> ChatFindings | None:
        base = found.get(self.baseline or "")
        return base if isinstance(base, ChatFindings) else None

    def figures_at(self, streamed: bool, concurrency: int) -> ChatFigures | None:
        return next(
            (f for f in self.figures if (f.streamed, f.concurrency) == (streamed, concurrency)),
            None,
        )


def added_over(ours: ChatFigures, base: ChatFigures | None) -> dict[str, float | None]:
    """Ours against the baseline's same mode and concurrency: a ratio of rates, ms added."""

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    if base is None:
        return dict.fromkeys(ADDED, None)
    return {
        "requests_per_s_ratio": ratio(ours.requests_per_s, base.requests_per_s),
        "p50_added_ms": ours.p50_ms - base.p50_ms,
        "p99_added_ms": ours.p99_ms - base.p99_ms,
        "ttft_p50_added_ms": minus(ours.ttft_p50_ms, base.ttft_p50_ms),
        "ttft_p99_added_ms": minus(ours.ttft_p99_ms, base.ttft_p99_ms),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else format_number(value)


def _plus(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


async def measure_chat(
    client: ChatClient, processes: Mapping[str, int], plan: Plan, say: Say
) -> tuple[Measured, list[ChatFigures]]:
    """Both modes through the framework's driver: the whole mode's phases are the headline."""
    headline = Measured()
    figures: list[ChatFigures] = []
    for streamed in (False, True):
        ttfts: list[float] = []
        driver = Driver(Session(chat_call(client, stream=streamed, ttfts=ttfts), processes), plan)
        mode = "sse" if streamed else "whole"
        latency, cpu_c1 = await driver.latency()
        # The driver's warm-up calls come first: the measured ones are the last.
        c1_ttfts = ttfts[-latency.calls :] if streamed else []
        ttfts.clear()
        say(f"{mode} c=1 p50 {latency.p50_ms:.2f} ms")
        throughput, cpu_c32 = await driver.throughput()
        c32_ttfts = ttfts[-throughput.calls :] if streamed else []
        say(f"{mode} c={plan.concurrency} {throughput.calls_per_s:,.0f} req/s")
        figures.append(
            ChatFigures(
                streamed=streamed,
                concurrency=1,
                requests_per_s=1000.0 / latency.mean_ms,
                p50_ms=latency.p50_ms,
                p99_ms=latency.p99_ms,
                ttft_p50_ms=_percentile_ms(c1_ttfts, 50),
                ttft_p99_ms=_percentile_ms(c1_ttfts, 99),
                cpu_us=cpu_c1,
            )
        )
        figures.append(
            ChatFigures(
                streamed=streamed,
                concurrency=throughput.concurrency,
                requests_per_s=throughput.calls_per_s,
                p50_ms=throughput.p50_ms,
                p99_ms=throughput.p99_ms,
                ttft_p50_ms=_percentile_ms(c32_ttfts, 50),
                ttft_p99_ms=_percentile_ms(c32_ttfts, 99),
                cpu_us=cpu_c32,
            )
        )
        if not streamed:
            headline = Measured(latency, throughput, cpu_c1, cpu_c32)
    return headline, figures


def _percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    return percentile([s * 1000.0 for s in seconds], q) if seconds else None


def _study(
    name: str,
    label: str,
    client: ChatClient,
    processes: dict[str, int],
    plan: Plan,
    baseline: str | None = None,
) -> Study:
    async def measure(say: Say) -> Measured:
        headline, figures = await measure_chat(client, processes, plan, say)
        found = ChatFindings(name, label, tuple(figures), baseline)
        return dataclasses.replace(headline, findings=found)

    return Study(measure=measure, processes=processes)


@contextlib.asynccontextmanager
async def open_direct(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
    """I0: the load generator and one machine, nothing between them."""
    with sim_machines(workdir, 1, FAST_MACHINE) as machines:
        async with http_pool(plan.call_timeout) as http:
            await wait_answering(http, machines)
            client = ChatClient(http, f"{machines[0].url}/v1")
            processes = {**this_process(LOAD_GENERATOR), "sim machine": machines[0].process.pid}
            yield _study("i0", "I0 direct", client, processes, plan)


@contextlib.asynccontextmanager
async def open_gateway(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
    """I1: the same requests through the gateway and one proxy worker to the same machine."""
    with sim_machines(workdir, 1, FAST_MACHINE) as machines:
        async with (
            http_pool(plan.call_timeout) as http,
            gateway_in_front(workdir, machines, http) as gateway,
        ):
            client = ChatClient(http, gateway.openai_base, gateway.api_key)
            processes = {
                **this_process(LOAD_GENERATOR),
                **gateway.processes,
                "sim machine": machines[0].process.pid,
            }
            yield _study("i1", "I1 gateway", client, processes, plan, baseline="i0")
