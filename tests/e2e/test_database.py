"""SQL: migrations and reachability on the embedded SQLite file and on PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from gpuproxy import migrate
from schemas.errors import Unavailable
from tests.conftest import free_port
from tests.e2e.system import running_system


async def revision(url: str) -> str:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(text("SELECT version_num FROM alembic_version"))
            return str(result.scalar_one())
    finally:
        await engine.dispose()


async def test_migrations_bring_sqlite_to_head_and_running_them_again_changes_nothing(
    sqlite_url: str,
) -> None:
    await asyncio.to_thread(migrate.upgrade, sqlite_url)
    await asyncio.to_thread(migrate.upgrade, sqlite_url)
    assert await revision(sqlite_url) == migrate.head()


@pytest.mark.postgres
async def test_migrations_bring_postgres_to_head_and_running_them_again_changes_nothing(
    postgres_database: str,
) -> None:
    await asyncio.to_thread(migrate.upgrade, postgres_database)
    await asyncio.to_thread(migrate.upgrade, postgres_database)
    assert await revision(postgres_database) == migrate.head()


@pytest.mark.postgres
async def test_health_check_reports_postgres_reachable(
    nats_url: str, postgres_database: str
) -> None:
    await asyncio.to_thread(migrate.upgrade, postgres_database)
    async with (
        running_system(nats_url, postgres_database) as system,
        grpc.aio.insecure_channel(system.grpc_target) as channel,
    ):
        answer = await pb_grpc.GPUProxyServiceStub(channel).HealthCheck(pb.HealthCheckRequest())
    assert answer.details["database"] == "ok"


async def test_an_unreachable_database_shows_in_health_without_its_password(nats_url: str) -> None:
    url = f"postgresql+asyncpg://gpuproxy:pw-not-for-logs@127.0.0.1:{free_port()}/none"
    async with (
        running_system(nats_url, url, operator=False) as system,
        grpc.aio.insecure_channel(system.grpc_target) as channel,
    ):
        answer = await pb_grpc.GPUProxyServiceStub(channel).HealthCheck(pb.HealthCheckRequest())
    assert answer.status == "unavailable"
    assert answer.details["database"].startswith("unavailable")
    assert "pw-not-for-logs" not in str(answer)


def test_a_failed_migration_names_the_setting_and_not_the_password() -> None:
    url = f"postgresql+asyncpg://gpuproxy:pw-not-for-logs@127.0.0.1:{free_port()}/none"
    with pytest.raises(Unavailable) as raised:
        migrate.upgrade(url)
    assert raised.value.field == "DATABASE_URL"
    assert "pw-not-for-logs" not in str(raised.value)
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


async def schema_drift(url: str) -> list[object]:
    """What Alembic would still change to make the database match the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from gateway.accounts.tables import Base

    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
            )
    finally:
        await engine.dispose()


async def test_the_migrated_sqlite_schema_is_exactly_what_the_models_describe(
    sqlite_url: str,
) -> None:
    await asyncio.to_thread(migrate.upgrade, sqlite_url)
    assert await schema_drift(sqlite_url) == []


@pytest.mark.postgres
async def test_the_migrated_postgres_schema_is_exactly_what_the_models_describe(
    postgres_database: str,
) -> None:
    await asyncio.to_thread(migrate.upgrade, postgres_database)
    assert await schema_drift(postgres_database) == []
