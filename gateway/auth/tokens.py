"""Access tokens: JWTs signed by one algorithm family, with key ids for rotation.

One family at a time (HMAC, or an asymmetric algorithm), never both: a verifier that accepts
both lets a token signed with the public key as an HMAC secret through. Every token names
its key (`kid`); the previous key is accepted until its overlap ends and refused after.
Failures say what is wrong with the token and never repeat it.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping, Sequence

import jwt
import msgspec

from schemas.errors import ConfigError, Unauthenticated

ISSUER = "gpuproxy"
AUDIENCE = "gpuproxy-api"
LEEWAY_SECONDS = 30
REQUIRED_CLAIMS = ("exp", "iat", "sub", "iss", "aud")
HMAC = ("HS256",)
ASYMMETRIC = ("RS256", "EdDSA")

MIN_SECRET_BYTES = 32
KNOWN_WEAK = frozenset(
    s.encode()
    for s in (
        "secret",
        "changeme",
        "change-me",
        "password",
        "jwt-secret",
        "jwt_secret",
        "your-secret-key",
        "your-256-bit-secret",
        "supersecret",
        "gpuproxy",
        "default",
        "development",
        "test",
    )
)


class Claims(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified access token says about its bearer."""

    sub: str
    role: str
    scopes: tuple[str, ...]
    jti: str
    exp: int
    sid: str = ""
    """The session (refresh-token chain) the token was issued for."""
    valid_until: float = 0.0
    """When the token stops verifying: its expiry plus leeway, or its key's retirement."""


class VerifyingKey(msgspec.Struct, frozen=True, kw_only=True):
    kid: str
    key: str | bytes
    not_after: float | None = None
    """Unix time after which tokens signed with this key are refused (a retired key)."""


class KeyRing(msgspec.Struct, frozen=True, kw_only=True):
    algorithm: str
    signing_kid: str
    signing_key: str | bytes
    verifying: tuple[VerifyingKey, ...]


def kid_for(material: bytes) -> str:
    """A key id derived from the key (a digest, so it reveals nothing of a secret)."""
    return hashlib.sha256(material).hexdigest()[:16]


def check_secret(secret: bytes, *, field: str = "JWT_SECRET") -> None:
    """Refuse a secret that is short, well known, or made of a few repeated characters."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"must be at least {MIN_SECRET_BYTES} bytes long", field=field)
    rest = secret.lower()
    for weak in sorted(KNOWN_WEAK, key=len, reverse=True):
        rest = rest.replace(weak, b"")
    if len(rest) < MIN_SECRET_BYTES // 2:
        raise ConfigError(
            "is built from well-known example values; generate a random one", field=field
        )
    if len(set(secret)) < 8:
        raise ConfigError("repeats too few characters to be random", field=field)


def hmac_ring(
    secret: bytes, previous: bytes | None = None, previous_until: float | None = None
) -> KeyRing:
    check_secret(secret)
    keys = [VerifyingKey(kid=kid_for(secret), key=secret)]
    if previous is not None:
        check_secret(previous, field="JWT_PREVIOUS_SECRET")
        keys.append(VerifyingKey(kid=kid_for(previous), key=previous, not_after=previous_until))
    return KeyRing(
        algorithm="HS256", signing_kid=kid_for(secret), signing_key=secret, verifying=tuple(keys)
    )


def asymmetric_ring(
    algorithm: str,
    private_pem: bytes,
    public_pem: bytes,
    previous_public_pem: bytes | None = None,
    previous_until: float | None = None,
) -> KeyRing:
    if algorithm not in ASYMMETRIC:
        raise ConfigError(f"must be one of {', '.join(HMAC + ASYMMETRIC)}", field="JWT_ALGORITHM")
    keys = [VerifyingKey(kid=kid_for(public_pem), key=public_pem.decode())]
    if previous_public_pem is not None:
        keys.append(
            VerifyingKey(
                kid=kid_for(previous_public_pem),
                key=previous_public_pem.decode(),
                not_after=previous_until,
            )
        )
    ring = KeyRing(
        algorithm=algorithm,
        signing_kid=kid_for(public_pem),
        signing_key=private_pem.decode(),
        verifying=tuple(keys),
    )
    # Sign and verify once now: a key that does not fit the algorithm fails at start.
    try:
        authority = TokenAuthority(ring)
        authority.verify(authority.issue("check", role="user", scopes=()))
    except (jwt.PyJWTError, ValueError, TypeError, Unauthenticated):
        raise ConfigError(
            f"the key files do not make a working {algorithm} key pair",
            field="JWT_PRIVATE_KEY_FILE",
        ) from None
    return ring


class TokenAuthority:
    def __init__(self, ring: KeyRing, *, ttl_seconds: int = 900) -> None:
        self._ring = ring
        self.ttl_seconds = ttl_seconds
        self._keys: Mapping[str, VerifyingKey] = {k.kid: k for k in ring.verifying}

    def issue(
        self,
        subject: str,
        *,
        role: str,
        scopes: Sequence[str],
        session: str = "",
        now: float | None = None,
    ) -> str:
        issued = int(time.time() if now is None else now)
        claims = {
            "sub": subject,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": issued,
            "nbf": issued,
            "exp": issued + self.ttl_seconds,
            "jti": uuid.uuid4().hex,
            "role": role,
            "scopes": list(scopes),
        }
        if session:
            claims["sid"] = session
        return jwt.encode(
            claims,
            self._ring.signing_key,
            algorithm=self._ring.algorithm,
            headers={"kid": self._ring.signing_kid},
        )

    def verify(self, token: str, *, now: float | None = None) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the token is not a JWT") from None
        if header.get("alg") != self._ring.algorithm:
            raise Unauthenticated(f"the token must be signed with {self._ring.algorithm}")
        key = self._keys.get(str(header.get("kid", "")))
        if key is None:
            raise Unauthenticated("the token names no signing key this server knows")
        moment = time.time() if now is None else now
        if key.not_after is not None and moment > key.not_after:
            raise Unauthenticated("the token's signing key has been retired")
        try:
            payload = jwt.decode(
                token,
                key.key,
                algorithms=[self._ring.algorithm],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=LEEWAY_SECONDS,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the token is not meant for this service") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the token was not issued by this service") from None
        except jwt.PyJWTError:
            raise Unauthenticated("the token's signature or claims are invalid") from None
        try:
            return msgspec.convert(
                {
                    "sub": payload["sub"],
                    "role": payload.get("role", ""),
                    "scopes": payload.get("scopes", []),
                    "jti": payload.get("jti", ""),
                    "exp": payload["exp"],
                    "sid": payload.get("sid", ""),
                    "valid_until": min(
                        float(payload["exp"]) + LEEWAY_SECONDS,
                        key.not_after if key.not_after is not None else float("inf"),
                    ),
                },
                Claims,
            )
        except msgspec.ValidationError:
            raise Unauthenticated("the token's claims have the wrong shape") from None
