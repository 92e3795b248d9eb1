"""JWT settings: one family, strong secrets, an embedded secret made once and kept private."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.auth.tokens import TokenAuthority
from gpuproxy.signing import SECRET_FILE, key_ring
from schemas.errors import ConfigError

STRONG = "k2Jf9sQ0xV7pL4mN8rT1wY6zA3cE5gH0"


def refused(env: dict[str, str], tmp_path: Path, *, create: bool = False) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        key_ring(env, tmp_path, create=create)
    return raised.value


def ed25519_files(folder: Path) -> tuple[Path, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = folder / "jwt.key", folder / "jwt.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def test_the_embedded_default_makes_a_private_secret_once_and_keeps_it(tmp_path: Path) -> None:
    first = key_ring({}, tmp_path, create=True)
    again = key_ring({}, tmp_path, create=True)
    mode = stat.S_IMODE((tmp_path / SECRET_FILE).stat().st_mode)
    assert mode == 0o600
    assert first.signing_kid == again.signing_kid
    authority = TokenAuthority(again)
    assert authority.verify(TokenAuthority(first).issue("u", role="user", scopes=())).sub == "u"


def test_a_gateway_without_a_secret_names_jwt_secret(tmp_path: Path) -> None:
    assert refused({}, tmp_path).field == "JWT_SECRET"


def test_a_weak_secret_is_refused_at_start_without_being_shown(tmp_path: Path) -> None:
    error = refused({"JWT_SECRET": "changeme"}, tmp_path)
    assert error.field == "JWT_SECRET"
    assert "changeme" not in error.message


def test_hs256_with_key_files_is_refused_never_both_families(tmp_path: Path) -> None:
    private, public = ed25519_files(tmp_path)
    env = {
        "JWT_SECRET": STRONG,
        "JWT_PRIVATE_KEY_FILE": str(private),
        "JWT_PUBLIC_KEY_FILE": str(public),
    }
    assert refused(env, tmp_path).field == "JWT_PRIVATE_KEY_FILE"


def test_eddsa_with_a_secret_is_refused_never_both_families(tmp_path: Path) -> None:
    private, public = ed25519_files(tmp_path)
    env = {
        "JWT_ALGORITHM": "EdDSA",
        "JWT_SECRET": STRONG,
        "JWT_PRIVATE_KEY_FILE": str(private),
        "JWT_PUBLIC_KEY_FILE": str(public),
    }
    assert refused(env, tmp_path).field == "JWT_SECRET"


def test_eddsa_from_key_files_signs_and_verifies(tmp_path: Path) -> None:
    private, public = ed25519_files(tmp_path)
    env = {
        "JWT_ALGORITHM": "EdDSA",
        "JWT_PRIVATE_KEY_FILE": str(private),
        "JWT_PUBLIC_KEY_FILE": str(public),
    }
    authority = TokenAuthority(key_ring(env, tmp_path, create=False))
    assert authority.verify(authority.issue("u", role="user", scopes=())).sub == "u"


def test_a_missing_key_file_is_named_and_its_content_never_shown(tmp_path: Path) -> None:
    private, _ = ed25519_files(tmp_path)
    env = {
        "JWT_ALGORITHM": "RS256",
        "JWT_PRIVATE_KEY_FILE": str(private),
        "JWT_PUBLIC_KEY_FILE": str(tmp_path / "absent.pub"),
    }
    error = refused(env, tmp_path)
    assert error.field == "JWT_PUBLIC_KEY_FILE"
    assert "PRIVATE KEY" not in error.message


def test_a_previous_secret_needs_an_end_to_its_overlap(tmp_path: Path) -> None:
    env = {"JWT_SECRET": STRONG, "JWT_PREVIOUS_SECRET": STRONG[::-1]}
    assert refused(env, tmp_path).field == "JWT_PREVIOUS_UNTIL"
    ring = key_ring(
        {**env, "JWT_PREVIOUS_UNTIL": "2999-01-01T00:00:00+00:00"}, tmp_path, create=False
    )
    assert len(ring.verifying) == 2


def test_an_unknown_algorithm_is_refused(tmp_path: Path) -> None:
    assert refused({"JWT_ALGORITHM": "none"}, tmp_path).field == "JWT_ALGORITHM"
