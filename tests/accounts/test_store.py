"""Accounts in SQL, on SQLite and PostgreSQL: registration, login, sessions that rotate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.accounts.store import Accounts
from schemas.errors import AlreadyExists, InvalidArgument, Unauthenticated

PASSWORD = "correct horse battery"


@pytest.fixture
async def accounts(any_database: str) -> AsyncIterator[Accounts]:
    engine = create_async_engine(any_database)
    yield Accounts(engine)
    await engine.dispose()


async def test_a_registered_user_logs_in_with_the_email_in_any_case(accounts: Accounts) -> None:
    user = await accounts.register("Ada@Example.com", PASSWORD)
    found = await accounts.authenticate("  ada@EXAMPLE.com ", PASSWORD)
    assert (found.id, found.email, found.role) == (user.id, "ada@example.com", "user")


async def test_the_same_email_cannot_register_twice(accounts: Accounts) -> None:
    await accounts.register("ada@example.com", PASSWORD)
    with pytest.raises(AlreadyExists) as raised:
        await accounts.register("ADA@example.com", "another long password")
    assert raised.value.field == "email"


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [
        ("not-an-email", PASSWORD, "email"),
        ("a@b", PASSWORD, "email"),
        ("ada@example.com", "short", "password"),
    ],
)
async def test_bad_registration_input_names_the_field_and_creates_nothing(
    accounts: Accounts, email: str, password: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await accounts.register(email, password)
    assert raised.value.field == field
    with pytest.raises(Unauthenticated):
        await accounts.authenticate(email, password)


async def test_a_wrong_password_and_an_unknown_email_get_the_same_answer(
    accounts: Accounts,
) -> None:
    await accounts.register("ada@example.com", PASSWORD)
    with pytest.raises(Unauthenticated) as wrong:
        await accounts.authenticate("ada@example.com", "not the password")
    with pytest.raises(Unauthenticated) as unknown:
        await accounts.authenticate("bob@example.com", PASSWORD)
    assert wrong.value.message == unknown.value.message


async def test_a_refresh_token_rotates_and_the_old_one_stops_working(accounts: Accounts) -> None:
    user = await accounts.register("ada@example.com", PASSWORD)
    first = await accounts.start_session(user)
    second = await accounts.rotate(first.refresh_token)
    third = await accounts.rotate(second.refresh_token)
    assert len({first.refresh_token, second.refresh_token, third.refresh_token}) == 3
    assert third.user_id == user.id


async def test_reusing_a_rotated_refresh_token_ends_the_whole_session(accounts: Accounts) -> None:
    user = await accounts.register("ada@example.com", PASSWORD)
    stolen = await accounts.start_session(user)
    current = await accounts.rotate(stolen.refresh_token)
    with pytest.raises(Unauthenticated, match="already used"):
        await accounts.rotate(stolen.refresh_token)
    with pytest.raises(Unauthenticated, match="ended"):
        await accounts.rotate(current.refresh_token)


async def test_logout_revokes_the_session(accounts: Accounts) -> None:
    user = await accounts.register("ada@example.com", PASSWORD)
    session = await accounts.start_session(user)
    assert await accounts.end_session(session.refresh_token) == (user.id, session.family)
    with pytest.raises(Unauthenticated, match="ended"):
        await accounts.rotate(session.refresh_token)


async def test_two_concurrent_refreshes_with_one_token_yield_at_most_one_new_session(
    accounts: Accounts,
) -> None:
    user = await accounts.register("ada@example.com", PASSWORD)
    session = await accounts.start_session(user)
    outcomes = await asyncio.gather(
        *(accounts.rotate(session.refresh_token) for _ in range(5)), return_exceptions=True
    )
    assert sum(1 for o in outcomes if not isinstance(o, BaseException)) <= 1


@pytest.mark.parametrize("token", ["", "nodot", "0123456789abcdef.", "XYZ.secret"])
async def test_a_malformed_refresh_token_is_refused(accounts: Accounts, token: str) -> None:
    with pytest.raises(Unauthenticated):
        await accounts.rotate(token)


async def test_passwords_and_refresh_secrets_are_never_stored_in_plain_text(
    accounts: Accounts, any_database: str
) -> None:
    user = await accounts.register("ada@example.com", PASSWORD)
    session = await accounts.start_session(user)
    secret = session.refresh_token.split(".", 1)[1]
    engine = create_async_engine(any_database)
    async with engine.connect() as connection:
        rows = [
            str(tuple(row))
            for table in ("users", "refresh_tokens")
            for row in await connection.execute(text(f"SELECT * FROM {table}"))
        ]
    await engine.dispose()
    dump = "\n".join(rows)
    assert PASSWORD not in dump
    assert secret not in dump
