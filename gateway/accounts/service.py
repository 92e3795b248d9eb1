"""Account actions as both front doors offer them: register, log in, refresh, log out.

Each action that changes something publishes its event; none carries a credential.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from bus.events import EventPublisher
from gateway.accounts.store import Accounts, Session, SessionReused
from gateway.auth.tokens import TokenAuthority
from schemas.events import SessionEnded, SessionStarted, UserRegistered

SCOPES_BY_ROLE = {
    "user": ("inference", "gpus", "billing"),
    "admin": ("inference", "gpus", "billing", "admin"),
}


def _fact() -> dict[str, Any]:
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


class AccountService:
    def __init__(
        self, accounts: Accounts, authority: TokenAuthority, events: EventPublisher
    ) -> None:
        self._accounts = accounts
        self._authority = authority
        self._events = events

    async def register(self, email: str, password: str) -> tuple[str, str]:
        user = await self._accounts.register(email, password)
        await self._events.publish(
            UserRegistered(**_fact(), user_id=user.id, role=user.role, actor=user.id)
        )
        return user.id, user.email

    async def login(self, email: str, password: str) -> Grant:
        user = await self._accounts.authenticate(email, password)
        session = await self._accounts.start_session(user)
        await self._events.publish(SessionStarted(**_fact(), user_id=user.id, actor=user.id))
        return self._grant(session)

    async def refresh(self, refresh_token: str) -> Grant:
        try:
            session = await self._accounts.rotate(refresh_token)
        except SessionReused as exc:
            await self._events.publish(
                SessionEnded(**_fact(), user_id=exc.user_id, reason="reuse", actor=exc.user_id)
            )
            raise
        return self._grant(session)

    async def logout(self, refresh_token: str) -> None:
        user_id = await self._accounts.end_session(refresh_token)
        await self._events.publish(
            SessionEnded(**_fact(), user_id=user_id, reason="logout", actor=user_id)
        )

    def _grant(self, session: Session) -> Grant:
        scopes = SCOPES_BY_ROLE.get(session.role, ())
        return Grant(
            access_token=self._authority.issue(session.user_id, role=session.role, scopes=scopes),
            expires_in=self._authority.ttl_seconds,
            refresh_token=session.refresh_token,
            user_id=session.user_id,
            email=session.email,
        )
