"""B1: the command round trip on plain nats-py, both ends in this process.

The worker is the plain approach: a loop of `fetch` on a durable pull subscription, each
message handled in its own task (reply on core NATS, then ack) so the loop fetches again
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bench.measure import Plan, Session, this_process
from bench.processes import nats_server
from bench.raw_bus import HEADER_REPLY, RawCaller, consumer_config, declare_work_stream

STREAM = "BENCH_RAW"
SUBJECT = "bench.raw.cmd"
REPLY_PREFIX = "bench.raw.reply"
DURABLE = "raw-worker"
FETCH_BATCH = 64
"""Messages one pull may bring: gpuproxy's default worker window, so both hold as many
credits. With nats-py 2.16 and nats-server 2.15, `fetch(batch=64)` hands back whatever is
pending as soon as the first message is there (checked: a lone message returns at once,
not at the timeout), so a single call is not held back waiting for a full batch."""
FETCH_TIMEOUT = 5.0


class RawWorker:
    def __init__(self, nc: Client, psub: JetStreamContext.PullSubscription) -> None:
        self._nc = nc
        self._psub = psub
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._fetch_loop(), name="raw-fetch")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _fetch_loop(self) -> None:
        while True:
            try:
                msgs = await self._psub.fetch(batch=FETCH_BATCH, timeout=FETCH_TIMEOUT)
            except TimeoutError:
                continue
            for msg in msgs:
                task = asyncio.create_task(self._handle(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        reply_to = (msg.headers or {})[HEADER_REPLY]
        await self._nc.publish(reply_to, msg.data)
        await msg.ack()


@contextlib.asynccontextmanager
async def open_raw_nats(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
    with nats_server(workdir) as server:
        url = server.url
        caller_nc = await nats.connect(url, name="bench-raw-caller")
        worker_nc = await nats.connect(url, name="bench-raw-worker")
        try:
            await declare_work_stream(caller_nc, STREAM, SUBJECT)
            psub = await worker_nc.jetstream().pull_subscribe(
                SUBJECT, durable=DURABLE, stream=STREAM, config=consumer_config(DURABLE)
            )
            worker = RawWorker(worker_nc, psub)
            caller = RawCaller(
                caller_nc, subject=SUBJECT, reply_prefix=REPLY_PREFIX, timeout=plan.call_timeout
            )
            await caller.start()
            worker.start()
            try:
                yield Session(
                    caller.call,
                    {**this_process("bench: caller+worker"), "nats-server": server.pid},
                )
            finally:
                await caller.stop()
                await worker.stop()
        finally:
            await caller_nc.close()
            await worker_nc.close()
