"""Stopping background tasks for sure.

On Python 3.11, `asyncio.wait_for` can return a result and drop a cancellation that arrives
as its future completes; libraries built on it (nats-py's requests and watchers among them)
then carry on as if never cancelled. A loop that catches `Exception` around such a call
would run on, and a stop that awaits it would wait forever. `cancel_and_wait` cancels again
until every task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, every: float = 0.5) -> None:
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every)
