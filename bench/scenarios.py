"""The scenarios a run can pick from, baselines first, in the order they run."""

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

Opener = Callable[[Path, Plan], AbstractAsyncContextManager[Session]]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    what: str
    open: Opener


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
        "i2",
        "I2 routing (table below)",
        "16 concurrent multi-turn conversations (own or shared system prompt), streamed, via "
        "the gateway to 4 sim machines with a KV cache, under round_robin, least_connections "
        "and cache_aware; eight processes",
        open_routing,
    ),
)


def select(only: str | None) -> list[Scenario]:
    """The scenarios named in `only` (comma separated, any case), in run order; all if None."""
    if not only:
        return list(SCENARIOS)
    wanted = {name.strip().lower() for name in only.split(",") if name.strip()}
    known = {s.name for s in SCENARIOS}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(
            f"unknown scenario {', '.join(unknown)}; choose from {', '.join(sorted(known))}"
        )
    return [s for s in SCENARIOS if s.name in wanted]


def names(scenarios: Sequence[Scenario]) -> list[str]:
    return [s.name for s in scenarios]
