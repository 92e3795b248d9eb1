"""Typed records in a JetStream KV bucket, changed only by revision-checked updates.

Several replicas change the same record (an instance moved on by the replica that created it,
by the reconciler, by a destroy). Each change reads the record, computes the new value from
it, and writes with the revision it read; a write that lost the race reads again and
recomputes. No change is ever lost, and no replica writes over a value it has not seen.

A watcher mirrors the bucket in memory for scans (lists, the reconciler's rounds); a
decision that must not act on a stale value reads the bucket itself (`get`, `change`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from bus.tasks import cancel_and_wait

log = logging.getLogger("gpuproxy.bus.records")

T = TypeVar("T", bound=msgspec.Struct)

_DELETED = ("DEL", "PURGE")


async def follow(
    watcher: Any,
    name: str,
    apply: Callable[[str, int, bytes | None], None],
    loaded: asyncio.Future[None],
) -> None:
    """Feed a KV watcher's entries to `apply(key, revision, value or None when deleted)`;
    `loaded` is set once the bucket's current values have all been applied."""
    while True:
        try:
            entry = await watcher.updates(timeout=3600)
        except TimeoutError:
            continue
        except Exception:
            log.exception("watching %s failed; retrying", name)
            await asyncio.sleep(1)
            continue
        if entry is None:
            # The marker after the initial values: the copy has caught up.
            if not loaded.done():
                loaded.set_result(None)
            continue
        deleted = entry.operation in _DELETED or entry.value is None
        apply(entry.key, entry.revision or 0, None if deleted else entry.value)


class Versioned(msgspec.Struct, Generic[T], frozen=True):
    value: T
    revision: int


class Changed(msgspec.Struct, Generic[T], frozen=True):
    before: T
    after: T
    revision: int


class Records(Generic[T]):
    def __init__(self, kv: KeyValue, record_type: type[T], name: str) -> None:
        self._kv = kv
        self._type = record_type
        self._name = name
        self._decoder = msgspec.json.Decoder(record_type)
        self._encoder = msgspec.json.Encoder()
        self.mirror: dict[str, T] = {}
        self._seen: dict[str, int] = {}
        """The newest revision the mirror holds per key: a late watcher update never
        replaces a value this process wrote or read after it."""
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None

    async def start(self) -> None:
        self._watcher = await self._kv.watchall()
        loaded = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._follow(loaded), name=f"watch-{self._name}")
        await loaded

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._watcher.stop()

    async def _follow(self, loaded: asyncio.Future[None]) -> None:
        await follow(self._watcher, self._name, self._apply, loaded)

    def _apply(self, key: str, revision: int, raw: bytes | None) -> None:
        if revision < self._seen.get(key, 0):
            return
        if raw is None:
            self.mirror.pop(key, None)
            self._seen.pop(key, None)
            return
        decoded = self._decode(key, raw)
        if decoded is not None:
            self._remember(key, decoded, revision)

    def _remember(self, key: str, value: T, revision: int) -> None:
        if revision >= self._seen.get(key, 0):
            self.mirror[key] = value
            self._seen[key] = revision

    def _decode(self, key: str, raw: bytes) -> T | None:
        try:
            return self._decoder.decode(raw)
        except msgspec.DecodeError:
            log.warning("%s: %s holds a value this version cannot read", self._name, key)
            return None

    async def get(self, key: str) -> Versioned[T] | None:
        try:
            entry = await self._kv.get(key)
        except NotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        value = self._decode(key, entry.value)
        if value is None:
            return None
        self._remember(key, value, entry.revision)
        return Versioned(value, entry.revision)

    async def create(self, key: str, value: T) -> tuple[Versioned[T], bool]:
        """Write `value` unless the key holds a record; returns the record and whether it
        is the one just written."""
        while True:
            try:
                revision = await self._kv.create(key, self._encoder.encode(value))
            except KeyWrongLastSequenceError:
                existing = await self.get(key)
                if existing is not None:
                    return existing, False
                continue  # deleted between our create and our read: try again
            self._remember(key, value, revision)
            return Versioned(value, revision), True

    async def change(self, key: str, mutate: Callable[[T], T | None]) -> Changed[T] | None:
        """Apply `mutate` to the current record until the write lands on the revision it was
        computed from. `mutate` returns None for "no change wanted" (then so does this, as
        it does when there is no record)."""
        while True:
            current = await self.get(key)
            if current is None:
                return None
            after = mutate(current.value)
            if after is None:
                return None
            try:
                revision = await self._kv.update(
                    key, self._encoder.encode(after), last=current.revision
                )
            except KeyWrongLastSequenceError:
                continue
            self._remember(key, after, revision)
            return Changed(current.value, after, revision)

    async def sweep_tombstones(self, older_than_seconds: float) -> None:
        """Remove the delete markers older than that. In a bucket without TTL every deleted
        key leaves one behind, and keys that are never reused (instance ids) would make
        them pile up forever. Markers are kept a while so every watcher sees the delete."""
        await self._kv.purge_deletes(olderthan=max(int(older_than_seconds), 1))

    async def delete(self, key: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self._kv.delete(key)
        self.mirror.pop(key, None)
        self._seen.pop(key, None)
