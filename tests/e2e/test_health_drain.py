"""A worker process told to stop says so: what it drained, what it handed back, that it stopped."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import uuid
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from schemas import topology
from schemas.commands import Ping
from schemas.replies import Pong
from schemas.subjects import WorkerKind
from tests.bus.harness import running_caller
from tests.e2e.processes import gpuproxy, parts_env

pytestmark = pytest.mark.slow


async def taken(nc: Client, kind: WorkerKind, count: int, timeout: float = 30) -> None:
    """Wait until a replica of `kind` runs `count` commands."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(NotFoundError):
            info = await nc.jetstream().consumer_info(topology.COMMAND_STREAM, str(kind))
            if info.num_ack_pending == count:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind} replica took {count} commands")


def ping(delay_ms: int) -> Ping:
    return Ping(command_id=f"drain-{uuid.uuid4().hex}", message=str(delay_ms), delay_ms=delay_ms)


async def test_a_stopping_worker_logs_what_it_drained_and_what_it_handed_back(
    nats_url: str, nc: Client, tmp_path: Path
) -> None:
    env, _ = parts_env(tmp_path, nats_url, GPUPROXY_DRAIN_TIMEOUT="1")
    log = tmp_path / "worker.log"
    async with running_caller(nc) as caller:
        with gpuproxy(["worker", "billing"], env, log) as worker:
            quick = asyncio.create_task(caller.call(WorkerKind.BILLING, ping(300), timeout=30))
            slow = asyncio.create_task(caller.call(WorkerKind.BILLING, ping(60_000), timeout=30))
            await taken(nc, WorkerKind.BILLING, 2)
            worker.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(worker.wait, 30)
            answer = await quick
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow
    text = log.read_text()
    assert code == 0, text
    assert isinstance(answer, Pong)
    started = re.search(r"worker (billing-\S+) taking billing commands", text)
    assert started is not None, text
    worker_id = re.escape(started.group(1))
    lines = [
        rf"worker {worker_id} stops taking commands; draining 2 running",
        rf"worker {worker_id} drained: 1 finished, 1 handed back",
        rf"worker {worker_id} stopped",
    ]
    positions = [re.search(line, text) for line in lines]
    assert all(positions), text
    assert sorted(p.start() for p in positions if p) == [p.start() for p in positions if p]
