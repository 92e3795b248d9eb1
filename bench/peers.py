"""P1: I0's chat requests through the LiteLLM proxy, a peer to set gpuproxy's I1 beside.

The LiteLLM proxy (pinned, installed once into a venv of its own: `bench.litellm_venv`)
runs as `litellm --config <file> --port N --num_workers 2`, with quiet logs, no database
and no debug output, one model pointed at the same kind of `gpuproxy sim-upstream` machine
as I0 and I1 use. It is measured by the same load generator, whole and streamed, at
concurrency 1 and 32, with the run's plan capped to fewer calls (`peer_plan`): it is
several times slower, and the full count would outlast a phase's time limit. It is told it
is offline from huggingface.co (`litellm_env` says why that matters). Its own table shows
it beside I0; one more table sets what I1 and P1 each add to I0 side by side, with the goal
gpuproxy was given: at most a fifth of LiteLLM's added latency (every latency figure is
judged), and at least three times its requests per second at c=32.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.inference import FAST_MACHINE, LOAD_GENERATOR, ChatFindings, added_over, measure_chat
from bench.inference_system import sim_machines, wait_answering
from bench.litellm_venv import REQUIREMENT, PeerUnavailable, ensure_litellm
from bench.measure import Plan, Session, this_process
from bench.openai_load import ChatClient, http_pool
from bench.processes import STOP_GRACE_SECONDS, child_env, child_process, free_port, tail
from bench.stats import format_ratio, ratio
from bench.study import Findings, Measured, Say, Study
from simulator.upstream import DEFAULT_MODEL

COMPARED_WITH = ("i0", "i1")
"""The direct path both are measured against, and gpuproxy's path."""
WORKERS = 2
"""LiteLLM's server processes: one per core of the machine the bench was written on."""
STARTUP_SECONDS = 180.0
"""LiteLLM imports for a long while; two workers on two busy cores take longer still."""
LATENCY_SHARE_AT_MOST = 0.2
"""gpuproxy's goal: at most a fifth of the latency LiteLLM adds."""
THROUGHPUT_RATIO_AT_LEAST = 3.0
"""gpuproxy's goal at c=32: at least three times LiteLLM's requests per second."""
VERSION = REQUIREMENT.rpartition("==")[2]
PEER_CALLS_AT_MOST = (50, 300, 960)
"""Warm-up, c=1 and c=32 calls: LiteLLM serves some 20 to 50 streamed or whole requests a
second on the bench machine, where the run's plan (4,500 calls at c=32) would outlast the
phase time limit."""
PEER_PHASE_SECONDS = 120.0


def peer_plan(plan: Plan) -> Plan:
    """The run's plan with no more calls than PEER_CALLS_AT_MOST (`--quick` has fewer)."""
    warmup, latency_calls, throughput_calls = PEER_CALLS_AT_MOST
    return dataclasses.replace(
        plan,
        warmup=min(plan.warmup, warmup),
        latency_calls=min(plan.latency_calls, latency_calls),
        throughput_calls=min(plan.throughput_calls, throughput_calls),
        phase_timeout=max(plan.phase_timeout, PEER_PHASE_SECONDS),
    )


_OWNED = """
import os, signal, sys, threading, time
owner = int(sys.argv.pop(1))

def watch():
    # The bench may be killed outright: the proxy and its workers, a process group of their
    # own, must not outlive it.
    while True:
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os.killpg(0, signal.SIGTERM)
            time.sleep(10.0)
            os.killpg(0, signal.SIGKILL)
            return
        time.sleep(1.0)

threading.Thread(target=watch, daemon=True).start()
from litellm import run_server
sys.argv[0] = "litellm"
sys.exit(run_server())
"""


@dataclass(frozen=True)
class Versus:
    """One figure of one mode and concurrency: gpuproxy's against the peer's."""

    mode: str
    concurrency: int
    figure: str
    ours: float | None
    peer: float | None
    goal: str
    """Empty when the brief sets no goal for this figure."""
    met: bool | None

    @property
    def ratio(self) -> float | None:
        # A ratio of added milliseconds means something only over a positive peer figure.
        return ratio(self.ours, self.peer) if self.peer is not None and self.peer > 0 else None


