"""In-process worker runtimes and callers on a real nats-server, for bus behaviour tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from nats.aio.client import Client

from bus.caller import CommandCaller
from bus.connection import connect
from bus.runtime import CommandRuntime, Context, Handler
from schemas.commands import CommandBase, Ping
from schemas.replies import Pong
from schemas.subjects import WorkerKind


@asynccontextmanager
async def running_worker(
    url: str,
    handlers: Mapping[type[CommandBase], Handler],
    *,
    kind: WorkerKind = WorkerKind.PROVISIONER,
    ack_wait: float = 30.0,
    max_deliver: int = 5,
    window: int = 64,
) -> AsyncIterator[CommandRuntime]:
    nc = await connect(url, name="test-worker")
    runtime = CommandRuntime(
        nc,
        kind=kind,
        handlers=handlers,
        worker_id=f"w-{uuid.uuid4().hex[:6]}",
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        window=window,
    )
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop(drain_timeout=5)
        await nc.close()


@asynccontextmanager
async def running_caller(nc: Client) -> AsyncIterator[CommandCaller]:
    caller = CommandCaller(nc, gateway_id=f"gw-{uuid.uuid4().hex[:6]}")
    await caller.start()
    try:
        yield caller
    finally:
        await caller.stop()


class Endless:
    """A handler that runs until it is stopped, and tells when it started and stopped."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()

    async def __call__(self, command: Ping, ctx: Context) -> Pong:
        self.started.set()
        try:
            await asyncio.sleep(30)
        finally:
            self.stopped.set()
        raise AssertionError("not reached")
