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
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.codec import encode
from bus.tasks import cancel_and_wait

log = logging.getLogger("gpuproxy.bus")

_STATUS = "Status"
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 2.0
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
        self._left: list[Msg] = []
        """Messages that arrived after `stop` began: never delivered, handed back by the caller."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._backoff = 0.0
        """Seconds before the next pull request after the server dropped ours (409/503)."""

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        self._watchdog = asyncio.create_task(self._watch(), name="pull-watchdog")
        await self._top_up()

    async def stop(self) -> list[Msg]:
        """Stop asking for work; returns messages that arrived but were never delivered."""
        self._closed = True
        tasks = [t for t in (self._watchdog, *self._tasks) if t is not None]
        await cancel_and_wait(tasks)
        if self._sub is not None:
            # Drain runs every message already received through `_on_message`, which now
            # keeps them in `_left` instead of delivering them, then unsubscribes.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sub.drain(), 5.0)  # type: ignore[no-untyped-call]
        left, self._left = self._left, []
        return left

    def release(self) -> None:
        """A delivered message is finished (acked, naked or termed): room for another."""
        self._in_hand -= 1
        if not self._closed and self._requested + self._in_hand <= self._window // 2:
            self._spawn(self._top_up())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        # Kept until done: the event loop holds only weak references to tasks.
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            if not self._closed:
                self._on_status(headers)
            return
        if self._closed:
            self._left.append(msg)
            return
        self._backoff = 0.0
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
            self._spawn(self._top_up())
            return
        self._requested = 0
        # The server refused or dropped our requests (409 too many waiting, consumer being
        # recreated; 503 no responders while a leader is elected): asking again at once
        # would only hammer it, so back off, doubling up to a couple of seconds.
        self._backoff = min(max(self._backoff * 2, _FIRST_BACKOFF), _MAX_BACKOFF)
        self._spawn(self._top_up_after(self._backoff))

    async def _top_up_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._top_up()

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