def versus(ours: ChatFindings, peer: ChatFindings, base: ChatFindings) -> list[Versus]:
    """What `ours` and `peer` each add to `base`, figure by figure, and the goals met."""
    rows: list[Versus] = []
    for p in peer.figures:
        o = ours.figures_at(p.streamed, p.concurrency)
        b = base.figures_at(p.streamed, p.concurrency)
        if o is None or b is None:
            continue
        ao, ap = added_over(o, b), added_over(p, b)
        figures: list[tuple[str, float | None, float | None, str]] = [
            ("p50 added ms", ao["p50_added_ms"], ap["p50_added_ms"], "latency"),
            ("p99 added ms", ao["p99_added_ms"], ap["p99_added_ms"], "latency"),
        ]
        if p.streamed:
            figures.append(
                ("TTFT p50 added ms", ao["ttft_p50_added_ms"], ap["ttft_p50_added_ms"], "latency")
            )
        goal = "throughput" if p.concurrency > 1 else ""
        figures.append(("req/s", o.requests_per_s, p.requests_per_s, goal))
        rows += [Versus(p.mode, p.concurrency, *f, met=None) for f in figures]
    return [_judged(r) for r in rows]


def _judged(row: Versus) -> Versus:
    if row.ours is None or row.peer is None or not row.goal:
        return dataclasses.replace(row, goal="")
    if row.goal == "latency":
        # Compared as ours <= peer / 5 rather than by ratio, so a peer adding nothing or
        # less than nothing is still judged.
        met = row.ours <= row.peer * LATENCY_SHARE_AT_MOST
        return dataclasses.replace(row, goal=f"<= {LATENCY_SHARE_AT_MOST:.2f}x", met=met)
    met = row.ours >= row.peer * THROUGHPUT_RATIO_AT_LEAST
    return dataclasses.replace(row, goal=f">= {THROUGHPUT_RATIO_AT_LEAST:.2f}x", met=met)


@dataclass(frozen=True)
class PeerFindings(ChatFindings):
    """A peer's chat figures beside I0's, and then beside gpuproxy's path."""

    ours: str = "i1"
    """The scenario of gpuproxy's path, by name."""
    latency_calls: int = 0
    throughput_calls: int = 0
    """The peer's calls at c=1 and c=32, when fewer than the run's (`peer_plan`)."""

    def lines(self, found: Mapping[str, Findings]) -> list[str]:
        out = super().lines(found)
        compared = self._versus(found)
        if compared is None:
            return out
        ours = found[self.ours]
        assert isinstance(ours, ChatFindings)
        header = (
            f"{'mode':<6}{'conc':>5}  {'figure':<19}{ours.label:>13}{self.label:>13}"
            f"{'ratio':>8}  {'goal':<10}verdict"
        )
        out += [
            "",
            f"{ours.label} against {self.label} (LiteLLM {VERSION}, {WORKERS} workers): what "
            "each adds to I0 direct, the same machine and load generator",
            f"(ratio: {ours.label} / {self.label}; goal for gpuproxy: added latency at most "
            f"{LATENCY_SHARE_AT_MOST:.2f}x LiteLLM's, req/s at c=32 at least "
            f"{THROUGHPUT_RATIO_AT_LEAST:.2f}x; {self.label} over {self.latency_calls:,} calls at "
            f"c=1 and {self.throughput_calls:,} at c=32 per mode)",
            header,
            "-" * len(header),
        ]
        for r in compared:
            verdict = "" if r.met is None else ("MET" if r.met else "MISSED")
            out.append(
                f"{r.mode:<6}{r.concurrency:>5}  {r.figure:<19}{_value(r.figure, r.ours):>13}"
                f"{_value(r.figure, r.peer):>13}{format_ratio(r.ratio):>8}  {r.goal:<10}"
                f"{verdict}".rstrip()
            )
        return out

    def to_json(self, found: Mapping[str, Findings]) -> dict[str, Any]:
        compared = self._versus(found)
        return super().to_json(found) | {
            "peer": {
                "name": "litellm",
                "version": VERSION,
                "workers": WORKERS,
                "latency_calls": self.latency_calls,
                "throughput_calls": self.throughput_calls,
            },
            "versus": None
            if compared is None
            else {
                "scenario": self.ours,
                "rows": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in compared],
            },
        }

    def _versus(self, found: Mapping[str, Findings]) -> list[Versus] | None:
        ours, base = found.get(self.ours), found.get(self.baseline or "")
        if not isinstance(ours, ChatFindings) or not isinstance(base, ChatFindings):
            return None
        return versus(ours, self, base)


