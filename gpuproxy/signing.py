"""How the gateway signs access tokens: from settings to a key ring, checked at start.

HS256 takes JWT_SECRET (at least 32 random bytes). RS256 and EdDSA take
JWT_PRIVATE_KEY_FILE and JWT_PUBLIC_KEY_FILE. Setting both kinds is refused: a server must
never accept both families. For rotation, JWT_PREVIOUS_SECRET (or
JWT_PREVIOUS_PUBLIC_KEY_FILE) stays valid until JWT_PREVIOUS_UNTIL. On the embedded default
(`gpuproxy up` with no JWT_SECRET) a strong secret is generated once and kept in the data
folder, readable by its owner only.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from gateway.auth.tokens import ASYMMETRIC, HMAC, KeyRing, asymmetric_ring, hmac_ring
from schemas.errors import ConfigError

SECRET_FILE = "jwt-secret"  # noqa: S105 - a file name, not a secret


def _read(env: Mapping[str, str], name: str) -> bytes | None:
    path = env.get(name, "").strip()
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", field=name) from None


def _until(env: Mapping[str, str]) -> float:
    raw = env.get("JWT_PREVIOUS_UNTIL", "").strip()
    if not raw:
        raise ConfigError(
            "must say until when the previous key is accepted (unix seconds or ISO 8601)",
            field="JWT_PREVIOUS_UNTIL",
        )
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        raise ConfigError(
            "must be unix seconds or an ISO 8601 time", field="JWT_PREVIOUS_UNTIL"
        ) from None


def _embedded_secret(data_dir: Path, *, create: bool, name: str = SECRET_FILE) -> bytes | None:
    path = data_dir / name
    if path.exists():
        return path.read_bytes().strip()
    if not create:
        return None
    secret = secrets.token_urlsafe(48).encode()
    # Created readable by the owner only, before the secret is written into it.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(secret)
    return secret


UPSTREAM_SECRET_FILE = "upstream.secret"  # noqa: S105 - a file name, not a secret


def upstream_secret(env: Mapping[str, str], data_dir: Path, *, create: bool) -> bytes | None:
    """The secret machines' API keys derive from: `GPUPROXY_UPSTREAM_SECRET`, or a file in the
    data folder that `up` makes once. None: machines are started without a key."""
    given = env.get("GPUPROXY_UPSTREAM_SECRET", "").strip().encode()
    if given:
        if len(given) < 32:
            raise ConfigError("at least 32 random characters", field="GPUPROXY_UPSTREAM_SECRET")
        return given
    return _embedded_secret(data_dir, create=create, name=UPSTREAM_SECRET_FILE)


def key_ring(env: Mapping[str, str], data_dir: Path, *, create: bool) -> KeyRing:
    algorithm = env.get("JWT_ALGORITHM", "").strip() or "HS256"
    if algorithm not in HMAC + ASYMMETRIC:
        raise ConfigError(f"must be one of {', '.join(HMAC + ASYMMETRIC)}", field="JWT_ALGORITHM")
    key_files = [
        n for n in ("JWT_PRIVATE_KEY_FILE", "JWT_PUBLIC_KEY_FILE") if env.get(n, "").strip()
    ]
    if algorithm in HMAC:
        if key_files:
            raise ConfigError(
                "key files go with RS256 or EdDSA; HS256 signs with JWT_SECRET (never both)",
                field=key_files[0],
            )
        secret = env.get("JWT_SECRET", "").strip().encode() or _embedded_secret(
            data_dir, create=create
        )
        if not secret:
            raise ConfigError("is not set (at least 32 random bytes)", field="JWT_SECRET")
        previous = env.get("JWT_PREVIOUS_SECRET", "").strip().encode() or None
        return hmac_ring(secret, previous, _until(env) if previous else None)
    if env.get("JWT_SECRET", "").strip():
        raise ConfigError(
            f"is for HS256; {algorithm} signs with key files (never both)", field="JWT_SECRET"
        )
    private = _read(env, "JWT_PRIVATE_KEY_FILE")
    public = _read(env, "JWT_PUBLIC_KEY_FILE")
    if private is None or public is None:
        missing = "JWT_PRIVATE_KEY_FILE" if private is None else "JWT_PUBLIC_KEY_FILE"
        raise ConfigError(f"is needed for {algorithm}", field=missing)
    previous_public = _read(env, "JWT_PREVIOUS_PUBLIC_KEY_FILE")
    until = _until(env) if previous_public else None
    return asymmetric_ring(algorithm, private, public, previous_public, until)
