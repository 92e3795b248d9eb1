"""One call's inbox on the gateway: reply chunks checked for attempt and sequence.

This is the gateway's hottest path, so a wait is a future, not a task: woken by the reply
subscription and expired by one timer.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any, TypeVar

from nats.aio.msg import Msg

from schemas.errors import DeadlineExceeded, Internal, Unavailable
from schemas.replies import Chunk, Data, Failure, Heartbeat, Result

T = TypeVar("T")


def _expire(waiter: asyncio.Future[Any], error: Callable[[], Exception]) -> None:
    if not waiter.done():
        waiter.set_exception(error())


def _no_answer() -> Exception:
    return DeadlineExceeded("no answer from a worker before the deadline")


def _silent() -> Exception:
    return Unavailable(
        "the worker went silent mid-answer (no piece and no heartbeat); the answer is incomplete"
    )


async def within(waiter: asyncio.Future[T], seconds: float, error: Callable[[], Exception]) -> T:
    """Await `waiter` for at most `seconds`.

    Not `asyncio.wait_for`: on Python 3.11 it returns the result and drops a cancellation
    that arrives as the future completes, and a call cancelled that way never tells its
    worker to stop. Awaiting the future itself cancels cleanly.
    """
    loop = asyncio.get_running_loop()
    timer = loop.call_later(max(seconds, 0), _expire, waiter, error)
    try:
        return await waiter
    finally:
        timer.cancel()


class Inbox:
    """The chunks of one call, in arrival order, checked for attempt and sequence."""

    __slots__ = (
        "_attempt",
        "_chunks",
        "_expected",
        "_waiter",
        "ack",
        "heard",
        "publishing",
        "run",
        "sent",
        "streamed",
        "taken",
    )

    def __init__(self) -> None:
        self._chunks: collections.deque[Chunk] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.ack: asyncio.Future[Msg] | None = None
        """JetStream's answer to the publish of this call's command."""
        self._attempt = 0
        self._expected = 0
        self.streamed = False
        self.heard = 0.0
        self.taken = 0
        """Pieces (`Data`) the consumer has taken: what the worker's credit counts."""
        """When the last chunk of any kind arrived (monotonic seconds); 0: none yet."""
        self.sent = False
        """This call's publish is the one JetStream took (not a repeat of an earlier call's):
        only then may its departure stop the command."""
        self.run = 0
        self.publishing: int | None = None
        """The run whose publish JetStream has not confirmed yet: the worker may have it."""

    def put(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)
        self.heard = time.monotonic()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, deadline: float, silence: float = 0.0) -> Data | Result | Failure:
        """The next chunk that matters: heartbeats, repeats and superseded attempts skipped.

        With `silence`, once part of the answer has been streamed, a worker that sends
        nothing (not even a heartbeat) for that long has died: the call ends then, not at
        its deadline.
        """
        while True:
            while not self._chunks:
                self._waiter = asyncio.get_running_loop().create_future()
                until, error = deadline, _no_answer
                if silence and self.streamed and self.heard + silence < deadline:
                    until, error = self.heard + silence, _silent
                try:
                    await within(self._waiter, until - time.monotonic(), error)
                finally:
                    self._waiter = None
            chunk = self._accept(self._chunks.popleft())
            if chunk is not None:
                return chunk

    def _accept(self, chunk: Chunk) -> Data | Result | Failure | None:
        if chunk.attempt != self._attempt:
            if chunk.attempt < self._attempt:
                return None  # a late chunk of an attempt already superseded
            if self.streamed:
                # Part of the answer is already with the client; a restart would repeat it.
                raise Unavailable("the worker was lost mid-stream; the answer is incomplete")
            self._attempt, self._expected = chunk.attempt, 0
        if chunk.seq < self._expected:
            return None
        if chunk.seq > self._expected:
            raise Internal("a reply chunk was lost on the way")
        self._expected += 1
        if isinstance(chunk, Heartbeat):
            return None
        if isinstance(chunk, Data):
            self.streamed = True
        return chunk
