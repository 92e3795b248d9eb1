"""Revision-checked records under a real conflict: no change is lost, none is applied twice."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.js.api import KeyValueConfig

from bus.connection import connect
from bus.records import Records


class Counter(msgspec.Struct, frozen=True):
    value: int
    writers: tuple[str, ...] = ()


async def test_concurrent_changes_from_two_connections_all_land(nats_url: str, nc: Client) -> None:
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket="records-test", history=1))
    other_nc = await connect(nats_url, name="other")
    other_kv = await other_nc.jetstream().key_value("records-test")
    mine = Records(kv, Counter, "mine")
    theirs = Records(other_kv, Counter, "theirs")
    await mine.create("c", Counter(0))
    computed = 0

    def bump(who: str) -> Callable[[Counter], Counter]:
        def mutate(current: Counter) -> Counter:
            nonlocal computed
            computed += 1
            return Counter(current.value + 1, (*current.writers, who))

        return mutate

    await asyncio.gather(
        *(mine.change("c", bump("mine")) for _ in range(20)),
        *(theirs.change("c", bump("theirs")) for _ in range(20)),
    )
    final = await mine.get("c")
    await other_nc.close()
    assert final is not None
    assert final.value.value == 40
    assert final.value.writers.count("mine") == final.value.writers.count("theirs") == 20
    # Conflicts happened and were recomputed from the value that won, not written over it.
    assert computed > 40


async def test_create_returns_the_record_that_won_the_race(nats_url: str, nc: Client) -> None:
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket="records-race", history=1))
    other_nc = await connect(nats_url, name="other")
    other = Records(await other_nc.jetstream().key_value("records-race"), Counter, "other")
    mine = Records(kv, Counter, "mine")
    results = await asyncio.gather(mine.create("k", Counter(1)), other.create("k", Counter(2)))
    await other_nc.close()
    winners = [versioned.value for versioned, won in results if won]
    assert len(winners) == 1
    assert results[0][0].value == results[1][0].value == winners[0]


async def test_swept_tombstones_leave_the_bucket(nc: Client) -> None:
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket="records-sweep", history=1))
    records = Records(kv, Counter, "sweep")
    for n in range(5):
        await records.create(f"gone-{n}", Counter(n))
        await records.delete(f"gone-{n}")
    await records.create("kept", Counter(9))
    before = (await js.stream_info("KV_records-sweep")).state.messages
    await asyncio.sleep(1.1)
    await records.sweep_tombstones(1)
    after = (await js.stream_info("KV_records-sweep")).state.messages
    assert (before, after) == (6, 1)
    kept = await records.get("kept")
    assert kept is not None
    assert kept.value == Counter(9)
