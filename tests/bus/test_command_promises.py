"""What a retry, a duplicate, a worker that dies and a worker that drains get (issue 9)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from bus.caller import CommandCaller
from bus.connection import connect
from bus.events import EventPublisher
from bus.runtime import CommandRuntime, Context
from schemas import subjects, topology
from schemas.commands import Ping
from schemas.errors import IdempotencyKeyReused, Internal
from schemas.events import CommandDeadLettered
from schemas.replies import Pong
from schemas.subjects import WorkerKind
from tests.bus.harness import Endless, running_caller, running_worker
from tests.bus.test_command_path import dead_letters
from workers.common.ping import answer_ping


def keyed_ping(key: str, message: str = "hi") -> Ping:
    return Ping(command_id=f"k-{key}", message=message)


async def test_the_same_key_with_another_body_is_refused_naming_the_key(
    nats_url: str, nc: Client
) -> None:
    key = uuid.uuid4().hex
    async with running_worker(nats_url, {Ping: answer_ping}), running_caller(nc) as caller:
        first = await caller.call(WorkerKind.PROVISIONER, keyed_ping(key, "one"), timeout=5)
        again = await caller.call(WorkerKind.PROVISIONER, keyed_ping(key, "one"), timeout=5)
        with pytest.raises(IdempotencyKeyReused) as raised:
            await caller.call(WorkerKind.PROVISIONER, keyed_ping(key, "two"), timeout=5)
    assert first == again
    assert raised.value.field == "idempotency-key"


async def test_a_keyed_retry_with_another_issue_time_is_the_same_request(
    nats_url: str, nc: Client
) -> None:
    key = uuid.uuid4().hex
    async with running_worker(nats_url, {Ping: answer_ping}), running_caller(nc) as caller:
        first = await caller.call(
            WorkerKind.PROVISIONER,
            Ping(command_id=f"k-{key}", message="m", issued_at_ms=1),
            timeout=5,
        )
        again = await caller.call(
            WorkerKind.PROVISIONER,
            Ping(command_id=f"k-{key}", message="m", issued_at_ms=2),
            timeout=5,
        )
    assert first == again


async def _worker(
    url: str, handler: object, *, max_deliver: int, ack_wait: float
) -> tuple[Client, CommandRuntime]:
    nc = await connect(url, name="test-worker")
    runtime = CommandRuntime(
        nc,
        kind=WorkerKind.PROVISIONER,
        handlers={Ping: handler},  # type: ignore[dict-item]
        worker_id=f"w-{uuid.uuid4().hex[:6]}",
        ack_wait=ack_wait,
        max_deliver=max_deliver,
    )
    await runtime.start()
    return nc, runtime


async def test_a_command_whose_workers_keep_dying_ends_dead_lettered_for_caller_and_retry(
    nats_url: str, nc: Client
) -> None:
    started = asyncio.Event()

    async def hangs(command: Ping, ctx: Context) -> Pong:
        started.set()
        await asyncio.sleep(60)
        raise AssertionError("not reached")

    command = Ping(command_id=uuid.uuid4().hex, message="doomed")
    async with running_caller(nc) as caller:
        call = asyncio.create_task(caller.call(WorkerKind.PROVISIONER, command, timeout=20))
        dead: list[CommandRuntime] = []
        for _ in range(2):
            # A worker that dies mid-command: its connection goes, it never acks or naks.
            started.clear()
            dying_nc, runtime = await _worker(nats_url, hangs, max_deliver=2, ack_wait=0.5)
            await asyncio.wait_for(started.wait(), 10)
            await dying_nc.close()
            dead.append(runtime)
        async with running_worker(nats_url, {Ping: answer_ping}, max_deliver=2, ack_wait=0.5):
            with pytest.raises(Internal) as raised:
                await asyncio.wait_for(call, 15)
            with pytest.raises(Internal):
                await caller.call(WorkerKind.PROVISIONER, command, timeout=5)
        for runtime in dead:
            # What is left of the dead workers in this process: their hung handlers.
            await runtime.stop(drain_timeout=0)
    assert "delivered 2 times" in raised.value.message
    [event] = await dead_letters(nc)
    assert (event.command_id, event.deliveries) == (command.command_id, 2)


async def test_draining_a_worker_never_spends_the_delivery_budget(
    nats_url: str, nc: Client
) -> None:
    started = asyncio.Event()

    async def long(command: Ping, ctx: Context) -> Pong:
        started.set()
        await asyncio.sleep(command.delay_ms / 1000)
        return await answer_ping(command, ctx)

    async with running_caller(nc) as caller:
        call = asyncio.create_task(
            caller.call(
                WorkerKind.PROVISIONER,
                Ping(command_id=uuid.uuid4().hex, delay_ms=30_000),
                timeout=30,
            )
        )
        for _ in range(3):
            # Each replica is stopped while the command runs: three drains, budget one.
            started.clear()
            async with running_worker(nats_url, {Ping: long}, max_deliver=1) as draining:
                await asyncio.wait_for(started.wait(), 10)
                assert await draining.stop(drain_timeout=0.05) == 1

        async def quick(command: Ping, ctx: Context) -> Pong:
            return Pong(
                message="done", worker_kind="", worker_id=ctx.worker_id, attempt=ctx.attempt
            )

        async with running_worker(nats_url, {Ping: quick}, max_deliver=1):
            reply = await asyncio.wait_for(call, 10)
    assert isinstance(reply, Pong)
    assert reply.message == "done"


async def test_replicas_with_other_ack_waits_keep_the_consumer_as_first_declared(
    nats_url: str, nc: Client
) -> None:
    async with running_worker(nats_url, {Ping: answer_ping}, ack_wait=7.0) as first:
        info_before = await nc.jetstream().consumer_info(topology.COMMAND_STREAM, "provisioner")
        async with running_worker(nats_url, {Ping: answer_ping}, ack_wait=2.0) as second:
            info_after = await nc.jetstream().consumer_info(topology.COMMAND_STREAM, "provisioner")
    assert info_before.config.ack_wait == info_after.config.ack_wait == 7.0
    assert first.ack_wait == second.ack_wait == 7.0
    assert info_after.config.max_deliver == -1


async def test_stop_ends_even_a_handler_that_swallows_one_cancellation(
    nats_url: str, nc: Client
) -> None:
    started = asyncio.Event()

    async def obstinate(command: Ping, ctx: Context) -> Pong:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            # As nats-py's wait_for can on Python 3.11: the cancellation is lost.
            await asyncio.sleep(30)
        raise AssertionError("not reached")

    async with running_caller(nc) as caller:
        call = asyncio.create_task(
            caller.call(WorkerKind.PROVISIONER, Ping(command_id=uuid.uuid4().hex), timeout=30)
        )
        async with running_worker(nats_url, {Ping: obstinate}) as worker:
            await asyncio.wait_for(started.wait(), 5)
            handed_back = await asyncio.wait_for(worker.stop(drain_timeout=0.05), 5)
        call.cancel()
    assert handed_back == 1


async def test_an_event_pushed_onto_the_cancel_subject_by_a_consumer_cancels_nothing(
    nats_url: str, nc: Client
) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    async def long(command: Ping, ctx: Context) -> Pong:
        started.set()
        try:
            await asyncio.sleep(command.delay_ms / 1000)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return await answer_ping(command, ctx)

    command = Ping(command_id=uuid.uuid4().hex, message="kept", delay_ms=1500)
    async with running_worker(nats_url, {Ping: long}), running_caller(nc) as caller:
        call = asyncio.create_task(caller.call(WorkerKind.PROVISIONER, command, timeout=10))
        await asyncio.wait_for(started.wait(), 5)
        js = nc.jetstream()
        # A push consumer of the event log delivering onto the workers' cancel subject,
        # and an event that names the running command.
        await js.add_consumer(
            topology.EVENT_STREAM,
            ConsumerConfig(deliver_subject=subjects.cancel(WorkerKind.PROVISIONER)),
        )
        await EventPublisher(js).publish(
            CommandDeadLettered(
                event_id="forged",
                occurred_at_ms=1,
                command_id=command.command_id,
                subject="x",
                deliveries=1,
                error=Internal("x").to_info(),
            )
        )
        reply = await call
    assert isinstance(reply, Pong)
    assert reply.message == "kept"
    assert not stopped.is_set()


@pytest.mark.parametrize("keyed", [False, True], ids=["without-key", "with-key"])
async def test_a_caller_that_leaves_before_its_publish_is_confirmed_still_stops_the_command(
    nats_url: str, nc: Client, keyed: bool
) -> None:
    # JetStream's confirmation is held back until the caller has left, as on a busy machine
    # where the worker starts the command before the gateway reads the PubAck.
    endless = Endless()
    held: list[Msg] = []
    holding = True
    caller = CommandCaller(nc, gateway_id=f"gw-{uuid.uuid4().hex[:6]}")
    deliver = caller._on_reply

    async def holding_acks(msg: Msg) -> None:
        if holding and msg.subject.rsplit(".", 1)[-1].startswith("a"):
            held.append(msg)
        else:
            await deliver(msg)

    caller._on_reply = holding_acks  # type: ignore[method-assign]
    await caller.start()
    command = keyed_ping(uuid.uuid4().hex) if keyed else Ping(command_id=uuid.uuid4().hex)
    try:
        async with running_worker(nats_url, {Ping: endless}):
            call = asyncio.create_task(caller.call(WorkerKind.PROVISIONER, command, timeout=30))
            await asyncio.wait_for(endless.started.wait(), 5)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            holding = False
            for msg in held:
                await deliver(msg)
            await asyncio.wait_for(endless.stopped.wait(), 5)
    finally:
        await caller.stop()
