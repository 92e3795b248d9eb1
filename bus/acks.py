"""JetStream's acknowledgements of publishes, read cheaply.

nats-py's `js.publish` makes a request per call (a waiter task, json.loads and a dataclass per
acknowledgement); on the command path that is measurable (`just bench`). These are the same
exchanges with msgspec decoding and one subscription for many publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription


class PubAck(msgspec.Struct):
    """JetStream's answer to a publish."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, object] | None = None


pub_ack = msgspec.json.Decoder(PubAck)


class AckedPublisher:
    """JetStream publishes whose acknowledgements come back on one subscription, one
    future per publish."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Future[bool]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_ack)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def publish(self, subject: str, payload: bytes, timeout: float) -> bool:
        """True once JetStream has stored the message; False when it has not within
        `timeout` (each try waits up to a second: a lost publish is sent again)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while True:
            token = str(next(self._tokens))
            waiter = self._waiting[token] = loop.create_future()
            timer = loop.call_later(
                min(1.0, max(give_up - loop.time(), 0.0)), _settle_waiter, waiter, False
            )
            try:
                with contextlib.suppress(Exception):
                    await self._nc.publish(subject, payload, reply=f"{self._prefix}.{token}")
                if await waiter:
                    return True
            finally:
                timer.cancel()
                del self._waiting[token]
            if loop.time() >= give_up:
                return False
            await asyncio.sleep(0.05)

    async def _on_ack(self, msg: Msg) -> None:
        waiter = self._waiting.get(msg.subject.rsplit(".", 1)[-1])
        if waiter is None:
            return
        stored = False
        if not (msg.headers and msg.headers.get("Status") == "503"):
            try:
                stored = pub_ack.decode(msg.data).error is None
            except msgspec.DecodeError:
                stored = False
        _settle_waiter(waiter, stored)


def _settle_waiter(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
