"""Who may do what, as the gateways read it: the access projection in a JetStream KV bucket.

SQL holds accounts; the gateway that changes one writes the matching record here, and every
gateway replica watches the bucket into memory. A request is then authorised from memory,
without a SQL query, and a revocation reaches every replica as fast as the bucket does.

Keys: `user.<user id>`, `key.<public id>` (API keys), `session.<family>` (ended sessions,
in their own bucket with an age limit: a session's access tokens expire by then anyway).
"""

from __future__ import annotations

import enum

import msgspec


class Scope(enum.StrEnum):
    """What a credential may touch; a role grants a set of them."""

    INFERENCE = "inference"
    GPUS = "gpus"
    BILLING = "billing"
    ADMIN = "admin"


class Role(enum.StrEnum):
    USER = "user"
    ADMIN = "admin"


SCOPES_BY_ROLE: dict[Role, frozenset[Scope]] = {
    Role.USER: frozenset({Scope.INFERENCE, Scope.GPUS, Scope.BILLING}),
    Role.ADMIN: frozenset(Scope),
}


class IpMode(enum.StrEnum):
    """How a user's address lists apply (the modes of the original daemon)."""

    DISABLED = "disabled"
    ALLOWLIST = "allowlist"
    """Only addresses on the allowlist get in."""
    DENYLIST = "denylist"
    """Everyone but the denylist gets in."""
    STRICT = "strict"
    """The allowlist, minus the denylist (the denylist wins)."""


class IpRule(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    cidr: str
    expires_at_ms: int | None = None


class UserAccess(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    role: Role
    disabled: bool
    rate_limit_per_minute: int
    """0: no limit (only an admin can set that)."""
    ip_mode: IpMode = IpMode.DISABLED
    ip_audit: bool = False
    """Whether every decision on this user's address lists goes to the access log."""
    allow: tuple[IpRule, ...] = ()
    deny: tuple[IpRule, ...] = ()


class KeyAccess(msgspec.Struct, frozen=True, kw_only=True):
    public_id: str
    user_id: str
    digest: str
    """SHA-256 of the key's secret; the secret itself is never stored."""
    scopes: frozenset[Scope]
    expires_at_ms: int | None
    revoked: bool
    rate_limit_per_minute: int | None = None
    """None: only the owner's limit applies."""


class EndedSession(msgspec.Struct, frozen=True, kw_only=True):
    family: str
    user_id: str
    ended_at_ms: int


def user_key(user_id: str) -> str:
    return f"user.{user_id}"


def api_key_key(public_id: str) -> str:
    return f"key.{public_id}"


def session_key(family: str) -> str:
    return f"session.{family}"
