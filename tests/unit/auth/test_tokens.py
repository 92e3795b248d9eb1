"""Access tokens: what is accepted, and every forgery the issue names, refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gateway.auth.tokens import (
    AUDIENCE,
    ISSUER,
    KeyRing,
    TokenAuthority,
    asymmetric_ring,
    check_secret,
    hmac_ring,
    kid_for,
)
from schemas.errors import ConfigError, Unauthenticated

SECRET = b"k2Jf9sQ0xV7pL4mN8rT1wY6zA3cE5gH0"
OTHER = b"Zq8Wm3Nx7Lp2Kv9Jr4Ht6Gs1Fd5Ec0Ba"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand, as an attacker would, so no library refuses to make it."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = (
        b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{b64(signature)}"


def claims(**override: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "user-1",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "role": "user",
        "scopes": ["inference"],
    }
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


def refused(authority: TokenAuthority, token: str) -> str:
    with pytest.raises(Unauthenticated) as raised:
        authority.verify(token)
    assert token not in raised.value.message
    return raised.value.message


@pytest.fixture
def ring() -> KeyRing:
    return hmac_ring(SECRET)


@pytest.fixture
def authority(ring: KeyRing) -> TokenAuthority:
    return TokenAuthority(ring)


def rsa_pair() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def test_a_token_we_issued_verifies_with_its_claims(authority: TokenAuthority) -> None:
    token = authority.issue("user-1", role="admin", scopes=["gpus", "billing"])
    verified = authority.verify(token)
    assert (verified.sub, verified.role, verified.scopes) == (
        "user-1",
        "admin",
        ("gpus", "billing"),
    )
    assert jwt.get_unverified_header(token)["kid"] == kid_for(SECRET)


def test_alg_none_is_refused(authority: TokenAuthority) -> None:
    token = forge({"alg": "none", "typ": "JWT", "kid": kid_for(SECRET)}, claims(), None)
    assert "HS256" in refused(authority, token)


def test_hs256_signed_with_the_public_key_is_refused_by_an_rs256_server() -> None:
    private, public = rsa_pair()
    authority = TokenAuthority(asymmetric_ring("RS256", private, public))
    token = forge({"alg": "HS256", "typ": "JWT", "kid": kid_for(public)}, claims(), public)
    assert "RS256" in refused(authority, token)


@pytest.mark.parametrize("missing", ["exp", "iss", "aud", "sub", "iat"])
def test_a_token_without_a_required_claim_is_refused(
    authority: TokenAuthority, missing: str
) -> None:
    token = forge({"alg": "HS256", "kid": kid_for(SECRET)}, claims(**{missing: None}), SECRET)
    assert missing in refused(authority, token)


def test_an_expired_token_is_refused(ring: KeyRing) -> None:
    authority = TokenAuthority(ring, ttl_seconds=60)
    token = authority.issue("user-1", role="user", scopes=(), now=time.time() - 3600)
    assert "expired" in refused(authority, token)


def test_a_token_a_few_seconds_past_expiry_is_within_the_leeway(ring: KeyRing) -> None:
    authority = TokenAuthority(ring, ttl_seconds=60)
    token = authority.issue("user-1", role="user", scopes=(), now=time.time() - 65)
    assert authority.verify(token).sub == "user-1"


def test_a_token_for_another_audience_is_refused(authority: TokenAuthority) -> None:
    token = forge({"alg": "HS256", "kid": kid_for(SECRET)}, claims(aud="other-api"), SECRET)
    assert "not meant for this service" in refused(authority, token)


@pytest.mark.parametrize("issuer", ["gpuprox", "gpuproxy-evil", "gpuproxy.attacker", ""])
def test_an_issuer_that_only_resembles_ours_is_refused(
    authority: TokenAuthority, issuer: str
) -> None:
    token = forge({"alg": "HS256", "kid": kid_for(SECRET)}, claims(iss=issuer), SECRET)
    refused(authority, token)


@pytest.mark.parametrize("kid", ["unknown-key", "", None])
def test_a_token_naming_no_key_we_know_is_refused(
    authority: TokenAuthority, kid: str | None
) -> None:
    header = {"alg": "HS256"} if kid is None else {"alg": "HS256", "kid": kid}
    assert "signing key" in refused(authority, forge(header, claims(), SECRET))


def test_a_tampered_payload_is_refused(authority: TokenAuthority) -> None:
    token = authority.issue("user-1", role="user", scopes=["inference"])
    head, _, signature = token.split(".")
    tampered = b64(json.dumps(claims(role="admin", scopes=["admin"])).encode())
    assert "signature" in refused(authority, f"{head}.{tampered}.{signature}")


def test_a_token_signed_with_another_secret_is_refused(authority: TokenAuthority) -> None:
    token = forge({"alg": "HS256", "kid": kid_for(SECRET)}, claims(), OTHER)
    refused(authority, token)


def test_garbage_is_refused_without_being_repeated(authority: TokenAuthority) -> None:
    assert refused(authority, "not.a.jwt-at-all") == "the token is not a JWT"


def test_the_previous_key_is_accepted_during_the_overlap_and_refused_after() -> None:
    old = TokenAuthority(hmac_ring(OTHER))
    token = old.issue("user-1", role="user", scopes=())
    rotated = TokenAuthority(hmac_ring(SECRET, previous=OTHER, previous_until=time.time() + 60))
    assert rotated.verify(token).sub == "user-1"
    retired = TokenAuthority(hmac_ring(SECRET, previous=OTHER, previous_until=time.time() - 1))
    assert "retired" in refused(retired, token)
    assert jwt.get_unverified_header(rotated.issue("u", role="user", scopes=()))["kid"] == kid_for(
        SECRET
    )


def test_eddsa_key_files_issue_and_verify() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    authority = TokenAuthority(asymmetric_ring("EdDSA", private, public))
    assert authority.verify(authority.issue("user-2", role="user", scopes=())).sub == "user-2"


def test_key_files_that_do_not_match_the_algorithm_are_refused_at_start() -> None:
    private, public = rsa_pair()
    with pytest.raises(ConfigError) as raised:
        asymmetric_ring("EdDSA", private, public)
    assert raised.value.field == "JWT_PRIVATE_KEY_FILE"


@pytest.mark.parametrize(
    "secret",
    [
        b"short",
        b"x" * 31,
        b"a" * 64,
        b"changemechangemechangemechangeme",
        b"your-256-bit-secretyour-256-bit-secret",
        b"secretsecretsecretsecretsecret12",
    ],
)
def test_a_weak_jwt_secret_is_refused_naming_the_setting(secret: bytes) -> None:
    with pytest.raises(ConfigError) as raised:
        check_secret(secret)
    assert raised.value.field == "JWT_SECRET"
    assert secret.decode() not in raised.value.message


def test_a_random_secret_is_accepted() -> None:
    check_secret(SECRET)
