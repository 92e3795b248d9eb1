"""Accounts in SQL: registering, checking passwords, and sessions as refresh-token chains.

A refresh token is `<id>.<secret>`; only a digest of the secret is stored. Each use rotates
it: the used token is marked, a new one joins the same chain. A used token presented again
means it was copied: the whole chain is revoked and the caller must log in again.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from typing import Any, cast

import msgspec
from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.accounts.tables import RefreshToken, User
from gateway.auth import passwords
from schemas.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated

DEFAULT_RATE_LIMIT = 100
"""Requests per minute for a new user, as in the original daemon."""
REFRESH_TTL_MS = 30 * 24 * 3600 * 1000
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s.]{2,}")
_WRONG = "the email or password is wrong"


class SessionReused(Unauthenticated):
    """A rotated refresh token came back: the chain is revoked; `user_id` says whose."""

    def __init__(
        self,
        message: str = "the refresh token was already used; log in again",
        *,
        field: str = "",
        user_id: str = "",
        family: str = "",
    ) -> None:
        super().__init__(message, field=field)
        self.user_id = user_id
        self.family = family


class Session(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    email: str
    role: str
    family: str
    """The chain's id: access tokens name it (`sid`), so ending the chain ends them too."""
    refresh_token: str
    """Given to the client, never stored."""


class UserInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A user as the API shows one: everything but the password hash."""

    id: str
    email: str
    role: str
    disabled: bool
    rate_limit_per_minute: int
    created_at_ms: int


def user_info(user: User) -> UserInfo:
    return UserInfo(
        id=user.id,
        email=user.email,
        role=user.role,
        disabled=user.disabled,
        rate_limit_per_minute=user.rate_limit_per_minute,
        created_at_ms=user.created_at_ms,
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def normal_email(email: str, *, field: str = "email") -> str:
    email = email.strip().lower()
    if len(email) > 320 or not _EMAIL.fullmatch(email):
        raise InvalidArgument("is not an email address", field=field)
    return email


class Accounts:
    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def register(
        self,
        email: str,
        password: str,
        *,
        role: str = "user",
        rate_limit_per_minute: int = DEFAULT_RATE_LIMIT,
    ) -> User:
        email = normal_email(email)
        passwords.check_new(password)
        user = User(
            id=uuid.uuid4().hex,
            email=email,
            password_hash=await passwords.hash_password(password),
            role=role,
            disabled=False,
            rate_limit_per_minute=rate_limit_per_minute,
            created_at_ms=_now_ms(),
            ip_mode="disabled",
            ip_audit=False,
        )
        async with self._sessions.begin() as db:
            db.add(user)
            try:
                await db.flush()
            except IntegrityError:
                raise AlreadyExists("an account with this email exists", field="email") from None
        return user

    async def authenticate(self, email: str, password: str) -> User:
        """The user with these credentials; one vague error for every way it can fail."""
        async with self._sessions() as db:
            user = (
                await db.execute(select(User).where(User.email == email.strip().lower()))
            ).scalar_one_or_none()
        if not await passwords.verify_password(user.password_hash if user else None, password):
            raise Unauthenticated(_WRONG)
        assert user is not None
        if user.disabled:
            raise Unauthenticated("this account is disabled")
        if passwords.needs_rehash(user.password_hash):
            await self._store_hash(user.id, await passwords.hash_password(password))
        return user

    async def _store_hash(self, user_id: str, password_hash: str) -> None:
        async with self._sessions.begin() as db:
            await db.execute(
                update(User).where(User.id == user_id).values(password_hash=password_hash)
            )

    async def start_session(self, user: User) -> Session:
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        async with self._sessions.begin() as db:
            db.add(self._link(token_id, token_id, user.id, secret))
        return Session(
            user_id=user.id,
            email=user.email,
            role=user.role,
            family=token_id,
            refresh_token=f"{token_id}.{secret}",
        )

    async def rotate(self, refresh_token: str) -> Session:
        """Trade a refresh token for the next one of its chain."""
        token_id, secret = self._split(refresh_token)
        now = _now_ms()
        async with self._sessions.begin() as db:
            link = await db.get(RefreshToken, token_id)
            if link is None or not hmac.compare_digest(link.digest, _digest(secret)):
                raise Unauthenticated("the refresh token is not valid")
            if link.revoked_at_ms is not None or link.expires_at_ms < now:
                raise Unauthenticated("the session has ended; log in again")
            reused = link.used_at_ms is not None
            if reused:
                # Committed before the refusal: raising inside the transaction would undo it.
                await self._revoke_family(db, link.family, now)
        if reused:
            raise SessionReused(user_id=link.user_id, family=link.family)
        async with self._sessions.begin() as db:
            # Claim the token with one conditional write: of concurrent refreshes with the
            # same token exactly one changes the row, on SQLite (no row locks) as on PostgreSQL.
            claimed = await db.execute(
                update(RefreshToken)
                .where(
                    RefreshToken.id == token_id,
                    RefreshToken.used_at_ms.is_(None),
                    RefreshToken.revoked_at_ms.is_(None),
                )
                .values(used_at_ms=now)
            )
            if cast(CursorResult[Any], claimed).rowcount != 1:
                raise Unauthenticated("the refresh token was already used; log in again")
            user = await db.get(User, link.user_id)
            if user is None or user.disabled:
                raise Unauthenticated("this account is disabled")
            next_id, next_secret = secrets.token_hex(8), secrets.token_urlsafe(32)
            db.add(self._link(next_id, link.family, user.id, next_secret))
        return Session(
            user_id=user.id,
            email=user.email,
            role=user.role,
            family=link.family,
            refresh_token=f"{next_id}.{next_secret}",
        )

    async def end_session(self, refresh_token: str) -> tuple[str, str]:
        """Revoke the chain the token belongs to; returns its user and the chain's id."""
        token_id, secret = self._split(refresh_token)
        async with self._sessions.begin() as db:
            link = await db.get(RefreshToken, token_id)
            if link is None or not hmac.compare_digest(link.digest, _digest(secret)):
                raise Unauthenticated("the refresh token is not valid")
            await self._revoke_family(db, link.family, _now_ms())
            return link.user_id, link.family

    async def user(self, user_id: str) -> UserInfo:
        async with self._sessions() as db:
            user = await db.get(User, user_id)
        if user is None:
            raise NotFound("no such user", field="user_id")
        return user_info(user)

    async def users(self, *, limit: int, offset: int) -> tuple[list[UserInfo], int]:
        async with self._sessions() as db:
            total = (await db.execute(select(func.count()).select_from(User))).scalar_one()
            rows = await db.execute(
                select(User).order_by(User.created_at_ms, User.id).limit(limit).offset(offset)
            )
            return [user_info(u) for u in rows.scalars()], int(total)

    async def update_user(
        self,
        user_id: str,
        *,
        role: str | None,
        disabled: bool | None,
        rate_limit_per_minute: int | None,
    ) -> UserInfo:
        changes: dict[str, Any] = {}
        if role is not None:
            changes["role"] = role
        if disabled is not None:
            changes["disabled"] = disabled
        if rate_limit_per_minute is not None:
            changes["rate_limit_per_minute"] = rate_limit_per_minute
        async with self._sessions.begin() as db:
            if changes:
                await db.execute(update(User).where(User.id == user_id).values(**changes))
            user = await db.get(User, user_id)
            if user is None:
                raise NotFound("no such user", field="user_id")
            if disabled:
                # A disabled account's sessions end for good, not only while it stays disabled.
                await db.execute(
                    update(RefreshToken)
                    .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at_ms.is_(None))
                    .values(revoked_at_ms=_now_ms())
                )
            return user_info(user)

    async def sessions_of(self, user_id: str) -> list[dict[str, Any]]:
        """The user's sessions (chains), for their export: ids and times, no digests."""
        async with self._sessions() as db:
            rows = await db.execute(
                select(RefreshToken)
                .where(RefreshToken.user_id == user_id, RefreshToken.id == RefreshToken.family)
                .order_by(RefreshToken.created_at_ms)
            )
            return [
                {
                    "id": r.family,
                    "started_at_ms": r.created_at_ms,
                    "ended_at_ms": r.revoked_at_ms,
                }
                for r in rows.scalars()
            ]

    async def has_admin(self) -> bool:
        async with self._sessions() as db:
            found = await db.execute(select(User.id).where(User.role == "admin").limit(1))
            return found.first() is not None

    @staticmethod
    async def _revoke_family(db: AsyncSession, family: str, now: int) -> None:
        await db.execute(
            update(RefreshToken)
            .where(RefreshToken.family == family, RefreshToken.revoked_at_ms.is_(None))
            .values(revoked_at_ms=now)
        )

    @staticmethod
    def _link(token_id: str, family: str, user_id: str, secret: str) -> RefreshToken:
        now = _now_ms()
        return RefreshToken(
            id=token_id,
            user_id=user_id,
            family=family,
            digest=_digest(secret),
            expires_at_ms=now + REFRESH_TTL_MS,
            created_at_ms=now,
            used_at_ms=None,
            revoked_at_ms=None,
        )

    @staticmethod
    def _split(refresh_token: str) -> tuple[str, str]:
        token_id, _, secret = refresh_token.strip().partition(".")
        if not re.fullmatch(r"[0-9a-f]{16}", token_id) or not secret:
            raise Unauthenticated("the refresh token is malformed")
        return token_id, secret
