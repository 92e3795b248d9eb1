"""A JetStream pull consumer that keeps messages flowing, one message at a time.

A fetch-then-process loop (FastStream's pull subscriber is one) asks for a batch, runs it to
the end, and only then asks again: every fetch is a request round trip, and one slow command
holds back the next batch. Instead this keeps pull requests outstanding on one inbox
(credits), hands each message to `deliver` the moment it arrives, and tops the credits up as
handlers finish, so the window of in-flight work stays full at high load and a lone message
is handled at once at low load. `just bench` compares it with both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.codec import encode

log = logging.getLogger("gpuproxy.bus")

_STATUS = "Status"
_PENDING_MESSAGES = "Nats-Pending-Messages"


class PullConsumer:
    def __init__(
        self,
        nc: Client,
        *,
        stream: str,
        durable: str,
        window: int,
        deliver: Callable[[Msg], None],
        expires: float = 30.0,
        idle_heartbeat: float = 5.0,
    ) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._window = window
        self._deliver = deliver
        self._expires_ns = int(expires * 1e9)
        self._heartbeat = idle_heartbeat
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._requested = 0
        """Messages asked for and not yet received (or released by the server)."""
        self._in_hand = 0
        """Messages delivered and not yet `release`d by their handler."""
        self._last_seen = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        self._watchdog = asyncio.create_task(self._watch(), name="pull-watchdog")
        await self._top_up()

    async def stop(self) -> list[Msg]:
        """Stop asking for work; returns messages that arrived but were never delivered."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        left: list[Msg] = []
        if self._sub is not None:
            queue = self._sub._pending_queue
            while not queue.empty():
                msg = queue.get_nowait()
                if not msg.headers or _STATUS not in msg.headers:
                    left.append(msg)
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        return left

    def release(self) -> None:
        """A delivered message is finished (acked, naked or termed): room for another."""
        self._in_hand -= 1
        if not self._closed and self._requested + self._in_hand <= self._window // 2:
            asyncio.get_running_loop().create_task(self._top_up())

    async def _top_up(self) -> None:
        want = self._window - self._in_hand - self._requested
        if self._closed or want <= 0 or not self._nc.is_connected:
            return
        self._requested += want
        request = {
            "batch": want,
            "expires": self._expires_ns,
            "idle_heartbeat": int(self._heartbeat * 1e9),
        }
        try:
            await self._nc.publish(self._next, encode(request), reply=self._inbox)
        except Exception as exc:
            self._requested -= want
            log.warning("pull request failed: %s", type(exc).__name__)

    async def _on_message(self, msg: Msg) -> None:
        self._last_seen = time.monotonic()
        headers = msg.headers
        if headers and _STATUS in headers:
            self._on_status(headers)
            return
        self._requested = max(0, self._requested - 1)
        self._in_hand += 1
        self._deliver(msg)

    def _on_status(self, headers: dict[str, str]) -> None:
        status = headers[_STATUS]
        if status == "100":
            return  # idle heartbeat: the pull request is alive
        # 404/408: a request ended with credits unused; 409: the server dropped requests
        # (leadership change, consumer recreated). Forget what it no longer owes us.
        released = headers.get(_PENDING_MESSAGES)
        if status in ("404", "408") and released is not None:
            self._requested = max(0, self._requested - int(released))
        else:
            self._requested = 0
        asyncio.get_running_loop().create_task(self._top_up())

    async def _watch(self) -> None:
        # Pull requests live on the server: after a reconnect (server restart, another
        # cluster node) ours are gone, and without heartbeats they are gone too. Start over
        # with fresh requests rather than wait for credits that never come.
        reconnects = self._nc.stats["reconnects"]
        while True:
            await asyncio.sleep(min(1.0, self._heartbeat))
            silent = time.monotonic() - self._last_seen > 2 * self._heartbeat
            if self._nc.stats["reconnects"] != reconnects or silent:
                reconnects = self._nc.stats["reconnects"]
                self._requested = 0
                self._last_seen = time.monotonic()
                await self._top_up()
