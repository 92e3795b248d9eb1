"""A worker replica's heartbeat in the workers bucket: how gateways see who takes commands.

The record is put again every period, so a replica that dies, hangs or loses the bus stops
renewing it and the bucket's TTL (three periods) removes it; a clean stop deletes it at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.js.kv import KeyValue

from bus.tasks import cancel_and_wait
from bus.topology import declare_bucket
from schemas import topology
from schemas.heartbeat import WorkerHeartbeat, heartbeat_key
from schemas.subjects import WorkerKind

log = logging.getLogger("gpuproxy.worker")

DELETE_TIMEOUT = 2.0
"""Seconds a stop waits to delete the record; on a lost bus the TTL removes it anyway."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class Presence:
    def __init__(
        self,
        nc: Client,
        *,
        kind: WorkerKind,
        worker_id: str,
        in_flight: Callable[[], int],
        period: float = topology.HEARTBEAT_SECONDS,
        replicas: int = 1,
    ) -> None:
        self._nc = nc
        self._kind = kind
        self._worker_id = worker_id
        self._in_flight = in_flight
        self._period = period
        self._replicas = replicas
        self._key = heartbeat_key(kind, worker_id)
        self._started_at_ms = _now_ms()
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Put the first heartbeat, then keep putting it every period."""
        spec = topology.workers_bucket(self._replicas, heartbeat_seconds=self._period)
        self._kv = await declare_bucket(self._nc.jetstream(), spec)
        await self._put(self._kv)
        self._task = asyncio.create_task(self._beat(self._kv), name=f"heartbeat {self._key}")

    async def stop(self) -> None:
        """Stop putting the heartbeat and delete it: the replica takes no more commands."""
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        if self._kv is None:
            return
        kv, self._kv = self._kv, None
        try:
            async with asyncio.timeout(DELETE_TIMEOUT):
                await kv.delete(self._key)
        except Exception as exc:
            log.warning("heartbeat %s left to age out (%s)", self._key, type(exc).__name__)

    async def _beat(self, kv: KeyValue) -> None:
        while True:
            await asyncio.sleep(self._period)
            try:
                await self._put(kv)
            except Exception as exc:
                # The connection reconnects by itself and the next beat catches up; until
                # then the record ages toward its TTL, which is what the gateways should see.
                log.debug("heartbeat %s not put (%s)", self._key, type(exc).__name__)

    async def _put(self, kv: KeyValue) -> None:
        record = WorkerHeartbeat(
            kind=str(self._kind),
            worker_id=self._worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            in_flight=self._in_flight(),
            started_at_ms=self._started_at_ms,
            seen_at_ms=_now_ms(),
        )
        await kv.put(self._key, msgspec.json.encode(record))
