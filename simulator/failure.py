"""How a simulated machine fails on purpose: the modes, and the cut or death they end in."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import sys
from typing import NoReturn

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

EXIT_DIED = 3
"""Exit status of a machine that died on purpose (`FailMode.DIE`)."""


class FailMode(enum.StrEnum):
    REFUSE = "refuse"
    """Answer 503 with an OpenAI error body."""
    THROTTLE = "throttle"
    """Answer 429 (rate limited) with `Retry-After: 30`, as a provider's quota does."""
    SLOW = "slow"
    """Wait `slow_ms` more before answering (a stuck or overloaded machine)."""
    CUT = "cut"
    """Send `fail_after` tokens, then drop the connection: no final chunk, no `[DONE]`."""
    DIE = "die"
    """Send `fail_after` tokens, then the whole process exits at once: the machine died."""

    @property
    def breaks(self) -> bool:
        """Whether the answer ends broken: cut short, or with the process."""
        return self in (FailMode.CUT, FailMode.DIE)


class ConnectionCut(Exception):
    """Raised mid-answer: the server closes the connection without finishing it."""


def is_cut(exc: BaseException | None) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(is_cut(inner) for inner in exc.exceptions)
    return isinstance(exc, ConnectionCut)


class QuietCuts(logging.Filter):
    """A cut is on purpose: keep uvicorn from logging it as a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and is_cut(record.exc_info[1]))


def die() -> NoReturn:
    sys.stderr.write("sim-upstream: died on purpose (fail mode 'die')\n")
    sys.stderr.flush()
    os._exit(EXIT_DIED)


async def break_off(fail: FailMode) -> None:
    """End the answer the way `fail` says; called after the tokens it lets through."""
    # A moment for the event loop to hand what was sent to the kernel.
    await asyncio.sleep(0.05)
    if fail is FailMode.DIE:
        die()
    raise ConnectionCut


class PartialResponse(Response):
    """A whole answer announced by its Content-Length, of which only the first half is sent
    before `fail` strikes."""

    def __init__(self, content: bytes, fail: FailMode) -> None:
        super().__init__(content, media_type="application/json")
        self.fail = fail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        half = self.body[: len(self.body) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        await break_off(self.fail)
