"""Passwords are stored as Argon2id hashes and checked without telling who exists."""

from __future__ import annotations

import pytest

from gateway.auth.passwords import check_new, hash_password, needs_rehash, verify_password
from schemas.errors import InvalidArgument


async def test_a_password_is_stored_as_an_argon2id_hash_that_verifies() -> None:
    stored = await hash_password("correct horse battery")
    assert stored.startswith("$argon2id$")
    assert "correct horse battery" not in stored
    assert await verify_password(stored, "correct horse battery")
    assert not needs_rehash(stored)


async def test_a_wrong_password_does_not_verify() -> None:
    stored = await hash_password("correct horse battery")
    assert not await verify_password(stored, "correct horse batterz")


async def test_an_unknown_user_never_verifies_even_with_the_dummy_password() -> None:
    assert not await verify_password(None, "an account that does not exist")


async def test_a_corrupt_stored_hash_does_not_verify() -> None:
    assert not await verify_password("not-a-hash", "whatever password")


@pytest.mark.parametrize("password", ["short", "x" * 1025])
def test_a_new_password_outside_the_bounds_is_refused_naming_the_field(password: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_new(password)
    assert raised.value.field == "password"
    assert password not in raised.value.message
