"""Worker heartbeats in the workers bucket: put while a replica runs, gone once it is not."""

from __future__ import annotations

import asyncio
import os
import time

import msgspec
import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from bus.connection import connect
from schemas import topology
from schemas.heartbeat import WorkerHeartbeat
from schemas.subjects import WorkerKind
from workers.common.presence import Presence

PERIOD = 0.3


async def beat(kv: KeyValue, key: str) -> WorkerHeartbeat | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return msgspec.json.decode(entry.value or b"", type=WorkerHeartbeat)


async def gone(kv: KeyValue, key: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while await beat(kv, key) is not None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def test_a_running_replica_renews_its_heartbeat_with_what_it_is_doing(
    nats_url: str, nc: Client
) -> None:
    running = [0]
    presence = Presence(
        nc, kind=WorkerKind.PROXY, worker_id="proxy-a", in_flight=lambda: running[0], period=PERIOD
    )
    await presence.start()
    try:
        kv = await nc.jetstream().key_value(topology.WORKERS_BUCKET)
        first = await beat(kv, "proxy.proxy-a")
        running[0] = 3
        await asyncio.sleep(PERIOD * 4)  # longer than the TTL: only renewal keeps it
        later = await beat(kv, "proxy.proxy-a")
        ttl = (await kv.status()).ttl
    finally:
        await presence.stop()
    assert first is not None
    assert later is not None
    assert (first.kind, first.worker_id, first.pid, first.in_flight) == (
        "proxy",
        "proxy-a",
        os.getpid(),
        0,
    )
    assert later.in_flight == 3
    assert later.started_at_ms == first.started_at_ms
    assert later.seen_at_ms > first.seen_at_ms
    assert ttl == pytest.approx(PERIOD * 3)


async def test_a_clean_stop_deletes_the_heartbeat_at_once(nc: Client) -> None:
    presence = Presence(nc, kind=WorkerKind.BILLING, worker_id="billing-a", in_flight=lambda: 0)
    await presence.start()
    kv = await nc.jetstream().key_value(topology.WORKERS_BUCKET)
    assert await beat(kv, "billing.billing-a") is not None
    await presence.stop()
    assert await beat(kv, "billing.billing-a") is None


async def test_the_heartbeat_of_a_replica_that_lost_the_bus_ages_out(
    nats_url: str, nc: Client
) -> None:
    doomed = await connect(nats_url, name="doomed-worker")
    presence = Presence(
        doomed,
        kind=WorkerKind.PROVISIONER,
        worker_id="provisioner-a",
        in_flight=lambda: 0,
        period=PERIOD,
    )
    await presence.start()
    kv = await nc.jetstream().key_value(topology.WORKERS_BUCKET)
    assert await beat(kv, "provisioner.provisioner-a") is not None
    await doomed.close()  # as a killed process: no stop, no delete
    try:
        assert await gone(kv, "provisioner.provisioner-a", timeout=PERIOD * 3 + 5)
    finally:
        await presence.stop()
