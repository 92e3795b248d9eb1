"""The ping every worker kind answers: the cheapest proof that the command path works."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from bus.runtime import Context
from schemas.commands import Ping
from schemas.replies import Pong

JOURNAL = "GPUPROXY_TEST_PING_JOURNAL"
"""Tests only: a folder where each worker notes every ping it ran to completion, so a soak
can count effects (runs), not just answers. Unset, nothing is written."""

_JOURNAL = os.environ.get(JOURNAL, "")


async def answer_ping(command: Ping, ctx: Context) -> Pong:
    if command.delay_ms:
        await asyncio.sleep(command.delay_ms / 1000)
    if _JOURNAL:
        line = f"{command.command_id} {ctx.attempt} {os.getpid()} {time.time_ns()}\n"
        _note(Path(_JOURNAL) / f"{ctx.worker_id}.log", line)
    return Pong(
        message=command.message,
        worker_kind=ctx.worker_kind,
        worker_id=ctx.worker_id,
        attempt=ctx.attempt,
    )


def _note(path: Path, line: str) -> None:
    # One short append per run: the line is whole in the file before the answer leaves.
    with path.open("a") as journal:
        journal.write(line)
