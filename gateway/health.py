"""Liveness, readiness and status: three questions with three answers.

Liveness (`/healthz`) is the process answering at all, with no I/O. Readiness (`/readyz`) is
whether this gateway can take calls: NATS connected, the command and event streams present,
the database answering. It says nothing of workers: commands wait in JetStream until a
replica takes them, so a missing worker kind must not take every gateway out of rotation.
Status (`/health`, gRPC `HealthCheck`) adds each worker kind: the replicas whose heartbeats
are in the workers bucket, and the pending and ack-pending counts of the kind's consumer.

Every check reads and nothing writes (no command is sent), and each answer is kept for
`FRESH_SECONDS` with one refresh shared by everyone who asks meanwhile, so a flood of
unauthenticated probes costs one round of reads every couple of seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from sqlalchemy.ext.asyncio import AsyncEngine

from bus.tasks import cancel_and_wait
from gateway.database import reachable
from schemas import subjects, topology
from schemas.heartbeat import WorkerHeartbeat
from schemas.subjects import WorkerKind

log = logging.getLogger("gpuproxy.gateway.health")

OK = "ok"
FRESH_SECONDS = 2.0
"""How long a readiness or status answer is served again before it is read anew."""

HEALTHY = "healthy"
"""Ready, and every worker kind has at least one replica seen."""
DEGRADED = "degraded"
"""Ready, but some worker kind has no replica seen (its commands wait) or could not be read."""
UNAVAILABLE = "unavailable"
"""Not ready: this gateway cannot take calls."""

T = TypeVar("T")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _problem(exc: BaseException) -> str:
    # Only the exception's type: driver and client messages can quote URLs with passwords.
    return f"unavailable: {type(exc).__name__}"


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    ready: bool
    checked_at_ms: int
    details: dict[str, str]


class KindStatus(msgspec.Struct, frozen=True, kw_only=True):
    replicas: tuple[WorkerHeartbeat, ...] = ()
    """Replicas whose heartbeat is in the workers bucket, by worker id."""
    pending: int | None = None
    """Commands of the kind no replica has taken yet; None when they could not be read."""
    ack_pending: int | None = None
    """Commands a replica took and has not finished."""
    problem: str = ""
    """Why the counts or replicas could not be read; empty when they were."""


class WorkersStatus(msgspec.Struct, frozen=True, kw_only=True):
    checked_at_ms: int
    kinds: dict[str, KindStatus]


class HealthReport(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    """`healthy`, `degraded` or `unavailable` (see the constants of this module)."""
    ready: bool
    checked_at_ms: int
    """When the oldest of the answers it is made of was read."""
    details: dict[str, str]
    workers: dict[str, KindStatus]


class Fresh(Generic[T]):
    """The value of `load`, kept for `seconds`; whoever asks during a load awaits that load."""

    def __init__(self, load: Callable[[], Awaitable[T]], seconds: float) -> None:
        self._load = load
        self._seconds = seconds
        self._value: T | None = None
        self._loaded_at = -math.inf
        self._loading: asyncio.Task[T] | None = None

    async def get(self) -> T:
        if self._value is not None and time.monotonic() - self._loaded_at < self._seconds:
            return self._value
        if self._loading is None:
            self._loading = asyncio.create_task(self._refresh())
        # Shielded: a probe that hangs up must not cancel the load the others await.
        return await asyncio.shield(self._loading)

    async def stop(self) -> None:
        if self._loading is not None:
            await cancel_and_wait([self._loading])

    async def _refresh(self) -> T:
        started = time.monotonic()
        try:
            value = await self._load()
        finally:
            self._loading = None
        self._value, self._loaded_at = value, started
        return value


def _kind_details(kind: str, status: KindStatus) -> dict[str, str]:
    name = f"worker.{kind}"
    if status.problem:
        return {name: status.problem}
    count = len(status.replicas)
    summary = f"{OK} ({count} replica{'' if count == 1 else 's'})" if count else "no replica seen"
    return {
        name: summary,
        f"{name}.replicas": " ".join(replica.worker_id for replica in status.replicas),
        f"{name}.pending": str(status.pending),
        f"{name}.ack_pending": str(status.ack_pending),
    }


class Health:
    def __init__(
        self,
        nc: Client,
        engine: AsyncEngine,
        *,
        probe_timeout: float,
        fresh_seconds: float = FRESH_SECONDS,
    ) -> None:
        self._nc = nc
        self._engine = engine
        self._timeout = probe_timeout
        self._heartbeats_kv: KeyValue | None = None
        self._decode = msgspec.json.Decoder(WorkerHeartbeat).decode
        self._readiness = Fresh(self._check_readiness, fresh_seconds)
        self._workers = Fresh(self._check_workers, fresh_seconds)

    async def readiness(self) -> Readiness:
        return await self._readiness.get()

    async def report(self) -> HealthReport:
        readiness, workers = await asyncio.gather(self._readiness.get(), self._workers.get())
        details = dict(readiness.details)
        for kind, kind_status in workers.kinds.items():
            details.update(_kind_details(kind, kind_status))
        if not readiness.ready:
            status = UNAVAILABLE
        elif all(kind.replicas and not kind.problem for kind in workers.kinds.values()):
            status = HEALTHY
        else:
            status = DEGRADED
        return HealthReport(
            status=status,
            ready=readiness.ready,
            checked_at_ms=min(readiness.checked_at_ms, workers.checked_at_ms),
            details=details,
            workers=workers.kinds,
        )

    async def stop(self) -> None:
        await self._readiness.stop()
        await self._workers.stop()

    async def _check_readiness(self) -> Readiness:
        checked_at_ms = _now_ms()
        streams, database = await asyncio.gather(self._streams(), self._database())
        details = {
            "nats": OK if self._nc.is_connected else "disconnected",
            "jetstream": streams,
            "database": database,
        }
        return Readiness(
            ready=all(value == OK for value in details.values()),
            checked_at_ms=checked_at_ms,
            details=details,
        )

    async def _streams(self) -> str:
        js = self._nc.jetstream()

        async def missing(name: str) -> str:
            try:
                await js.stream_info(name)
            except NotFoundError:
                return name
            return ""

        try:
            async with asyncio.timeout(self._timeout):
                names = await asyncio.gather(
                    missing(topology.COMMAND_STREAM), missing(topology.EVENT_STREAM)
                )
        except Exception as exc:
            return _problem(exc)
        absent = [name for name in names if name]
        return f"missing stream {', '.join(absent)}" if absent else OK

    async def _database(self) -> str:
        try:
            async with asyncio.timeout(self._timeout):
                await reachable(self._engine)
        except Exception as exc:
            return _problem(exc)
        return OK

    async def _check_workers(self) -> WorkersStatus:
        checked_at_ms = _now_ms()
        try:
            async with asyncio.timeout(self._timeout):
                replicas, counts = await asyncio.gather(
                    self._replicas(),
                    asyncio.gather(*(self._counts(kind) for kind in WorkerKind)),
                )
        except Exception as exc:
            problem = _problem(exc)
            return WorkersStatus(
                checked_at_ms=checked_at_ms,
                kinds={str(kind): KindStatus(problem=problem) for kind in WorkerKind},
            )
        kinds = {}
        for kind, (pending, ack_pending) in zip(WorkerKind, counts, strict=True):
            seen = sorted(
                (beat for beat in replicas if beat.kind == kind), key=lambda b: b.worker_id
            )
            kinds[str(kind)] = KindStatus(
                replicas=tuple(seen), pending=pending, ack_pending=ack_pending
            )
        return WorkersStatus(checked_at_ms=checked_at_ms, kinds=kinds)

    async def _replicas(self) -> list[WorkerHeartbeat]:
        js = self._nc.jetstream()
        prefix = f"$KV.{topology.WORKERS_BUCKET}."
        try:
            if self._heartbeats_kv is None:
                self._heartbeats_kv = await js.key_value(topology.WORKERS_BUCKET)
            # One request lists the keys; the TTL has already taken the replicas that died.
            info = await js.stream_info(
                f"KV_{topology.WORKERS_BUCKET}", subjects_filter=f"{prefix}>"
            )
        except NotFoundError:
            self._heartbeats_kv = None
            return []  # no worker has started on this bus yet
        kv = self._heartbeats_kv
        keys = [subject[len(prefix) :] for subject in info.state.subjects or {}]
        entries = await asyncio.gather(*(self._heartbeat(kv, key) for key in keys))
        return [entry for entry in entries if entry is not None]

    async def _heartbeat(self, kv: KeyValue, key: str) -> WorkerHeartbeat | None:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None  # stopped cleanly (deleted) since the keys were listed
        try:
            return self._decode(entry.value or b"")
        except msgspec.DecodeError:
            log.warning("heartbeat %s is not a worker heartbeat; left out of the status", key)
            return None

    async def _counts(self, kind: WorkerKind) -> tuple[int, int]:
        js = self._nc.jetstream()
        try:
            info = await js.consumer_info(topology.COMMAND_STREAM, str(kind))
        except NotFoundError:
            # No replica of the kind has ever started, so its consumer does not exist yet;
            # the work queue still holds every command sent to it.
            stream = await js.stream_info(
                topology.COMMAND_STREAM, subjects_filter=subjects.commands_of(kind)
            )
            return sum((stream.state.subjects or {}).values()), 0
        return info.num_pending or 0, info.num_ack_pending or 0
