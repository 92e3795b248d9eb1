"""Writes the access projection (`schemas.access`) from SQL into the KV buckets.

Every change to a user, an API key or an address list is committed to SQL first and then
projected here, before the change is answered. A gateway that died between the two leaves
the projection behind SQL; `resync` (run by every gateway at start) puts it right.
"""

from __future__ import annotations

import time

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bus.topology import declare_bucket
from gateway.accounts.tables import ApiKey, IpRuleRow, User
from schemas import topology
from schemas.access import (
    EndedSession,
    IpMode,
    IpRule,
    KeyAccess,
    Role,
    Scope,
    UserAccess,
    api_key_key,
    session_key,
    user_key,
)


def scopes_from_column(text: str) -> frozenset[Scope]:
    return frozenset(Scope(s) for s in text.split())


def scopes_to_column(scopes: frozenset[Scope]) -> str:
    return " ".join(sorted(scopes))


def key_record(row: ApiKey) -> KeyAccess:
    return KeyAccess(
        public_id=row.id,
        user_id=row.user_id,
        digest=row.digest,
        scopes=scopes_from_column(row.scopes),
        expires_at_ms=row.expires_at_ms,
        revoked=row.revoked_at_ms is not None,
        rate_limit_per_minute=row.rate_limit_per_minute,
    )


def user_record(user: User, rules: list[IpRuleRow]) -> UserAccess:
    def listed(which: str) -> tuple[IpRule, ...]:
        return tuple(
            IpRule(id=r.id, cidr=r.cidr, expires_at_ms=r.expires_at_ms)
            for r in sorted(rules, key=lambda r: r.created_at_ms)
            if r.list == which
        )

    return UserAccess(
        user_id=user.id,
        role=Role(user.role),
        disabled=user.disabled,
        rate_limit_per_minute=user.rate_limit_per_minute,
        ip_mode=IpMode(user.ip_mode),
        ip_audit=user.ip_audit,
        allow=listed("allow"),
        deny=listed("deny"),
    )


async def rules_of(db: AsyncSession, user_ids: list[str]) -> dict[str, list[IpRuleRow]]:
    found: dict[str, list[IpRuleRow]] = {}
    rows = await db.execute(select(IpRuleRow).where(IpRuleRow.user_id.in_(user_ids)))
    for row in rows.scalars():
        found.setdefault(row.user_id, []).append(row)
    return found


async def access_of(db: AsyncSession, user_id: str) -> UserAccess | None:
    """What SQL says of a user's access now, or None when there is no such user."""
    user = await db.get(User, user_id)
    if user is None:
        return None
    return user_record(user, (await rules_of(db, [user_id])).get(user_id, []))


class Projection:
    def __init__(self, engine: AsyncEngine, js: JetStreamContext, *, replicas: int = 1) -> None:
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._js = js
        self._replicas = replicas
        self._access: KeyValue | None = None
        self._ended: KeyValue | None = None

    async def start(self) -> None:
        self._access = await declare_bucket(self._js, topology.access_bucket(self._replicas))
        self._ended = await declare_bucket(self._js, topology.ended_sessions_bucket(self._replicas))

    @property
    def access(self) -> KeyValue:
        assert self._access is not None, "Projection.start() was not awaited"
        return self._access

    async def user(self, user_id: str) -> None:
        async with self._sessions() as db:
            record = await access_of(db, user_id)
        if record is None:
            await self.access.delete(user_key(user_id))
            return
        await self._put(user_key(user_id), record)

    async def key(self, public_id: str) -> None:
        async with self._sessions() as db:
            row = await db.get(ApiKey, public_id)
        if row is None:
            await self.access.delete(api_key_key(public_id))
            return
        await self._put(api_key_key(public_id), key_record(row))

    async def session_ended(self, family: str, user_id: str) -> None:
        assert self._ended is not None
        record = EndedSession(family=family, user_id=user_id, ended_at_ms=int(time.time() * 1000))
        await self._ended.put(session_key(family), msgspec.json.encode(record))

    async def resync(self, *, page: int = 500) -> int:
        """Bring every user and key record up to SQL; returns how many records changed.

        Each record's bucket revision is read before its SQL row and written back only if
        it still stands: a change another gateway projects meanwhile is newer and wins.
        """
        changed = 0
        after = ""
        while True:
            async with self._sessions() as db:
                ids = list(
                    (
                        await db.execute(
                            select(User.id).where(User.id > after).order_by(User.id).limit(page)
                        )
                    ).scalars()
                )
                key_ids = list(
                    (await db.execute(select(ApiKey.id).where(ApiKey.user_id.in_(ids)))).scalars()
                )
            if not ids:
                return changed
            seen = {
                **{user_key(i): await self._current(user_key(i)) for i in ids},
                **{api_key_key(k): await self._current(api_key_key(k)) for k in key_ids},
            }
            async with self._sessions() as db:
                users = (await db.execute(select(User).where(User.id.in_(ids)))).scalars()
                rules = await rules_of(db, ids)
                keys = (await db.execute(select(ApiKey).where(ApiKey.id.in_(key_ids)))).scalars()
                fresh: dict[str, UserAccess | KeyAccess] = {
                    user_key(u.id): user_record(u, rules.get(u.id, [])) for u in users
                }
                fresh.update({api_key_key(k.id): key_record(k) for k in keys})
            for name, record in fresh.items():
                revision, value = seen[name]
                encoded = msgspec.json.encode(record)
                if encoded == value:
                    continue
                try:
                    await self.access.update(name, encoded, last=revision)
                except KeyWrongLastSequenceError:
                    continue
                changed += 1
            after = ids[-1]

    async def _current(self, name: str) -> tuple[int, bytes | None]:
        try:
            entry = await self.access.get(name)
        except KeyNotFoundError:
            return 0, None
        return entry.revision or 0, entry.value

    async def _put(self, key: str, record: UserAccess | KeyAccess) -> None:
        await self.access.put(key, msgspec.json.encode(record))
