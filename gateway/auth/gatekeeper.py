"""The one authentication path of both front doors.

`admit` takes what a request presented (headers or metadata, the peer address) and what the
entry point requires, and answers with the caller or one precise refusal:
UNAUTHENTICATED (no credential, or one that does not check out) or PERMISSION_DENIED (a
good credential that may not do this, or may not from this address), RESOURCE_EXHAUSTED
over the rate limit. Everything is decided from memory (`AccessView`); nothing here runs SQL.

Guessing costs the guesser: every credential presented that does not check out (a bad or
expired JWT, an ended session; an unknown, malformed, revoked or expired API key, or one
with the wrong secret; a disabled or deleted account) is counted against the client's
address, per minute, across replicas (`GPUPROXY_AUTH_ATTEMPTS_PER_MINUTE`). Past the limit
the address is refused with 429 and `Retry-After` before its credential is looked at,
whatever it presents, until the minute is over. A request that carries no credential at
all is not a guess and is not counted.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence
from typing import Protocol

import msgspec

from gateway.auth import addresses, apikeys
from gateway.auth.addresses import Address, Network
from gateway.auth.policy import Requirement
from gateway.auth.principal import Principal, Via
from gateway.auth.ratelimit import Quota, RateLimited, RateLimiter
from gateway.auth.tokens import Claims, TokenAuthority
from gateway.auth.view import AccessView
from schemas.access import SCOPES_BY_ROLE, IpMode, KeyAccess, Scope, UserAccess
from schemas.errors import PermissionDenied, Unauthenticated

_VERIFIED_CACHE = 20_000


class Presented(msgspec.Struct, frozen=True, kw_only=True):
    """The credential-bearing parts of one request, as either front door received them."""

    authorization: str | None = None
    api_key: str | None = None
    peer_host: str = ""
    forwarded_for: str | None = None
    token_field: str | None = None
    """A JWT carried in the request body (CreateAPIKey's `token`)."""


class AccessEntry(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    address: str
    allowed: bool
    reason: str
    endpoint: str
    at_ms: int


class Usage(Protocol):
    """Where admissions leave their traces, written in batches off the request path."""

    def key_used(self, public_id: str, at_ms: int) -> None: ...

    def access(self, entry: AccessEntry) -> None: ...


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    principal: Principal | None
    """None on a public entry point."""
    quota: Quota | None = None

    def headers(self) -> dict[str, str]:
        return self.quota.headers() if self.quota is not None else {}


PUBLIC_ADMISSION = Admission(principal=None)
NO_CREDENTIAL = (
    "this call needs a credential: `authorization: Bearer <token or API key>` or `x-api-key`"
)


class Gatekeeper:
    def __init__(
        self,
        authority: TokenAuthority,
        view: AccessView,
        limiter: RateLimiter,
        usage: Usage,
        *,
        trusted_proxies: Sequence[Network] = (),
        attempts_per_minute: int = 0,
    ) -> None:
        self._authority = authority
        self._view = view
        self._limiter = limiter
        self._usage = usage
        self._trusted = tuple(trusted_proxies)
        self._attempts = attempts_per_minute
        self._verified: dict[str, Claims] = {}
        self._checked_keys: dict[str, tuple[str, str]] = {}

    def address_of(self, presented: Presented) -> Address:
        return addresses.client_address(presented.peer_host, presented.forwarded_for, self._trusted)

    @staticmethod
    def _counter(kind: str, address: Address) -> str:
        # KV keys allow no ':'; the address stays recognisable in the counter's name.
        return f"{kind}.{str(address).replace(':', '-')}"

    async def admit(
        self, presented: Presented, requirement: Requirement, endpoint: str
    ) -> Admission:
        if requirement.public:
            if requirement.per_address and self._attempts:
                quota = await self._limiter.take(
                    self._counter("address", self.address_of(presented)),
                    self._attempts,
                    what="signing in from this address",
                )
                return Admission(principal=None, quota=quota)
            return PUBLIC_ADMISSION
        now = time.time()
        address = self.address_of(presented)
        failures = self._counter("failed", address) if self._attempts else ""
        if failures and (reset := self._limiter.spent(failures, self._attempts)) is not None:
            raise self._too_many_failures(reset)
        key_text, token = _credential(presented, requirement)
        try:
            if key_text is not None:
                principal, user, key = await self._by_key(key_text, now)
            else:
                assert token is not None
                principal, user, key = await self._by_token(token, now)
        except Unauthenticated:
            if failures:
                await self._count_failure(failures)
            raise
        if user.ip_mode is not IpMode.DISABLED or user.ip_audit:
            self._check_address(principal, user, address, endpoint, now)
        if requirement.sessions_only and principal.via is Via.API_KEY:
            raise PermissionDenied("this call needs a signed-in session; API keys cannot make it")
        if requirement.scope is not None and requirement.scope not in principal.scopes:
            raise PermissionDenied(
                f"this call needs the {requirement.scope!s} scope, which this credential lacks"
            )
        counted = await self._count(user, key)
        if principal.key_id is not None:
            self._usage.key_used(principal.key_id, int(now * 1000))
        return Admission(principal=principal, quota=counted)

    async def _count_failure(self, counter: str) -> None:
        try:
            await self._limiter.take(counter, self._attempts, what="failed credentials")
        except RateLimited as exc:
            raise self._too_many_failures(exc.reset) from None

    def _too_many_failures(self, reset: int) -> RateLimited:
        return RateLimited(
            f"too many credentials that did not check out came from this address "
            f"({self._attempts} a minute); try again in {reset} s",
            limit=self._attempts,
            reset=reset,
        )

    async def _by_token(
        self, token: str, now: float
    ) -> tuple[Principal, UserAccess, KeyAccess | None]:
        claims = self._verified.get(token)
        if claims is None or claims.valid_until < now:
            claims = self._authority.verify(token, now=now)
            if len(self._verified) >= _VERIFIED_CACHE:
                self._verified.clear()
            self._verified[token] = claims
        if claims.sid and self._view.session_ended(claims.sid):
            raise Unauthenticated("the session has ended; log in again")
        user = await self._live_user(claims.sub)
        granted = SCOPES_BY_ROLE[user.role]
        scopes = frozenset(Scope(s) for s in claims.scopes if s in granted)
        return (
            Principal(
                user_id=user.user_id,
                role=user.role,
                scopes=scopes,
                via=Via.SESSION,
                session=claims.sid or None,
            ),
            user,
            None,
        )

    async def _by_key(
        self, plaintext: str, now: float
    ) -> tuple[Principal, UserAccess, KeyAccess | None]:
        known = self._checked_keys.get(plaintext)
        if known is None:
            public_id, secret = apikeys.parse(plaintext)
            digest = apikeys.digest_of(secret)
        else:
            public_id, digest = known
        key = await self._view.api_key(public_id)
        if key is None or not hmac.compare_digest(digest, key.digest):
            raise Unauthenticated("the API key is not valid")
        if known is None:
            # Parsed and hashed once per key: later requests only compare the digests.
            if len(self._checked_keys) >= _VERIFIED_CACHE:
                self._checked_keys.clear()
            self._checked_keys[plaintext] = (public_id, digest)
        if key.revoked:
            raise Unauthenticated("the API key has been revoked")
        if key.expires_at_ms is not None and key.expires_at_ms <= now * 1000:
            raise Unauthenticated("the API key has expired")
        user = await self._live_user(key.user_id)
        return (
            Principal(
                user_id=user.user_id,
                role=user.role,
                scopes=key.scopes & SCOPES_BY_ROLE[user.role],
                via=Via.API_KEY,
                key_id=public_id,
            ),
            user,
            key,
        )

    async def _live_user(self, user_id: str) -> UserAccess:
        user = await self._view.user(user_id)
        if user is None:
            raise Unauthenticated("the account behind this credential does not exist")
        if user.disabled:
            raise Unauthenticated("this account is disabled")
        return user

    def _check_address(
        self, principal: Principal, user: UserAccess, address: Address, endpoint: str, now: float
    ) -> None:
        decision = addresses.decide(user, address, int(now * 1000))
        if user.ip_audit or not decision.allowed:
            self._usage.access(
                AccessEntry(
                    user_id=principal.user_id,
                    address=str(address),
                    allowed=decision.allowed,
                    reason=decision.reason,
                    endpoint=endpoint,
                    at_ms=int(now * 1000),
                )
            )
        if not decision.allowed:
            raise PermissionDenied(
                f"requests from this address are not allowed for this account ({decision.reason})"
            )

    async def _count(self, user: UserAccess, key: KeyAccess | None) -> Quota | None:
        quota: Quota | None = None
        if key is not None and key.rate_limit_per_minute:
            quota = await self._limiter.take(
                f"key.{key.public_id}", key.rate_limit_per_minute, what="this API key"
            )
        if user.rate_limit_per_minute:
            mine = await self._limiter.take(
                f"user.{user.user_id}", user.rate_limit_per_minute, what="this account"
            )
            if quota is None or mine.remaining < quota.remaining:
                quota = mine
        return quota


def _credential(presented: Presented, requirement: Requirement) -> tuple[str | None, str | None]:
    """The API key or the JWT the request carries: exactly one, or a refusal."""
    bearer: str | None = None
    if presented.authorization is not None:
        scheme, _, value = presented.authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthenticated("the authorization header must be `Bearer <credential>`")
        bearer = value.strip()
    api_key = presented.api_key.strip() if presented.api_key is not None else None
    if bearer is not None and api_key is not None:
        raise Unauthenticated("send one credential, not both authorization and x-api-key")
    if api_key is not None:
        return api_key, None
    if bearer is not None:
        return (bearer, None) if apikeys.looks_like_key(bearer) else (None, bearer)
    if requirement.token_field and presented.token_field:
        token = presented.token_field.strip()
        return (token, None) if apikeys.looks_like_key(token) else (None, token)
    raise Unauthenticated(NO_CREDENTIAL)
