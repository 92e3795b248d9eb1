"""`bus.consumer.PullConsumer` on its own, against a real nats-server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from bus.connection import connect
from bus.consumer import PullConsumer
from gpuproxy.natsd import NatsServer
from tests.conftest import free_port

STREAM = "PULL_TEST"


async def _stream(nc: Client, *, max_waiting: int = 512, ack_wait: float = 30) -> None:
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=["pull.>"])
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name="d",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_waiting=max_waiting,
        ),
    )


async def _publish(nc: Client, count: int, start: int = 0) -> None:
    js = nc.jetstream()
    for n in range(start, start + count):
        # The id makes a publish repeated after a timeout land once.
        await js.publish("pull.x", str(n).encode(), headers={"Nats-Msg-Id": str(n)})


async def test_no_more_than_the_window_is_in_hand_and_every_message_comes_once(
    nats_url: str, nc: Client
) -> None:
    await _stream(nc)
    await _publish(nc, 40)
    in_hand: list[Msg] = []
    seen: list[str] = []
    most = 0

    def deliver(msg: Msg) -> None:
        nonlocal most
        in_hand.append(msg)
        seen.append(msg.data.decode())
        most = max(most, len(in_hand))

    consumer = PullConsumer(nc, stream=STREAM, durable="d", window=4, deliver=deliver)
    await consumer.start()
    for _ in range(200):
        if len(seen) == 40:
            break
        await asyncio.sleep(0.02)
        while in_hand:
            await in_hand.pop(0).ack()
            consumer.release()
    await consumer.stop()
    assert sorted(seen, key=int) == [str(n) for n in range(40)]
    assert most <= 4


async def test_the_consumer_asks_again_after_the_server_restarts(tmp_path: Path) -> None:
    port = free_port()
    store = tmp_path / "js"
    server = NatsServer(store, port=port)
    url = server.start()
    got: list[str] = []
    try:
        nc = await connect(url, name="pull-test")
        await _stream(nc)

        def deliver(msg: Msg) -> None:
            got.append(msg.data.decode())
            asyncio.get_running_loop().create_task(msg.ack()).add_done_callback(
                lambda _: consumer.release()
            )

        consumer = PullConsumer(
            nc, stream=STREAM, durable="d", window=8, deliver=deliver, idle_heartbeat=0.5
        )
        await consumer.start()
        await _publish(nc, 3)
        for _ in range(100):
            if len(got) == 3:
                break
            await asyncio.sleep(0.02)
        server.stop()
        server = NatsServer(store, port=port)
        server.start()
        for attempt in range(40):
            try:
                await _publish(nc, 3, start=3)
                break
            except Exception:  # still reconnecting, or JetStream still recovering
                assert attempt < 39
                await asyncio.sleep(0.25)
        for _ in range(300):
            if len(got) == 6:
                break
            await asyncio.sleep(0.05)
        await consumer.stop()
        await nc.close()
    finally:
        server.stop()
    assert sorted(got, key=int) == ["0", "1", "2", "3", "4", "5"]


async def test_stop_hands_back_what_arrived_and_takes_nothing_more(
    nats_url: str, nc: Client
) -> None:
    await _stream(nc, ack_wait=1)
    await _publish(nc, 5)
    delivered: list[Msg] = []
    consumer = PullConsumer(nc, stream=STREAM, durable="d", window=8, deliver=delivered.append)
    await consumer.start()
    for _ in range(100):
        if len(delivered) == 5:
            break
        await asyncio.sleep(0.02)
    left = await asyncio.wait_for(consumer.stop(), 5)
    await _publish(nc, 2, start=5)
    await asyncio.sleep(0.5)
    assert len(delivered) + len(left) == 5
    assert not consumer._tasks

    # What it held and never settled comes back to the next consumer after the ack wait.
    again: list[str] = []
    second = PullConsumer(
        nc, stream=STREAM, durable="d", window=16, deliver=lambda m: again.append(m.data.decode())
    )
    await second.start()
    for _ in range(150):
        if len(again) == 7:
            break
        await asyncio.sleep(0.02)
    await second.stop()
    assert sorted(again, key=int) == [str(n) for n in range(7)]


async def test_a_refused_pull_request_is_asked_again_with_backoff_not_at_once(
    nats_url: str, nc: Client
) -> None:
    await nc.jetstream().add_stream(name=STREAM, subjects=["pull.>"])
    # A consumer that takes at most 2 per request refuses ours (409) every time it asks.
    config = {"durable_name": "d", "ack_policy": "explicit", "max_batch": 2}
    answer = await nc.request(
        f"$JS.API.CONSUMER.CREATE.{STREAM}.d",
        json.dumps({"stream_name": STREAM, "config": config}).encode(),
        timeout=5,
    )
    assert b'"error"' not in answer.data
    spy = await connect(nats_url, name="spy")
    requests = 0

    async def count(msg: Msg) -> None:
        nonlocal requests
        requests += 1

    await spy.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.d", cb=count)
    await spy.flush()
    consumer = PullConsumer(nc, stream=STREAM, durable="d", window=4, deliver=lambda m: None)
    await consumer.start()
    await asyncio.sleep(1.5)
    await consumer.stop()
    await spy.close()
    # Without backoff it asks again the moment it is refused, hundreds of times a second.
    assert requests < 30
