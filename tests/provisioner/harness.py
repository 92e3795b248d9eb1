"""An in-process provisioner (its real service and command runtime) on a real nats-server,
renting from a real `sim` marketplace in a temporary folder."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client

from bus.caller import CommandCaller
from bus.connection import connect
from bus.runtime import CommandRuntime
from schemas import subjects, topology
from schemas.commands import CommandBase
from schemas.events import Event
from schemas.subjects import WorkerKind
from simulator.market import Market
from workers.common.config import WorkerConfig
from workers.provisioner.app import ProvisionerService
from workers.provisioner.config import ProvisionerConfig

T = TypeVar("T")


def fast_config(sim_dir: Path, **overrides: Any) -> ProvisionerConfig:
    settings: dict[str, Any] = {
        "sim_dir": sim_dir,
        "sim_owner_pid": os.getpid(),
        "providers": ("sim",),
        "pending_seconds": 5.0,
        "provisioning_seconds": 10.0,
        "start_seconds": 20.0,
        "stop_seconds": 10.0,
        "reconcile_seconds": 0.3,
        "meter_seconds": 0.2,
        "lease_seconds": 2.0,
    }
    settings.update(overrides)
    return ProvisionerConfig(**settings)


@dataclass
class Provisioner:
    nc: Client
    caller: CommandCaller
    service: ProvisionerService
    market: Market
    runtime: CommandRuntime

    async def call(self, command: CommandBase, timeout: float = 60.0) -> Any:
        return await self.caller.call(WorkerKind.PROVISIONER, command, timeout=timeout)


def new_id() -> str:
    return uuid.uuid4().hex


@asynccontextmanager
async def running_provisioner(
    nats_url: str,
    sim_dir: Path,
    *,
    env: dict[str, str] | None = None,
    drain_seconds: float = 5.0,
    keep_machines: bool = False,
    **overrides: Any,
) -> AsyncIterator[Provisioner]:
    """`keep_machines`: leave the sim machines running on exit, as a provisioner that stops
    leaves a cloud's machines (the next one started on the same folder finds them)."""
    nc = await connect(nats_url, name="test-provisioner")
    worker = WorkerConfig(nats_url=nats_url, worker_id=f"provisioner-{new_id()[:6]}")
    service = ProvisionerService(worker, fast_config(sim_dir, **overrides), env or {})
    handlers = await service.start(nc)
    runtime = CommandRuntime(
        nc, kind=WorkerKind.PROVISIONER, handlers=handlers, worker_id=worker.worker_id
    )
    await runtime.start()
    caller = CommandCaller(nc, gateway_id=f"gw-{new_id()[:6]}")
    await caller.start()
    market = Market(sim_dir)
    try:
        yield Provisioner(nc, caller, service, market, runtime)
    finally:
        await caller.stop()
        await runtime.stop(drain_timeout=drain_seconds)
        await service.stop()
        await nc.close()
        if not keep_machines:
            for machine in market.machines():
                market.destroy(machine.id)


@contextmanager
def slow_marketplace(sim_dir: Path) -> Iterator[None]:
    """Every rent waits until the block ends, as on a marketplace whose API is slow."""
    sim_dir.mkdir(parents=True, exist_ok=True)
    with (sim_dir / "market.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


async def eventually(
    check: Callable[[], Awaitable[T | None]], timeout: float = 20.0, every: float = 0.1
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


async def events_of(nc: Client, subject: str = f"{subjects.EVENTS}.>") -> list[Any]:
    """Every event stored so far on `subject`, decoded."""
    js = nc.jetstream()
    decoder = msgspec.json.Decoder(Event)
    found: list[Any] = []
    sub = await js.subscribe(subject, stream=topology.EVENT_STREAM, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                return found
            found.append(decoder.decode(msg.data))
    finally:
        await sub.unsubscribe()
