"""The ping every worker kind answers: the cheapest proof that the command path works."""

from __future__ import annotations

import asyncio

from bus.runtime import Context
from schemas.commands import Ping
from schemas.replies import Pong


async def answer_ping(command: Ping, ctx: Context) -> Pong:
    if command.delay_ms:
        await asyncio.sleep(command.delay_ms / 1000)
    return Pong(
        message=command.message,
        worker_kind=ctx.worker_kind,
        worker_id=ctx.worker_id,
        attempt=ctx.attempt,
    )
