"""Account actions as both front doors offer them: register, log in, refresh, log out, API
keys, and an admin's changes to users.

Each change is committed to SQL, projected to the access bucket (so every gateway enforces
it), then published as an event; no event carries a credential. The rules that keep users
from raising their own power live here: a key never gets a scope its maker lacks, and
nobody changes their own role, status or limit.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import msgspec

from bus.events import EventPublisher
from gateway.accounts.keys import ApiKeys, KeyInfo, NewKey
from gateway.accounts.projection import Projection
from gateway.accounts.store import Accounts, Session, SessionReused, UserInfo
from gateway.auth.principal import Principal
from gateway.auth.tokens import TokenAuthority
from schemas.access import SCOPES_BY_ROLE, Role, Scope
from schemas.errors import InvalidArgument, NotFound, PermissionDenied
from schemas.events import (
    ApiKeyCreated,
    ApiKeyRevoked,
    SessionEnded,
    SessionStarted,
    UserRegistered,
    UserUpdated,
)

MAX_RATE_LIMIT = 1_000_000
EVERY_ACCOUNT = "all"
"""What an admin's `user_id` says to list every account's instances or reservations."""
MAX_KEY_LIFETIME_DAYS = 3650
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,100}")


def fact() -> dict[str, Any]:
    """The id and time every event carries."""
    return {"event_id": uuid.uuid4().hex, "occurred_at_ms": int(time.time() * 1000)}


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """What a successful login or refresh gives the client."""

    access_token: str
    expires_in: int
    refresh_token: str
    user_id: str
    email: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth token type, not a secret


class KeyRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a caller may ask of a new key (HTTP body; gRPC fills the same)."""

    name: str
    scopes: list[str] | None = None
    """None: every scope the caller holds now."""
    expires_in_days: int | None = None
    rate_limit_per_minute: int | None = None


class UserChange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: str | None = None
    disabled: bool | None = None
    rate_limit_per_minute: int | None = None


def _scopes(requested: list[str] | None, holder: Principal) -> frozenset[Scope]:
    if requested is None:
        return holder.scopes
    if not requested:
        raise InvalidArgument("a key needs at least one scope", field="scopes")
    chosen: set[Scope] = set()
    for index, name in enumerate(requested):
        try:
            chosen.add(Scope(name))
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise InvalidArgument(
                f"unknown scope {name[:32]!r}; one of {known}", field=f"scopes[{index}]"
            ) from None
    beyond = chosen - holder.scopes
    if beyond:
        raise PermissionDenied(
            f"a key cannot hold scopes its maker lacks: {', '.join(sorted(beyond))}"
        )
    return frozenset(chosen)


