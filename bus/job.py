"""One delivery of a command in a worker, and what its handler may do with it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.codec import encode
from bus.frames import data_frame
from schemas.control import CREDIT_WINDOW
from schemas.errors import Unavailable
from schemas.replies import Heartbeat

CREDIT_PATIENCE = 300.0
"""Seconds a worker waits for a caller that takes nothing: a gateway that died sends no
cancel, and the machine's connection must not stay open for ever."""


@dataclass(eq=False)
class Job:
    nc: Client
    msg: Msg
    key: str
    """The message id: one run of one command (`subjects.message_id`)."""
    command_id: str
    run: int
    attempt: int
    reply_to: str | None
    started: float = field(default_factory=time.monotonic)
    progressed: float = field(default_factory=time.monotonic)
    """When JetStream was last told the command is still being worked on."""
    seq: int = 0
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    pieces_sent: int = 0
    pieces_consumed: int = 0
    """What the caller said it has taken (`Credit`): at most `CREDIT_WINDOW` more go out."""
    credit_waiter: asyncio.Future[None] | None = None
    effects: list[Awaitable[None]] = field(default_factory=list)
    """Work the handler left for after the answer (`Context.after`)."""

    def head(self, seq: int) -> dict[str, Any]:
        return {"command_id": self.command_id, "attempt": self.attempt, "seq": seq}

    async def reply(self, make: Callable[[int], msgspec.Struct]) -> None:
        """Send the caller the next chunk, numbered in order."""
        if self.reply_to is None:
            return
        seq = self.seq
        self.seq += 1
        await self.nc.publish(self.reply_to, encode(make(seq)))

    async def reply_data(self, body: bytes) -> None:
        """Send the caller the next piece of a streamed answer, as a data frame, once the
        caller has room for it: a handler streaming to a slow reader waits here."""
        if self.reply_to is None:
            return
        while self.pieces_sent - self.pieces_consumed >= CREDIT_WINDOW:
            self.credit_waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.credit_waiter, CREDIT_PATIENCE)
            except TimeoutError:
                raise Unavailable(
                    f"the caller took no piece of the answer for {CREDIT_PATIENCE:.0f} s"
                ) from None
            finally:
                self.credit_waiter = None
        self.pieces_sent += 1
        seq = self.seq
        self.seq += 1
        await self.nc.publish(self.reply_to, data_frame(self.command_id, self.attempt, seq, body))

    def credit(self, consumed: int) -> None:
        if consumed > self.pieces_consumed:
            self.pieces_consumed = consumed
            if self.credit_waiter is not None and not self.credit_waiter.done():
                self.credit_waiter.set_result(None)


def heartbeat(job: Job, seq: int) -> Heartbeat:
    return Heartbeat(**job.head(seq))


class Context:
    """What a handler may know and do besides returning its reply."""

    def __init__(self, job: Job, *, worker_id: str, worker_kind: str) -> None:
        self._job = job
        self.worker_id = worker_id
        self.worker_kind = worker_kind

    @property
    def attempt(self) -> int:
        return self._job.attempt

    @property
    def caller_left(self) -> bool:
        """The command is being cancelled because its caller went away (not a shutdown)."""
        return self._job.cancel_reason is not None

    def after(self, effect: Awaitable[None]) -> None:
        """Run `effect` once the caller has its answer, before the command is acked: a fact
        to record (a usage event) costs the caller no latency, yet a crash before it is
        stored redelivers the command instead of losing it. `effect` handles its own errors."""
        self._job.effects.append(effect)

    async def send(self, body: bytes) -> None:
        """Stream a piece of the answer to the caller now."""
        await self._job.reply_data(body)
