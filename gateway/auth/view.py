"""Every gateway's in-memory copy of the access projection (`schemas.access`).

A watcher keeps it current from the KV buckets; a request is checked against memory. A key
the copy has not seen yet (made a moment ago through another replica) is read from the
bucket once, so the race between a write and its arrival here never refuses a fresh key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from bus.topology import declare_bucket
from schemas import topology
from schemas.access import (
    KeyAccess,
    SessionEnded,
    UserAccess,
    api_key_key,
    session_key,
    user_key,
)

log = logging.getLogger("gpuproxy.gateway.access")

T = TypeVar("T")
_DELETED = ("DEL", "PURGE")


class _Mirror:
    """One bucket, mirrored: a dict of raw values by key, fed by a watcher task."""

    def __init__(self, kv: KeyValue, name: str) -> None:
        self._kv = kv
        self._name = name
        self.values: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None

    async def start(self) -> None:
        self._watcher = await self._kv.watchall()
        loaded = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._follow(loaded), name=f"watch-{self._name}")
        await loaded

    async def _follow(self, loaded: asyncio.Future[None]) -> None:
        while True:
            try:
                entry = await self._watcher.updates(timeout=3600)
            except TimeoutError:
                continue
            except Exception:
                log.exception("watching %s failed; retrying", self._name)
                await asyncio.sleep(1)
                continue
            if entry is None:
                # The marker after the initial values: the copy has caught up.
                if not loaded.done():
                    loaded.set_result(None)
                continue
            if entry.operation in _DELETED or entry.value is None:
                self.values.pop(entry.key, None)
            else:
                self.values[entry.key] = entry.value

    async def read_through(self, key: str) -> bytes | None:
        """The bucket's value for a key this copy lacks, or None when there is none."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        self.values.setdefault(key, entry.value)
        return self.values[key]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()


class AccessView:
    def __init__(self, js: JetStreamContext, *, replicas: int = 1) -> None:
        self._js = js
        self._replicas = replicas
        self._access: _Mirror | None = None
        self._sessions: _Mirror | None = None
        self._decoded: dict[bytes, Any] = {}

    async def start(self) -> None:
        access = await declare_bucket(self._js, topology.access_bucket(self._replicas))
        sessions = await declare_bucket(self._js, topology.ended_sessions_bucket(self._replicas))
        self._access = _Mirror(access, topology.ACCESS_BUCKET)
        self._sessions = _Mirror(sessions, topology.ENDED_SESSIONS_BUCKET)
        await self._access.start()
        await self._sessions.start()

    async def stop(self) -> None:
        for mirror in (self._access, self._sessions):
            if mirror is not None:
                await mirror.stop()

    async def user(self, user_id: str) -> UserAccess | None:
        assert self._access is not None
        return await self._lookup(self._access, user_key(user_id), UserAccess)

    async def api_key(self, public_id: str) -> KeyAccess | None:
        assert self._access is not None
        return await self._lookup(self._access, api_key_key(public_id), KeyAccess)

    def session_ended(self, family: str) -> bool:
        # No read-through: an ended session is written before logout answers, and a
        # replica that learns of it a few milliseconds late is within the promise.
        assert self._sessions is not None
        return session_key(family) in self._sessions.values

    async def _lookup(self, mirror: _Mirror, key: str, type_: type[T]) -> T | None:
        raw = mirror.values.get(key)
        if raw is None:
            raw = await mirror.read_through(key)
            if raw is None:
                return None
        # Decoded once per stored value: the same bytes come back on every request.
        found = self._decoded.get(raw)
        if found is None:
            if len(self._decoded) > 100_000:
                self._decoded.clear()
            found = self._decoded[raw] = msgspec.json.decode(raw, type=type_)
        assert isinstance(found, type_)
        return found


def encode_record(record: UserAccess | KeyAccess | SessionEnded) -> bytes:
    return msgspec.json.encode(record)
