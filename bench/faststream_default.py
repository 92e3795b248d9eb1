"""B2: the same round trip with FastStream 0.7.8's pull subscriber at its defaults.

The broker is set up the way gpuproxy's worker shell sets up its own (per-message log lines
at debug, so not written); the subscriber is `PullSub()` as it comes: one message per pull
request, each handled to the end before the next pull. The handler replies on the broker's
raw connection, so the difference to B1 is the consuming side alone. The caller is B1's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import nats
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.annotations import NatsMessage

from bench.measure import Plan, Session, this_process
from bench.processes import nats_server
from bench.raw_bus import HEADER_REPLY, RawCaller, declare_work_stream

STREAM = "BENCH_FS"
SUBJECT = "bench.fs.cmd"
REPLY_PREFIX = "bench.fs.reply"
DURABLE = "fs-worker"


def build_broker(url: str) -> NatsBroker:
    log = logging.getLogger("bench.faststream")
    log.setLevel(logging.WARNING)
    broker = NatsBroker(url, name="bench-fs-worker", logger=log, log_level=logging.DEBUG)

    @broker.subscriber(
        SUBJECT,
        # Declared beforehand exactly like B1's stream; FastStream only binds to it.
        stream=JStream(STREAM, declare=False),
        pull_sub=PullSub(),
        durable=DURABLE,
    )
    async def handle(body: bytes, msg: NatsMessage) -> None:
        await broker.connection.publish(msg.headers[HEADER_REPLY], body)

    return broker


@contextlib.asynccontextmanager
async def open_faststream(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
    with nats_server(workdir) as server:
        url = server.url
        caller_nc = await nats.connect(url, name="bench-fs-caller")
        try:
            await declare_work_stream(caller_nc, STREAM, SUBJECT)
            broker = build_broker(url)
            await broker.start()
            caller = RawCaller(
                caller_nc, subject=SUBJECT, reply_prefix=REPLY_PREFIX, timeout=plan.call_timeout
            )
            await caller.start()
            try:
                yield Session(
                    caller.call,
                    {**this_process("bench: caller+worker"), "nats-server": server.pid},
                )
            finally:
                await caller.stop()
                await broker.stop()
        finally:
            await caller_nc.close()