class AccountService:
    def __init__(
        self,
        accounts: Accounts,
        keys: ApiKeys,
        projection: Projection,
        authority: TokenAuthority,
        events: EventPublisher,
    ) -> None:
        self._accounts = accounts
        self._keys = keys
        self._projection = projection
        self._authority = authority
        self._events = events

    # --- sessions ---------------------------------------------------------------------------

    async def register(self, email: str, password: str) -> tuple[str, str]:
        user = await self._accounts.register(email, password)
        await self._projection.user(user.id)
        await self._events.publish(
            UserRegistered(**fact(), user_id=user.id, role=user.role, actor=user.id)
        )
        return user.id, user.email

    async def login(self, email: str, password: str) -> Grant:
        user = await self._accounts.authenticate(email, password)
        session = await self._accounts.start_session(user)
        # Cheap insurance: whatever happened to the bucket, it knows this user now.
        await self._projection.user(user.id)
        await self._events.publish(SessionStarted(**fact(), user_id=user.id, actor=user.id))
        return self._grant(session)

    async def refresh(self, refresh_token: str) -> Grant:
        try:
            session = await self._accounts.rotate(refresh_token)
        except SessionReused as exc:
            await self._projection.session_ended(exc.family, exc.user_id)
            await self._events.publish(
                SessionEnded(**fact(), user_id=exc.user_id, reason="reuse", actor=exc.user_id)
            )
            raise
        return self._grant(session)

    async def logout(self, refresh_token: str) -> None:
        user_id, family = await self._accounts.end_session(refresh_token)
        await self._projection.session_ended(family, user_id)
        await self._events.publish(
            SessionEnded(**fact(), user_id=user_id, reason="logout", actor=user_id)
        )

    def _grant(self, session: Session) -> Grant:
        scopes = sorted(SCOPES_BY_ROLE.get(Role(session.role), frozenset()))
        return Grant(
            access_token=self._authority.issue(
                session.user_id, role=session.role, scopes=scopes, session=session.family
            ),
            expires_in=self._authority.ttl_seconds,
            refresh_token=session.refresh_token,
            user_id=session.user_id,
            email=session.email,
        )

    # --- API keys ---------------------------------------------------------------------------

    async def create_key(self, caller: Principal, wanted: KeyRequest) -> NewKey:
        name = wanted.name.strip()
        if not _NAME.fullmatch(name):
            raise InvalidArgument("must be 1 to 100 printable characters", field="name")
        scopes = _scopes(wanted.scopes, caller)
        expires_at_ms: int | None = None
        if wanted.expires_in_days is not None:
            if not 1 <= wanted.expires_in_days <= MAX_KEY_LIFETIME_DAYS:
                raise InvalidArgument(
                    f"must be between 1 and {MAX_KEY_LIFETIME_DAYS}", field="expires_in_days"
                )
            expires_at_ms = int(time.time() * 1000) + wanted.expires_in_days * 86_400_000
        owner = await self._accounts.user(caller.user_id)
        limit = self._key_limit(wanted.rate_limit_per_minute, owner)
        made = await self._keys.create(
            caller.user_id,
            name=name,
            scopes=scopes,
            expires_at_ms=expires_at_ms,
            rate_limit_per_minute=limit,
        )
        await self._projection.key(made.info.id)
        await self._events.publish(
            ApiKeyCreated(
                **fact(),
                actor=caller.user_id,
                user_id=caller.user_id,
                key_id=made.info.id,
                name=name,
                scopes=made.info.scopes,
                expires_at_ms=expires_at_ms,
            )
        )
        return made

    @staticmethod
    def _key_limit(wanted: int | None, owner: UserInfo) -> int | None:
        account = owner.rate_limit_per_minute
        if wanted is None:
            # No limit of its own: the key follows its account's, now and after an admin
            # changes it (none for an account without one, such as the first admin).
            return None
        if wanted < 0 or wanted > MAX_RATE_LIMIT:
            raise InvalidArgument(
                f"must be between 0 and {MAX_RATE_LIMIT}", field="rate_limit_per_minute"
            )
        # A key narrows its owner's limit; it never widens it.
        if account != 0 and (wanted == 0 or wanted > account):
            raise PermissionDenied(
                f"a key's limit cannot exceed the account's {account} requests per minute"
            )
        return wanted

    async def keys_of(self, caller: Principal, owner: str) -> list[KeyInfo]:
        """The keys of `owner`, an account `acting_for` resolved."""
        caller.check_owner(owner, what="account's key list")
        return await self._keys.of_user(owner)

    async def revoke_key(self, caller: Principal, key_id: str) -> KeyInfo:
        found = await self._keys.get(key_id)
        if not caller.may_act_for(found.user_id):
            # The same answer as a key that does not exist: ids of others' keys stay secret.
            raise NotFound("no such API key", field="id")
        revoked = await self._keys.revoke(key_id)
        await self._projection.key(key_id)
        await self._events.publish(
            ApiKeyRevoked(**fact(), actor=caller.user_id, user_id=found.user_id, key_id=key_id)
        )
        return revoked

    # --- whose things a call is about ------------------------------------------------------

    async def acting_for(
        self, caller: Principal, user_id: str, *, every_account: bool = False
    ) -> str:
        """The account a call about "your" things acts on; the one rule of `user_id`.

        Empty or the caller's own id: the caller. Another id: only an admin (403 for anyone
        else, whether or not it exists, so ids cannot be probed), and only an account that
        exists (404). `every_account` lets an admin's list say `all`: "" is returned.
        """
        if not user_id or user_id == caller.user_id:
            return caller.user_id
        if not caller.is_admin:
            raise PermissionDenied("only an admin may act on another account", field="user_id")
        if every_account and user_id == EVERY_ACCOUNT:
            return ""
        await self._accounts.user(user_id)  # NotFound naming user_id
        return user_id

    # --- users (admin) ----------------------------------------------------------------------

    async def user(self, caller: Principal, user_id: str) -> UserInfo:
        if not caller.may_act_for(user_id):
            raise NotFound("no such user", field="user_id")
        return await self._accounts.user(user_id)

    async def users(
        self, caller: Principal, *, limit: int, offset: int
    ) -> tuple[list[UserInfo], int]:
        if not caller.is_admin:
            raise PermissionDenied("listing users needs the admin scope")
        return await self._accounts.users(limit=limit, offset=offset)

    async def update_user(self, caller: Principal, user_id: str, change: UserChange) -> UserInfo:
        if not caller.is_admin:
            raise PermissionDenied("only an admin changes roles, status and limits")
        if user_id == caller.user_id:
            raise PermissionDenied(
                "nobody changes their own role, status or limit; ask another admin"
            )
        role = None
        if change.role is not None:
            try:
                role = Role(change.role)
            except ValueError:
                raise InvalidArgument(
                    f"must be one of {', '.join(r.value for r in Role)}", field="role"
                ) from None
        limit = change.rate_limit_per_minute
        if limit is not None and not 0 <= limit <= MAX_RATE_LIMIT:
            raise InvalidArgument(
                f"must be between 0 (no limit) and {MAX_RATE_LIMIT}",
                field="rate_limit_per_minute",
            )
        updated = await self._accounts.update_user(
            user_id, role=role, disabled=change.disabled, rate_limit_per_minute=limit
        )
        await self._projection.user(user_id)
        changed = tuple(
            name
            for name in ("role", "disabled", "rate_limit_per_minute")
            if getattr(change, name) is not None
        )
        await self._events.publish(
            UserUpdated(
                **fact(),
                actor=caller.user_id,
                user_id=user_id,
                changed=changed,
                role=updated.role,
                disabled=updated.disabled,
                rate_limit_per_minute=updated.rate_limit_per_minute,
            )
        )
        return updated

    # --- the caller's own data --------------------------------------------------------------

    async def export(self, caller: Principal, owner: str) -> dict[str, Any]:
        """Everything stored about `owner`, an account `acting_for` resolved."""
        caller.check_owner(owner, what="account's data")
        return {
            "user": await self._accounts.user(owner),
            "api_keys": await self._keys.of_user(owner),
            "sessions": await self._accounts.sessions_of(owner),
        }
