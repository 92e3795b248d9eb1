"""Who is calling, once their credential checked out; handlers read it from `current()`."""

from __future__ import annotations

import contextvars
import enum

import msgspec

from schemas.access import Role, Scope
from schemas.errors import Internal, PermissionDenied


class Via(enum.StrEnum):
    SESSION = "session"
    """A JWT access token from login or refresh."""
    API_KEY = "api_key"


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    role: Role
    scopes: frozenset[Scope]
    """What this credential may touch now: its own scopes within the role the user has now."""
    via: Via
    key_id: str | None = None
    session: str | None = None
    """The session (refresh-token chain) an access token belongs to."""

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN and Scope.ADMIN in self.scopes

    def may_act_for(self, owner_id: str) -> bool:
        """Whether this caller may read or change a resource that `owner_id` owns."""
        return owner_id == self.user_id or self.is_admin

    def check_owner(self, owner_id: str, *, what: str) -> None:
        if not self.may_act_for(owner_id):
            raise PermissionDenied(f"this {what} belongs to another account")


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "gpuproxy_principal", default=None
)


def current() -> Principal:
    """The caller of the request being handled; a handler outside the guard fails closed."""
    principal = _current.get()
    if principal is None:
        raise Internal("the call reached its handler without passing the access guard")
    return principal


def bind(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _current.set(principal)


def unbind(token: contextvars.Token[Principal | None]) -> None:
    _current.reset(token)
