"""The scenarios a run can pick from, baselines first, in the order they run.

A few run only on request (`--only`, or `--peers` for the peer proxies): one installs a
third-party proxy from PyPI, the other holds a thousand connections open for a minute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from bench.faststream_default import open_faststream
from bench.gpuproxy_bus import open_gpuproxy_bus
from bench.gpuproxy_e2e import open_gpuproxy_e2e
from bench.grpc_echo import open_grpc_echo
from bench.inference import open_direct, open_gateway
from bench.inference_routing import open_routing
from bench.measure import Plan, Session
from bench.nats_raw import open_raw_nats
from bench.open_streams import open_streams
from bench.peers import COMPARED_WITH, open_litellm

Opener = Callable[[Path, Plan], AbstractAsyncContextManager[Session]]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    what: str
    open: Opener
    on_request: bool = False
    """Left out of a run that names no scenarios."""


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "b1",
        "B1 nats-py JetStream",
        "js.publish + PubAck -> durable pull fetch(batch=64) loop, concurrent handlers -> "
        "core NATS reply; one process, two connections",
        open_raw_nats,
    ),
    Scenario(
        "b2",
        "B2 FastStream PullSub()",
        "B1's caller -> FastStream 0.7.8 pull subscriber at defaults (batch 1, one at a "
        "time) -> core NATS reply; one process",
        open_faststream,
    ),
    Scenario(
        "b3",
        "B3 bare grpc.aio echo",
        "grpc.aio unary Ping echo, server in a child process, one channel",
        open_grpc_echo,
    ),
    Scenario(
        "o1",
        "O1 gpuproxy bus",
        "CommandCaller -> JetStream -> CommandRuntime + answer_ping (+ a results-bucket write "
        "per command) -> reply chunk; one process, two connections",
        open_gpuproxy_bus,
    ),
    Scenario(
        "o2",
        "O2 gpuproxy end to end",
        "gRPC client -> `gpuproxy gateway` -> nats-server -> `gpuproxy worker "
        "provisioner` -> back; four processes",
        open_gpuproxy_e2e,
    ),
    Scenario(
        "i0",
        "I0 chat direct",
        "aiohttp -> `gpuproxy sim-upstream` (answers at once), OpenAI chat, 16 tokens, whole "
        "and SSE (main table: whole); two processes",
        open_direct,
    ),
    Scenario(
        "i1",
        "I1 chat via gateway",
        "I0's requests -> `gpuproxy gateway` HTTP -> nats-server -> `gpuproxy worker proxy` "
        "-> the same kind of machine (main table: whole); five processes",
        open_gateway,
    ),
    Scenario(
        "p1",
        "P1 chat via LiteLLM",
        "I0's requests -> the LiteLLM proxy (`litellm --num_workers 2`, installed from PyPI "
        "into its own venv) -> the same kind of machine (main table: whole); five processes",
        open_litellm,
        on_request=True,
    ),
    Scenario(
        "i2",
        "I2 routing (table below)",
        "16 concurrent multi-turn conversations (own or shared system prompt), streamed, via "
        "the gateway to 4 sim machines with a KV cache, under round_robin, least_connections "
        "and cache_aware; eight processes",
        open_routing,
    ),
    Scenario(
        "i3",
        "I3 open streams (below)",
        "1,000 SSE streams at once (200 with --quick) via the gateway and one proxy worker "
        "(window 1100) to a machine sending a token a second; the gateway's RSS once every "
        "stream has its first chunk; five processes",
        open_streams,
    ),
)
PEERS = ("p1",)
"""The peer proxies `--peers` adds to a run, with the scenarios they are compared with."""


def select(only: str | None, *, peers: bool = False) -> list[Scenario]:
    """The scenarios named in `only` (comma separated, any case), in run order; without
    names, all but those run on request. `peers` adds the peer proxies and the scenarios
    they are compared with."""
    known = {s.name for s in SCENARIOS}
    if only:
        wanted = {name.strip().lower() for name in only.split(",") if name.strip()}
    else:
        wanted = {s.name for s in SCENARIOS if not s.on_request}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(
            f"unknown scenario {', '.join(unknown)}; choose from {', '.join(sorted(known))}"
        )
    if peers:
        wanted |= {*PEERS, *COMPARED_WITH}
    return [s for s in SCENARIOS if s.name in wanted]


def names(scenarios: Sequence[Scenario]) -> list[str]:
    return [s.name for s in scenarios]
