"""Every gateway's in-memory copy of the access projection (`schemas.access`).

A watcher keeps it current from the KV buckets; a request is checked against memory. A key
the copy has not seen yet (made a moment ago through another replica) is read from the
bucket once, so the race between a write and its arrival here never refuses a fresh key.
A key the bucket does not hold either is remembered as absent for a few seconds (`Absent`),
so the same unknown key presented again costs no read; the watcher delivering the key
ends that memory at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from bus.records import follow
from bus.tasks import cancel_and_wait
from bus.topology import declare_bucket
from schemas import topology
from schemas.access import (
    EndedSession,
    KeyAccess,
    UserAccess,
    api_key_key,
    session_key,
    user_key,
)

log = logging.getLogger("gpuproxy.gateway.access")

Record = UserAccess | KeyAccess | EndedSession

ABSENT_SECONDS = 10.0
ABSENT_ENTRIES = 10_000


class Absent:
    """Keys recently read from a bucket and not found there: bounded in time and in number,
    the least recently asked dropped first, so a flood of random keys cannot grow memory."""

    def __init__(self, *, seconds: float = ABSENT_SECONDS, entries: int = ABSENT_ENTRIES) -> None:
        self._seconds = seconds
        self._entries = entries
        self._until: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, key: str) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._until[key]
            return False
        self._until.move_to_end(key)
        return True

    def add(self, key: str) -> None:
        self._until[key] = time.monotonic() + self._seconds
        self._until.move_to_end(key)
        while len(self._until) > self._entries:
            self._until.popitem(last=False)

    def discard(self, key: str) -> None:
        self._until.pop(key, None)


def _decode(key: str, raw: bytes) -> Record:
    """A bucket value as its record type, told by the key's prefix."""
    if key.startswith("user."):
        return msgspec.json.decode(raw, type=UserAccess)
    if key.startswith("key."):
        return msgspec.json.decode(raw, type=KeyAccess)
    return msgspec.json.decode(raw, type=EndedSession)


class _Mirror:
    """One bucket, mirrored: its records by key, decoded once as they arrive from a watcher."""

    def __init__(self, kv: KeyValue, name: str) -> None:
        self._kv = kv
        self._name = name
        self.values: dict[str, Record] = {}
        self.absent = Absent()
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None

    async def start(self) -> None:
        self._watcher = await self._kv.watchall()
        loaded = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._follow(loaded), name=f"watch-{self._name}")
        await loaded

    async def _follow(self, loaded: asyncio.Future[None]) -> None:
        await follow(self._watcher, self._name, self._apply, loaded)

    def _apply(self, key: str, revision: int, raw: bytes | None) -> None:
        if raw is None:
            self.values.pop(key, None)
        else:
            self.absent.discard(key)
            self._keep(key, raw)

    def _keep(self, key: str, raw: bytes) -> Record | None:
        try:
            record = _decode(key, raw)
        except msgspec.DecodeError:
            # Not ours to understand (a newer schema?): treated as absent, never as allowed.
            log.warning("%s: %s holds a value this version cannot read", self._name, key)
            self.values.pop(key, None)
            return None
        self.values[key] = record
        return record

    async def read_through(self, key: str) -> Record | None:
        """The bucket's record for a key this copy lacks, or None when there is none."""
        if key in self.absent:
            return None
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            entry = None
        if entry is None or entry.value is None:
            delivered = self.values.get(key)  # by the watcher, while we read
            if delivered is None:
                self.absent.add(key)
            return delivered
        if key in self.values:  # the watcher delivered it meanwhile
            return self.values[key]
        return self._keep(key, entry.value)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()


class AccessView:
    def __init__(self, js: JetStreamContext, *, replicas: int = 1) -> None:
        self._js = js
        self._replicas = replicas
        self._access: _Mirror | None = None
        self._sessions: _Mirror | None = None

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
        found = await self._lookup(user_key(user_id))
        assert found is None or isinstance(found, UserAccess)
        return found

    async def api_key(self, public_id: str) -> KeyAccess | None:
        found = await self._lookup(api_key_key(public_id))
        assert found is None or isinstance(found, KeyAccess)
        return found

    def session_ended(self, family: str) -> bool:
        # No read-through: an ended session is written before logout answers, and a
        # replica that learns of it a few milliseconds late is within the promise.
        assert self._sessions is not None
        return session_key(family) in self._sessions.values

    async def _lookup(self, key: str) -> Record | None:
        assert self._access is not None, "AccessView.start() was not awaited"
        found = self._access.values.get(key)
        if found is None:
            found = await self._access.read_through(key)
        return found
