"""API keys: shaped `gpuproxy_<public id>_<secret>`, kept as a digest, compared safely."""

from __future__ import annotations

import pytest

from gateway.auth import apikeys
from schemas.errors import Unauthenticated


def test_an_issued_key_parses_back_to_its_public_id_and_matches_its_digest() -> None:
    key = apikeys.issue()
    public_id, secret = apikeys.parse(key.plaintext)
    assert public_id == key.public_id
    assert apikeys.matches(secret, key.digest)
    assert secret not in key.digest
    assert apikeys.looks_like_key(key.plaintext)


def test_two_keys_never_share_an_id_or_secret() -> None:
    keys = [apikeys.issue() for _ in range(200)]
    assert len({k.public_id for k in keys}) == 200
    assert len({k.plaintext for k in keys}) == 200


def test_a_key_with_a_changed_secret_does_not_match() -> None:
    key = apikeys.issue()
    _, secret = apikeys.parse(key.plaintext)
    flipped = ("A" if secret[0] != "A" else "B") + secret[1:]
    assert not apikeys.matches(flipped, key.digest)


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "gpuproxy_",
        "gpuproxy_0123456789abcdef_short",
        "other_0123456789abcdef_" + "a" * 43,
        "gpuproxy_0123456789ABCDEF_" + "a" * 43,
        "gpuproxy_0123456789abcdef_" + "a" * 43 + "extra",
        "Bearer gpuproxy_0123456789abcdef_" + "a" * 43,
    ],
)
def test_anything_not_shaped_like_a_key_is_refused_without_being_repeated(presented: str) -> None:
    with pytest.raises(Unauthenticated) as raised:
        apikeys.parse(presented)
    assert raised.value.message == "the API key is malformed"
