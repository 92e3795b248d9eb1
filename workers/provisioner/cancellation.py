"""What a provisioner command does when it is cancelled: its caller left, or the worker stops.

A provider call that has begun is never abandoned half-way: the machine may exist already,
and an answer that is not written down is a machine nobody knows of, billing. `to_the_end`
lets such a step finish and record its answer, then lets the cancellation go on.

Commands that change something finish even when their caller left
(`despite_caller_leaving`): the effect was asked for, it is listed with the owner's
instances, and a retry with the same idempotency key gets the stored answer. A worker that
stops cancels them for real, and another replica carries on from the records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from bus.runtime import Context
from bus.tasks import cancel_and_wait

T = TypeVar("T")


async def to_the_end(work: Awaitable[T]) -> T:
    """Await `work` to its end even when cancelled meanwhile; then raise the cancellation."""
    task = asyncio.ensure_future(work)
    interrupted = False
    while not task.done():
        try:
            # `wait` never cancels the task it waits for, unlike awaiting the task itself.
            await asyncio.wait({task})
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError
    return task.result()


async def despite_caller_leaving(ctx: Context, work: Awaitable[T]) -> T:
    """Await `work` to its end when the caller leaves; stop it when the worker stops."""
    task = asyncio.ensure_future(work)
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            if not ctx.caller_left:
                await cancel_and_wait([task])
                raise
            current = asyncio.current_task()
            if current is not None:
                # The caller's cancel is answered by finishing; a timeout further up must
                # not take it for its own.
                current.uncancel()
    return task.result()
