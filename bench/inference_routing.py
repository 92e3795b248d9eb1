"""I2: what cache-aware routing buys a multi-turn chat workload, against round robin.

Four `sim` machines model an inference server's KV cache: a prompt's leading blocks that a
machine already holds skip their prefill (200 us a token otherwise), and at most four
requests generate at once on each. Conversations run at the same time, each turn sent with
the whole conversation so far behind a long system prompt, so the machine that served a
conversation's last turn holds most of its next prompt. The system prompt is either each
conversation's own (agents, tenants) or one for all (one product). With one for all, any
prompt also matches, on that prompt, every machine that has served any conversation: what
then keeps a cache-aware router from sending everything to one machine is its load balance.

Both workloads run under `round_robin`, `least_connections` and `cache_aware` (set through
the HTTP route before each run), on fresh prompts each time so no run inherits another's
cache; in the default mode twice, the second time in reverse order, so a drift of the
machine's load hurts every strategy alike. Reported per run: the time to first token of
every turn, the prompt tokens the machines found cached (their own count, `GET /sim/stats`)
and how many requests each machine served.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import statistics
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.inference import FAST_MACHINE, LOAD_GENERATOR
from bench.inference_system import Gateway, Machine, gateway_in_front, machine_stats, sim_machines
from bench.measure import QUICK_PLAN, Plan, Session, expect, this_process
from bench.openai_load import BadAnswer, ChatClient, expected_answer, http_pool
from bench.stats import format_ratio, percentile, ratio
from bench.study import Findings, Measured, Say, Study
from simulator.tokens import VOCABULARY

STRATEGIES = ("round_robin", "least_connections", "cache_aware")
BASELINE = "round_robin"
MACHINES = 4
PREFILL_US_PER_TOKEN = 200
CACHE_BLOCKS = 256
BLOCK_TOKENS = 16
MAX_BATCH = 4
KV_MACHINE = (
    *FAST_MACHINE,
    *("--prefill-us-per-token", str(PREFILL_US_PER_TOKEN), "--cache-blocks", str(CACHE_BLOCKS)),
    *("--block-tokens", str(BLOCK_TOKENS), "--max-batch", str(MAX_BATCH)),
)
WARMUP_REQUESTS = 16
"""Short prompts (under one block: nothing cached) that open every connection on the path."""


SYSTEM_PROMPTS = ("own", "shared")
"""Each conversation's own system prompt, or one for all the conversations of a run."""


@dataclass(frozen=True)
class Workload:
    conversations: int
    """Sent at the same time."""
    turns: int
    rounds: int
    """Runs of every strategy; the second one in reverse order."""
    system_words: int = 384
    """The system prompt a conversation starts with: 24 cache blocks."""
    user_words: int = 48
    """Each turn's own question; with the 16-token answer a turn adds 4 blocks."""


QUICK = Workload(conversations=16, turns=4, rounds=1)
DEFAULT = Workload(conversations=16, turns=8, rounds=2)
"""At its last turn a conversation's prompt is some 900 tokens, 56 blocks: four
conversations fit one machine's 256 blocks, sixteen do not."""


def workload_for(plan: Plan) -> Workload:
    return QUICK if plan.latency_calls <= QUICK_PLAN.latency_calls else DEFAULT


@dataclass(frozen=True)
class StrategyFigures:
    system_prompt: str
    """`own` or `shared` (`SYSTEM_PROMPTS`)."""
    strategy: str
    requests: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_mean_ms: float
    prompt_tokens: int
    cached_tokens: int
    """Prompt tokens the machines found in their KV cache: prefill they skipped."""
    per_machine: tuple[int, ...]
    """Requests each machine served."""
    seconds: float
    """Wall time of this strategy's runs."""

    @property
    def cached_share(self) -> float | None:
        return ratio(self.cached_tokens, self.prompt_tokens)


