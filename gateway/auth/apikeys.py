"""API keys: `gpuproxy_<public id>_<secret>`, shown once, kept only as a digest.

The public id finds the key without a scan; the secret is 256 random bits, so a plain
SHA-256 digest is enough (nothing to brute-force) and the comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import msgspec

from schemas.errors import Unauthenticated

PREFIX = "gpuproxy"
_SHAPE = re.compile(r"gpuproxy_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


class IssuedKey(msgspec.Struct, frozen=True, kw_only=True):
    public_id: str
    digest: str
    plaintext: str
    """Given to the user once, never stored."""


def digest_of(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue() -> IssuedKey:
    public_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return IssuedKey(
        public_id=public_id,
        digest=digest_of(secret),
        plaintext=f"{PREFIX}_{public_id}_{secret}",
    )


def parse(plaintext: str) -> tuple[str, str]:
    """The public id and secret of a presented key; refuses anything not shaped like one."""
    match = _SHAPE.fullmatch(plaintext.strip())
    if match is None:
        raise Unauthenticated("the API key is malformed")
    return match.group(1), match.group(2)


def matches(secret: str, digest: str) -> bool:
    return hmac.compare_digest(digest_of(secret), digest)


def looks_like_key(value: str) -> bool:
    """Whether a bearer credential is an API key rather than a JWT."""
    return value.startswith(f"{PREFIX}_")
