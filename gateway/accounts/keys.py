"""API keys in SQL: minted within the owner's scopes, listed, revoked; never kept in clear."""

from __future__ import annotations

import time

import msgspec
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from gateway.accounts.projection import scopes_from_column, scopes_to_column
from gateway.accounts.tables import ApiKey, User
from gateway.auth import apikeys
from schemas.access import Scope
from schemas.errors import InvalidArgument, NotFound

MAX_KEYS_PER_USER = 100


class KeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An API key as its owner sees it: everything but the secret."""

    id: str
    user_id: str
    name: str
    scopes: tuple[str, ...]
    rate_limit_per_minute: int | None
    expires_at_ms: int | None
    created_at_ms: int
    last_used_at_ms: int | None
    revoked_at_ms: int | None
    prefix: str
    """How the key starts (`gpuproxy_<public id>_`), to tell keys apart."""


class NewKey(msgspec.Struct, frozen=True, kw_only=True):
    info: KeyInfo
    api_key: str
    """The whole key: shown once, in this answer only."""


def info_of(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        scopes=tuple(sorted(scopes_from_column(row.scopes))),
        rate_limit_per_minute=row.rate_limit_per_minute,
        expires_at_ms=row.expires_at_ms,
        created_at_ms=row.created_at_ms,
        last_used_at_ms=row.last_used_at_ms,
        revoked_at_ms=row.revoked_at_ms,
        prefix=f"{apikeys.PREFIX}_{row.id}_",
    )


class ApiKeys:
    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def create(
        self,
        user_id: str,
        *,
        name: str,
        scopes: frozenset[Scope],
        expires_at_ms: int | None,
        rate_limit_per_minute: int | None,
    ) -> NewKey:
        issued = apikeys.issue()
        now = int(time.time() * 1000)
        row = ApiKey(
            id=issued.public_id,
            user_id=user_id,
            name=name,
            digest=issued.digest,
            scopes=scopes_to_column(scopes),
            rate_limit_per_minute=rate_limit_per_minute,
            expires_at_ms=expires_at_ms,
            created_at_ms=now,
            last_used_at_ms=None,
            revoked_at_ms=None,
        )
        async with self._sessions.begin() as db:
            # Counted under the owner's row lock on PostgreSQL; SQLite serialises writers.
            await db.execute(select(User.id).where(User.id == user_id).with_for_update())
            live = await db.execute(
                select(ApiKey.id).where(ApiKey.user_id == user_id, ApiKey.revoked_at_ms.is_(None))
            )
            if len(live.all()) >= MAX_KEYS_PER_USER:
                raise InvalidArgument(
                    f"an account may hold at most {MAX_KEYS_PER_USER} live keys; revoke one",
                    field="name",
                )
            db.add(row)
        return NewKey(info=info_of(row), api_key=issued.plaintext)

    async def get(self, public_id: str) -> KeyInfo:
        async with self._sessions() as db:
            row = await db.get(ApiKey, public_id)
        if row is None:
            raise NotFound("no such API key", field="id")
        return info_of(row)

    async def of_user(self, user_id: str) -> list[KeyInfo]:
        async with self._sessions() as db:
            rows = await db.execute(
                select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at_ms)
            )
            return [info_of(r) for r in rows.scalars()]

    async def revoke(self, public_id: str) -> KeyInfo:
        """Revoke a key; revoking a revoked key again changes nothing and answers the same."""
        now = int(time.time() * 1000)
        async with self._sessions.begin() as db:
            await db.execute(
                update(ApiKey)
                .where(ApiKey.id == public_id, ApiKey.revoked_at_ms.is_(None))
                .values(revoked_at_ms=now)
            )
            row = await db.get(ApiKey, public_id)
            if row is None:
                raise NotFound("no such API key", field="id")
            return info_of(row)