@dataclass(frozen=True)
class RoutingFindings:
    workload: Workload
    strategies: tuple[StrategyFigures, ...]

    def lines(self, found: Mapping[str, Findings]) -> list[str]:
        w = self.workload
        header = (
            f"{'system prompt':<15}{'strategy':<19}{'TTFT p50':>9}{'TTFT p99':>9}{'p50/RR':>8}"
            f"{'p99/RR':>8}{'cached tokens':>15}{'of prompt':>10}  per machine"
        )
        out = [
            f"I2 routing: {w.conversations} conversations x {w.turns} turns at once, "
            f"{w.rounds} round{'s' if w.rounds > 1 else ''}, via the gateway to {MACHINES} "
            "machines with a KV cache",
            f"(prefill {PREFILL_US_PER_TOKEN} us a token not cached, {CACHE_BLOCKS} blocks of "
            f"{BLOCK_TOKENS} tokens, {MAX_BATCH} requests at once; TTFT in ms, every turn, "
            "streamed;",
            " /RR: ratio to round_robin with the same system prompts; cached tokens and requests "
            "per machine as the machines counted them)",
            header,
            "-" * len(header),
        ]
        for s in self.strategies:
            share = s.cached_share
            out.append(
                f"{s.system_prompt:<15}{s.strategy:<19}{s.ttft_p50_ms:>9.1f}{s.ttft_p99_ms:>9.1f}"
                f"{format_ratio(self._against(s).get('ttft_p50_ratio')):>8}"
                f"{format_ratio(self._against(s).get('ttft_p99_ratio')):>8}"
                f"{s.cached_tokens:>15,}{'n/a' if share is None else f'{share:.0%}':>10}  "
                + "/".join(str(n) for n in s.per_machine)
            )
        return out

    def to_json(self, found: Mapping[str, Findings]) -> dict[str, Any]:
        return {
            "workload": dataclasses.asdict(self.workload),
            "machines": {
                "count": MACHINES,
                "prefill_us_per_token": PREFILL_US_PER_TOKEN,
                "cache_blocks": CACHE_BLOCKS,
                "block_tokens": BLOCK_TOKENS,
                "max_batch": MAX_BATCH,
            },
            "baseline": BASELINE,
            "runs": [
                dataclasses.asdict(s) | {"cached_share": s.cached_share} | self._against(s)
                for s in self.strategies
            ],
        }

    def _against(self, s: StrategyFigures) -> dict[str, float | None]:
        """Its TTFT as a ratio to the baseline strategy's on the same prompts (below 1:
        sooner)."""
        base = next(
            (
                b
                for b in self.strategies
                if (b.system_prompt, b.strategy) == (s.system_prompt, BASELINE)
            ),
            None,
        )
        return {
            "ttft_p50_ratio": ratio(s.ttft_p50_ms, None if base is None else base.ttft_p50_ms),
            "ttft_p99_ratio": ratio(s.ttft_p99_ms, None if base is None else base.ttft_p99_ms),
        }


@dataclass
class _Tally:
    """One strategy's samples over its runs."""

    ttfts: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    per_machine: list[int] = dataclasses.field(default_factory=lambda: [0] * MACHINES)
    seconds: float = 0.0

    def figures(self, system_prompt: str, strategy: str) -> StrategyFigures:
        ms = [t * 1000.0 for t in self.ttfts]
        return StrategyFigures(
            system_prompt=system_prompt,
            strategy=strategy,
            requests=len(ms),
            ttft_p50_ms=percentile(ms, 50),
            ttft_p99_ms=percentile(ms, 99),
            ttft_mean_ms=statistics.fmean(ms),
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            per_machine=tuple(self.per_machine),
            seconds=self.seconds,
        )


