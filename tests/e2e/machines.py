"""Machines for inference tests: `sim-upstream` processes the registry says are running.

The proxy learns where it may send inference from the instance registry alone, so a test that
needs a machine with a set behaviour (cut streams, a death, slow tokens) starts one and writes
its record, as the provisioner would once it ran. Systems using these run without a
provisioner, whose reconciler would rightly fail a machine its marketplace never made.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import msgspec
import openai
from nats.aio.client import Client

from bus.topology import declare_bucket
from schemas import subjects, topology
from schemas.events import InferenceUsed
from schemas.gpus import Instance, InstanceState, ProviderName
from simulator.upstream import DEFAULT_MODEL
from tests.e2e.system import System
from tests.providers.test_sim_upstream import Server, started


@contextmanager
def sim_machine(tmp_path: Path, *args: str) -> Iterator[Server]:
    log = tmp_path / f"sim-{uuid.uuid4().hex[:6]}.log"
    with started([*args, "--owner-pid", str(os.getpid())], log) as server:
        yield server


@contextmanager
def sim_machines(tmp_path: Path, count: int, *args: str) -> Iterator[list[Server]]:
    """`count` machines, started together: each boots while the others do."""
    servers = [
        Server(
            [*args, "--owner-pid", str(os.getpid())], tmp_path / f"sim-{uuid.uuid4().hex[:6]}.log"
        )
        for _ in range(count)
    ]
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


async def register(nc: Client, server: Server, *, owner: str, price_micros: int = 1_000_000) -> str:
    """Record the machine as a running `sim` instance of `owner`; returns its id."""
    return await register_endpoint(
        nc, server.url, owner=owner, provider="sim", price_micros=price_micros
    )


async def register_endpoint(
    nc: Client, endpoint: str, *, owner: str, provider: str, price_micros: int = 1_000_000
) -> str:
    """Record a running instance of `provider` at `endpoint`, owned by `owner`."""
    instance_id = f"i-{uuid.uuid4().hex[:12]}"
    now = int(time.time() * 1000)
    record = Instance(
        id=instance_id,
        owner=owner,
        provider=ProviderName(provider),
        offer_id="test",
        state=InstanceState.RUNNING,
        provider_id=f"test-{instance_id}",
        endpoint=endpoint,
        price_per_hour_micros=price_micros,
        vram_gb=24,
        created_at_ms=now,
        state_since_ms=now,
    )
    kv = await declare_bucket(nc.jetstream(), topology.instances_bucket())
    await kv.put(instance_id, msgspec.json.encode(record))
    return instance_id


async def served(client: openai.AsyncOpenAI, model: str, *, count: int = 1) -> None:
    """Wait until `/v1/models` lists `model` on `count` machines (the proxy asked them)."""
    for _ in range(300):
        listed = await client.models.list()
        if any(m.id == model and (m.model_extra or {})["instances"] >= count for m in listed.data):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{model} never served by {count} machines")


E = TypeVar("E")


async def events_of(nc: Client, aggregate: str, fact: str, kind: type[E]) -> list[E]:
    """Every event of one kind in the log so far, oldest first."""
    sub = await nc.jetstream().subscribe(
        subjects.event(aggregate, fact), stream=topology.EVENT_STREAM, ordered_consumer=True
    )
    found: list[E] = []
    while True:
        try:
            msg = await sub.next_msg(timeout=1)
        except TimeoutError:
            break
        found.append(msgspec.json.decode(msg.data, type=kind))
    await sub.unsubscribe()
    return found


async def usage_events(nc: Client) -> list[InferenceUsed]:
    return await events_of(nc, "usage", "inference", InferenceUsed)


async def ask_repeatedly(
    client: openai.AsyncOpenAI, times: int
) -> list[openai.types.chat.ChatCompletion]:
    """`times` short chat completions, one after the other."""
    return [
        await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=2
        )
        for _ in range(times)
    ]


def sdk(system: System, *, timeout: float = 30) -> openai.AsyncOpenAI:
    """The `openai` SDK pointed at the gateway, with the admin's key and no retries."""
    return openai.AsyncOpenAI(
        base_url=f"{system.http_base}/v1", api_key=system.api_key, max_retries=0, timeout=timeout
    )