def _value(figure: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if figure == "req/s" else f"{value:+.2f}"


def litellm_config(machine_url: str) -> dict[str, Any]:
    """One model on one machine; written as JSON, which YAML reads as it is."""
    return {
        "model_list": [
            {
                "model_name": DEFAULT_MODEL,
                "litellm_params": {
                    "model": f"openai/{DEFAULT_MODEL}",
                    "api_base": f"{machine_url}/v1",
                    "api_key": "x",
                },
            }
        ]
    }


def litellm_env(master_key: str) -> dict[str, str]:
    """LiteLLM refuses to start without a master key; the load generator sends it as its
    bearer key, as it sends gpuproxy's API key to the gateway."""
    env = child_env(
        LITELLM_MASTER_KEY=master_key,
        # Without access to huggingface.co, LiteLLM asks it for a llama-3 tokenizer on every
        # streamed answer of a model named like ours, to count tokens, and waits some 24 s
        # for the name lookup to fail; offline, it fails at once and counts otherwise.
        HF_HUB_OFFLINE="1",
        LITELLM_LOG="ERROR",
        # The model cost map is otherwise fetched from GitHub at start.
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    # A database URL in our environment is gpuproxy's: with one, LiteLLM would use it.
    for name in ("DATABASE_URL", "DIRECT_URL"):
        env.pop(name, None)
    return env


@contextlib.contextmanager
def group_stopped(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """At the end, every process of `process`'s group: a leader that stops alone (or is
    killed after the grace) may leave its workers running."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_GRACE_SECONDS)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """`pid`'s children, theirs, and so on (from /proc: Linux only)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                pending += children
    return found


async def _wait_litellm(client: ChatClient, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until the proxy answers a chat completion from the machine: started and routed."""
    deadline = time.monotonic() + STARTUP_SECONDS
    last = "no answer"
    messages = [{"role": "user", "content": "ready?"}]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerUnavailable(f"litellm exited with {process.returncode}:\n{tail(log)}")
        try:
            await client.chat(messages, stream=False, max_tokens=1)
            return
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            last = str(exc)[:200] or type(exc).__name__
        await asyncio.sleep(0.5)
    raise PeerUnavailable(
        f"litellm did not answer within {STARTUP_SECONDS:.0f} s (last: {last}):\n{tail(log)}"
    )


def _study(client: ChatClient, processes: dict[str, int], plan: Plan) -> Study:
    plan = peer_plan(plan)

    async def measure(say: Say) -> Measured:
        headline, figures = await measure_chat(client, processes, plan, say)
        found = PeerFindings(
            "p1",
            "P1 LiteLLM",
            tuple(figures),
            baseline="i0",
            ours="i1",
            latency_calls=plan.latency_calls,
            throughput_calls=plan.throughput_calls,
        )
        return dataclasses.replace(headline, findings=found)

    return Study(measure=measure, processes=processes)


def _named(pids: Sequence[int]) -> dict[str, int]:
    return {f"litellm-{n}": pid for n, pid in enumerate(pids, start=1)}


@contextlib.asynccontextmanager
async def open_litellm(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
    """P1: the load generator, the LiteLLM proxy, one machine that answers at once."""
    command = await ensure_litellm(lambda line: print(f"[bench] p1: {line}", flush=True))
    python = command.parent / "python"
    port = free_port()
    master_key = f"sk-{secrets.token_hex(32)}"
    config = workdir / "litellm.yaml"
    log = workdir / "litellm.log"
    with sim_machines(workdir, 1, FAST_MACHINE) as machines:
        config.write_text(json.dumps(litellm_config(machines[0].url), indent=2))
        args = [
            *[str(python), "-c", _OWNED, str(os.getpid())],
            *["--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            *["--num_workers", str(WORKERS)],
        ]
        with (
            child_process(args, env=litellm_env(master_key), log_path=log, cwd=workdir) as proxy,
            group_stopped(proxy),
        ):
            async with http_pool(plan.call_timeout) as http:
                await wait_answering(http, machines)
                client = ChatClient(http, f"http://127.0.0.1:{port}/v1", master_key)
                await _wait_litellm(client, proxy, log)
                processes = {
                    **this_process(LOAD_GENERATOR),
                    "litellm": proxy.pid,
                    **_named(descendants(proxy.pid)),
                    "sim machine": machines[0].process.pid,
                }
                yield _study(client, processes, plan)
