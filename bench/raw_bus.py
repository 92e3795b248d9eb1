"""What B1 and B2 share: the work-queue stream and the caller, on plain nats-py.

The stream is configured like gpuproxy's command stream (file storage, work-queue
retention, the same dedupe window) and every command carries a `Nats-Msg-Id`, so the
server does the same work per command in the baselines as in gpuproxy's path.
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from bench.measure import expect
from schemas.topology import DEDUPE_WINDOW_SECONDS

HEADER_REPLY = "Bench-Reply"
HEADER_MSG_ID = "Nats-Msg-Id"


async def declare_work_stream(nc: Client, name: str, subject: str) -> None:
    await nc.jetstream().add_stream(
        StreamConfig(
            name=name,
            subjects=[subject],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=DEDUPE_WINDOW_SECONDS,
        )
    )


def consumer_config(durable: str) -> ConsumerConfig:
    """A durable pull consumer shaped like gpuproxy's (explicit ack, same pending limit)."""
    return ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=5,
        max_ack_pending=4096,
    )


class RawCaller:
    """Publish to JetStream, await the PubAck, then await the reply on core NATS.

    One wildcard subscription carries every reply; each call waits on a future keyed by the
    last token of its reply subject.
    """

    def __init__(self, nc: Client, *, subject: str, reply_prefix: str, timeout: float) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._subject = subject
        self._reply_prefix = reply_prefix
        self._timeout = timeout
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._reply_prefix}.*", cb=self._on_reply)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def call(self, n: int) -> None:
        token = str(n)
        sent = f"bench-{n}"
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            ack = await self._js.publish(
                self._subject,
                sent.encode(),
                timeout=self._timeout,
                headers={
                    HEADER_MSG_ID: f"cmd-{n}",
                    HEADER_REPLY: f"{self._reply_prefix}.{token}",
                },
            )
            if ack.duplicate:
                raise AssertionError(f"command {n} was taken for a duplicate")
            answer = await asyncio.wait_for(future, self._timeout)
        finally:
            del self._waiting[token]
        expect(sent, answer.decode())

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject.rsplit(".", 1)[-1])
        if future is not None and not future.done():
            future.set_result(msg.data)
