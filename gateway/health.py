"""What the gateway can reach: NATS, JetStream, the database, and each worker kind."""

from __future__ import annotations

import asyncio
import time

import msgspec
from nats.aio.client import Client
from sqlalchemy.ext.asyncio import AsyncEngine

from bus.caller import CommandCaller
from gateway.database import reachable
from schemas.commands import Ping
from schemas.replies import Pong
from schemas.subjects import WorkerKind

OK = "ok"


class HealthReport(msgspec.Struct, frozen=True, kw_only=True):
    healthy: bool
    checked_at_ms: int
    details: dict[str, str]


class Health:
    def __init__(
        self, nc: Client, caller: CommandCaller, engine: AsyncEngine, *, probe_timeout: float
    ) -> None:
        self._nc = nc
        self._caller = caller
        self._engine = engine
        self._timeout = probe_timeout

    async def report(self) -> HealthReport:
        checks = {
            "jetstream": self._jetstream(),
            "database": self._database(),
            **{f"worker.{kind}": self._worker(kind) for kind in WorkerKind},
        }
        results = await asyncio.gather(*checks.values())
        details = {"nats": OK if self._nc.is_connected else "disconnected"}
        details.update(zip(checks, results, strict=True))
        return HealthReport(
            healthy=all(value == OK or value.startswith(f"{OK} ") for value in details.values()),
            checked_at_ms=int(time.time() * 1000),
            details=details,
        )

    async def _jetstream(self) -> str:
        try:
            await self._nc.jetstream().account_info()
        except Exception as exc:
            return f"unavailable: {type(exc).__name__}"
        return OK

    async def _database(self) -> str:
        # Only the exception's type: driver messages can quote the connection URL.
        try:
            await asyncio.wait_for(reachable(self._engine), self._timeout)
        except Exception as exc:
            return f"unavailable: {type(exc).__name__}"
        return OK

    async def _worker(self, kind: WorkerKind) -> str:
        probe = Ping(command_id=f"probe-{time.time_ns()}", message="readiness")
        try:
            reply = await self._caller.call(kind, probe, timeout=self._timeout)
        except Exception as exc:
            return f"no answer: {type(exc).__name__}"
        assert isinstance(reply, Pong)
        return f"{OK} ({reply.worker_id})"
