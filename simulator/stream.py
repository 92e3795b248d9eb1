"""Noticing at once that a client went away, while an answer is being made or streamed.

A server that only learns of a gone client when its next write fails keeps a slot (and,
in a real one, a GPU) busy for as long as its slowest delay. Here a listener waits on the
connection beside the work and cancels the work the moment the client disconnects, so a
stream with a one-second token delay stops within milliseconds, as vLLM's does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from simulator.stats import Outcome, Visit

Emit = Callable[[bytes], Awaitable[None]]
"""Sends one frame of a stream."""


class ClientWatch:
    gone = False
    """The client disconnected, and the work in the watch was cancelled for it."""


@asynccontextmanager
async def watching(receive: Receive) -> AsyncIterator[ClientWatch]:
    """Run the block unless the client goes away; if it does, the block is cancelled and
    the watch says so. Only for after the request body has been read."""
    watch = ClientWatch()
    async with anyio.create_task_group() as group:

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            watch.gone = True
            group.cancel_scope.cancel()

        group.start_soon(listen)
        yield watch
        group.cancel_scope.cancel()


class EventStream(Response):
    """Server-sent events from `produce`, which is cancelled if the client goes away; the
    request's visit ends with how the stream ended."""

    media_type = "text/event-stream"

    def __init__(self, produce: Callable[[Emit], Awaitable[None]], visit: Visit) -> None:
        self.produce = produce
        self.visit = visit
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def emit(frame: bytes) -> None:
            await send({"type": "http.response.body", "body": frame, "more_body": True})

        finished = False
        gone = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with watching(receive) as watch:
                await self.produce(emit)
                finished = True
            gone = watch.gone
            if finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except* OSError:
            # A server on ASGI 2.4 tells of a gone client by failing the write.
            gone = True
        finally:
            if finished:
                self.visit.end(Outcome.COMPLETED)
            elif gone:
                self.visit.end(Outcome.DISCONNECTED)
            else:
                self.visit.end(Outcome.FAILED)
