"""Traces of admitted requests (an API key's last use, the address access log), written to
SQL in batches by a background task so that no request waits for a SQL write."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import insert, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bus.tasks import cancel_and_wait
from gateway.accounts.tables import ApiKey, IpAccessLogRow
from gateway.auth.gatekeeper import AccessEntry

log = logging.getLogger("gpuproxy.gateway.usage")

MAX_PENDING_ENTRIES = 10_000


class UsageRecorder:
    def __init__(self, engine: AsyncEngine, *, interval: float = 1.0) -> None:
        self._engine = engine
        self._interval = interval
        self._last_used: dict[str, int] = {}
        self._entries: list[AccessEntry] = []
        self._dropped = 0
        self._task: asyncio.Task[None] | None = None

    def key_used(self, public_id: str, at_ms: int) -> None:
        self._last_used[public_id] = at_ms

    def access(self, entry: AccessEntry) -> None:
        if len(self._entries) >= MAX_PENDING_ENTRIES:
            # The database is falling behind: keep the requests flowing, count what is lost.
            self._dropped += 1
            return
        self._entries.append(entry)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-recorder")

    async def flush(self) -> None:
        used, self._last_used = self._last_used, {}
        entries, self._entries = self._entries, []
        if self._dropped:
            log.warning("access log: %d entries dropped while the database lagged", self._dropped)
            self._dropped = 0
        if not used and not entries:
            return
        try:
            await self._write(used, entries)
        except Exception:
            # Put them back for the next round; newer last-use times win.
            for public_id, at_ms in used.items():
                self._last_used[public_id] = max(at_ms, self._last_used.get(public_id, 0))
            self._entries[:0] = entries[: MAX_PENDING_ENTRIES - len(self._entries)]
            raise

    async def _write(self, used: dict[str, int], entries: list[AccessEntry]) -> None:
        async with self._engine.begin() as db:
            for public_id, at_ms in used.items():
                await db.execute(
                    update(ApiKey).where(ApiKey.id == public_id).values(last_used_at_ms=at_ms)
                )
            if entries:
                await db.execute(
                    insert(IpAccessLogRow),
                    [
                        {
                            "user_id": e.user_id,
                            "address": e.address,
                            "allowed": e.allowed,
                            "reason": e.reason[:200],
                            "endpoint": e.endpoint[:200],
                            "at_ms": e.at_ms,
                        }
                        for e in entries
                    ],
                )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:
                log.exception("writing usage records failed; they are retried with the next")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        with contextlib.suppress(Exception):
            await self.flush()
