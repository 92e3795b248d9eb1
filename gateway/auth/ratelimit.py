"""Requests per minute per user and per API key, shared by every gateway replica.

Each credential gets a counter per clock minute in the `gpuproxy-rate` KV bucket. A gateway
takes requests from it in leases with compare-and-set, then admits from its lease in memory,
so the bucket sees one write per lease, not per request. The sum of all leases never passes
the limit, so the limit holds across replicas exactly; a small limit leases one request at
a time, a large one a hundredth of it.
"""

from __future__ import annotations

import asyncio
import math
import time

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas.errors import ResourceExhausted, Unavailable

WINDOW_SECONDS = 60
_CAS_ATTEMPTS = 50


class RateLimited(ResourceExhausted):
    def __init__(self, message: str, *, field: str = "", limit: int = 0, reset: int = 1) -> None:
        super().__init__(message, field=field)
        self.limit = limit
        self.reset = reset

    def headers(self) -> dict[str, str]:
        return {
            "Retry-After": str(self.reset),
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(self.reset),
        }


class Quota(msgspec.Struct, frozen=True, kw_only=True):
    """Where a credential stands after an admitted request."""

    limit: int
    remaining: int
    reset: int
    """Seconds until the window starts over."""

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }


class _Window:
    __slots__ = ("granted", "index", "lock", "revision", "taken", "used")

    def __init__(self, index: int) -> None:
        self.index = index
        self.granted = 0
        """Requests this gateway leased in this window."""
        self.used = 0
        self.taken = 0
        """The shared counter as this gateway last saw it."""
        self.revision: int | None = None
        self.lock = asyncio.Lock()


class RateLimiter:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._windows: dict[str, _Window] = {}

    async def take(self, name: str, limit: int, *, what: str) -> Quota:
        """Admit one request for `name` (e.g. `user.<id>`) or raise `RateLimited`."""
        now = time.time()
        index = int(now // WINDOW_SECONDS)
        reset = max(1, math.ceil((index + 1) * WINDOW_SECONDS - now))
        window = self._windows.get(name)
        if window is None or window.index != index:
            window = self._fresh(name, index)
        if window.used >= window.granted:
            async with window.lock:
                if window.used >= window.granted:
                    await self._lease(f"{name}.{index}", window, limit)
            if window.used >= window.granted:
                raise RateLimited(
                    f"{what} allows {limit} requests per minute; try again in {reset} s",
                    limit=limit,
                    reset=reset,
                )
        window.used += 1
        remaining = max(0, limit - window.taken) + (window.granted - window.used)
        return Quota(limit=limit, remaining=remaining, reset=reset)

    def spent(self, name: str, limit: int) -> int | None:
        """Seconds until `name`'s window starts over when this gateway already knows that
        window is used up, across every replica; None otherwise. Memory only: no KV read."""
        now = time.time()
        index = int(now // WINDOW_SECONDS)
        window = self._windows.get(name)
        if window is None or window.index != index:
            return None
        if window.used < window.granted or window.taken < limit:
            return None
        return max(1, math.ceil((index + 1) * WINDOW_SECONDS - now))

    def _fresh(self, name: str, index: int) -> _Window:
        if len(self._windows) > 50_000:
            self._windows = {k: w for k, w in self._windows.items() if w.index >= index}
        window = self._windows[name] = _Window(index)
        return window

    async def _lease(self, key: str, window: _Window, limit: int) -> None:
        size = max(1, limit // 100)
        for _ in range(_CAS_ATTEMPTS):
            if window.taken >= limit:
                return
            grant = min(size, limit - window.taken)
            value = msgspec.json.encode(window.taken + grant)
            try:
                if window.revision is None:
                    window.revision = await self._kv.create(key, value)
                else:
                    window.revision = await self._kv.update(key, value, last=window.revision)
            except KeyWrongLastSequenceError:
                # Another replica moved the counter: read where it stands and try again.
                await self._reread(key, window)
                continue
            window.taken += grant
            window.granted += grant
            return
        raise Unavailable("the shared rate-limit counter is too contended; retry")

    async def _reread(self, key: str, window: _Window) -> None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            window.revision, window.taken = None, 0
            return
        window.revision = entry.revision
        window.taken = msgspec.json.decode(entry.value or b"0", type=int)
