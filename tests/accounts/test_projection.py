"""The access projection: SQL written to the KV bucket, and every gateway's copy of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.accounts.keys import ApiKeys
from gateway.accounts.projection import Projection
from gateway.accounts.store import Accounts
from gateway.accounts.tables import User
from gateway.auth.view import AccessView
from schemas.access import Role, Scope, UserAccess, user_key

PASSWORD = "correct horse battery"


@pytest.fixture
async def engine(any_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(any_database)
    yield engine
    await engine.dispose()


@pytest.fixture
async def projection(engine: AsyncEngine, nc: Client) -> Projection:
    made = Projection(engine, nc.jetstream())
    await made.start()
    return made


@pytest.fixture
async def view(nc: Client, projection: Projection) -> AsyncIterator[AccessView]:
    made = AccessView(nc.jetstream())
    await made.start()
    yield made
    await made.stop()


async def soon(check: object, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline
        await asyncio.sleep(0.02)


async def test_a_user_and_key_written_only_to_sql_are_repaired_by_resync(
    engine: AsyncEngine, projection: Projection, view: AccessView
) -> None:
    # As if the gateway died between its SQL commit and its bucket write.
    user = await Accounts(engine).register("ada@example.com", PASSWORD)
    made = await ApiKeys(engine).create(
        user.id,
        name="k",
        scopes=frozenset({Scope.INFERENCE}),
        expires_at_ms=None,
        rate_limit_per_minute=None,
    )
    assert await view.user(user.id) is None

    assert await projection.resync() == 2
    found = await view.user(user.id)
    key = await view.api_key(made.info.id)
    assert found is not None
    assert (found.role, found.disabled, found.rate_limit_per_minute) == (Role.USER, False, 100)
    assert key is not None
    assert (key.user_id, key.scopes, key.revoked) == (user.id, {Scope.INFERENCE}, False)
    assert await projection.resync() == 0, "nothing changed, nothing written"


async def test_resync_never_overwrites_a_newer_projection(
    engine: AsyncEngine, projection: Projection, nc: Client
) -> None:
    user = await Accounts(engine).register("ada@example.com", PASSWORD)
    await projection.user(user.id)
    kv = await nc.jetstream().key_value("gpuproxy-access")
    before = await kv.get(user_key(user.id))
    newer = msgspec.json.encode(
        UserAccess(user_id=user.id, role=Role.USER, disabled=True, rate_limit_per_minute=1)
    )

    async with engine.begin() as db:  # SQL still says what the bucket said before
        await db.execute(update(User).where(User.id == user.id).values(rate_limit_per_minute=5))
    real_current = projection._current

    async def raced(name: str) -> tuple[int, bytes | None]:
        seen = await real_current(name)
        await kv.put(name, newer)  # another gateway projects a change right after our read
        return seen

    projection._current = raced  # type: ignore[method-assign]
    assert await projection.resync() == 0
    assert (await kv.get(user_key(user.id))).value == newer
    assert before.value != newer


async def test_every_copy_sees_a_change_and_a_deletion(
    engine: AsyncEngine, projection: Projection, view: AccessView
) -> None:
    accounts = Accounts(engine)
    user = await accounts.register("ada@example.com", PASSWORD)
    await projection.user(user.id)
    await soon(lambda: user_key(user.id) in view._access.values)  # type: ignore[union-attr]
    await accounts.update_user(user.id, role="admin", disabled=None, rate_limit_per_minute=None)
    await projection.user(user.id)

    async def admin() -> bool:
        found = await view.user(user.id)
        return found is not None and found.role is Role.ADMIN

    for _ in range(100):
        if await admin():
            break
        await asyncio.sleep(0.02)
    assert await admin()

    async with engine.begin() as db:
        await db.execute(User.__table__.delete().where(User.id == user.id))
    await projection.user(user.id)
    await soon(lambda: user_key(user.id) not in view._access.values)  # type: ignore[union-attr]
    assert await view.user(user.id) is None