class Routing:
    """The workload's runs on one gateway and one set of machines."""

    def __init__(
        self,
        client: ChatClient,
        gateway: Gateway,
        machines: Sequence[Machine],
        workload: Workload,
        run_timeout: float,
    ) -> None:
        self._client = client
        self._gateway = gateway
        self._machines = machines
        self._workload = workload
        self._run_timeout = run_timeout

    async def measure(self, say: Say) -> Measured:
        await self._warm_up()
        figures: list[StrategyFigures] = []
        for system_prompt in SYSTEM_PROMPTS:
            tallies = {name: _Tally() for name in STRATEGIES}
            for index in range(self._workload.rounds):
                order = STRATEGIES if index % 2 == 0 else tuple(reversed(STRATEGIES))
                for strategy in order:
                    tally = tallies[strategy]
                    await self._choose(strategy)
                    await self._tally(f"{system_prompt} {strategy} {index}", system_prompt, tally)
                    say(
                        f"{system_prompt} system prompt, {strategy}: TTFT p50 "
                        f"{percentile(tally.ttfts, 50) * 1000:.1f} ms, {tally.cached_tokens:,} "
                        f"of {tally.prompt_tokens:,} prompt tokens cached"
                    )
            figures += [tallies[name].figures(system_prompt, name) for name in STRATEGIES]
        return Measured(findings=RoutingFindings(self._workload, tuple(figures)))

    async def _tally(self, salt: str, system_prompt: str, tally: _Tally) -> None:
        """One run of the workload, added to `tally` with what the machines counted."""
        before = await self._stats()
        started = time.perf_counter()
        async with asyncio.timeout(self._run_timeout):
            await self._run(salt, shared=system_prompt == "shared", ttfts=tally.ttfts)
        tally.seconds += time.perf_counter() - started
        after = await self._stats()
        for i, (was, now) in enumerate(zip(before, after, strict=True)):
            tally.prompt_tokens += now["prompt_tokens"] - was["prompt_tokens"]
            tally.cached_tokens += now["cached_tokens"] - was["cached_tokens"]
            tally.per_machine[i] += now["requests"] - was["requests"]

    async def _warm_up(self) -> None:
        for n in range(WARMUP_REQUESTS):
            messages = [{"role": "user", "content": f"warm up {n}"}]
            answer = await self._client.chat(messages, stream=n % 2 == 1)
            expect(expected_answer(messages), answer.text, "answer")

    async def _choose(self, strategy: str) -> None:
        http, gateway = self._client.http, self._gateway
        route = f"{gateway.http_base}/api/v1/loadbalancer/strategy"
        async with http.put(route, json={"strategy": strategy}, headers=gateway.headers) as put:
            if put.status != 200:
                raise BadAnswer(f"setting {strategy}: HTTP {put.status}: {await put.text()}")
        # The proxy applies the choice from its watch of the strategies bucket: wait for it.
        for _ in range(100):
            async with http.get(route, headers=gateway.headers) as got:
                if (await got.json()).get("strategy") == strategy:
                    return
            await asyncio.sleep(0.05)
        raise BadAnswer(f"the proxy never took up {strategy}")

    async def _stats(self) -> list[dict[str, Any]]:
        http = self._client.http
        return list(await asyncio.gather(*(machine_stats(http, m) for m in self._machines)))

    async def _run(self, salt: str, *, shared: bool, ttfts: list[float]) -> None:
        w = self._workload

        def system(index: int) -> str:
            # The run's name leads the prompt: no block of it matches another run's.
            seed = salt if shared else f"{salt}/{index}"
            return f"Run {seed}. " + _words(seed, w.system_words)

        async def conversation(index: int) -> None:
            messages = [{"role": "system", "content": system(index)}]
            for turn in range(w.turns):
                question = f"Conversation {index} turn {turn}: " + _words(
                    f"{salt}/{index}/{turn}", w.user_words
                )
                messages.append({"role": "user", "content": question})
                answer = await self._client.chat(messages, stream=True)
                expect(expected_answer(messages), answer.text, "answer")
                if answer.ttft is None:
                    raise BadAnswer("a streamed answer came without a content chunk")
                ttfts.append(answer.ttft)
                messages.append({"role": "assistant", "content": answer.text})

        async with asyncio.TaskGroup() as group:
            for index in range(w.conversations):
                group.create_task(conversation(index))


def _words(seed: str, count: int) -> str:
    """`count` words of the sim vocabulary, the same for the same seed in every run."""
    return " ".join(random.Random(seed).choices(VOCABULARY, k=count))


@contextlib.asynccontextmanager
async def open_routing(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
    """I2: four machines with a KV cache behind the gateway and one proxy worker."""
    # Prefill and queueing make a turn far slower than I0's calls: a generous bound per call.
    async with http_pool(max(plan.call_timeout, 60.0)) as http:
        with sim_machines(workdir, MACHINES, KV_MACHINE) as machines:
            async with gateway_in_front(workdir, machines, http) as gateway:
                client = ChatClient(http, gateway.openai_base, gateway.api_key)
                routing = Routing(
                    client, gateway, machines, workload_for(plan), run_timeout=plan.phase_timeout
                )
                processes = {
                    **this_process(LOAD_GENERATOR),
                    **gateway.processes,
                    **{f"sim machine {i}": m.process.pid for i, m in enumerate(machines)},
                }
                yield Study(measure=routing.measure, processes=processes)
