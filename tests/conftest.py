"""Fixtures shared by the whole suite: real nats-server, real databases, free ports.

`session_nats_url` is one nats-server for the whole session, for tests that need a live
server but none of gpuproxy's streams. Every test that touches streams gets its own
nats-server instead (`nats_url`: port 0, temporary store, readiness read from its log): it
starts in tens of milliseconds and no two tests can see each other's streams. `--nats-url`
runs the same tests against outside infrastructure, purging gpuproxy's streams and buckets
before each test. PostgreSQL tests run against `--postgres-url` (default: the local server)
and skip with the reason when it does not answer, unless GPUPROXY_REQUIRE_POSTGRES=1 (as CI
sets) turns that skip into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from bus.connection import connect
from gpuproxy.natsd import NatsServer
from schemas import topology

DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpuproxy")
    group.addoption("--nats-url", default=None, help="use this NATS instead of one per test")
    group.addoption(
        "--database-url", default=None, help="SQL database for tests that take any database"
    )
    group.addoption(
        "--postgres-url",
        default=os.environ.get("GPUPROXY_TEST_POSTGRES_URL", DEFAULT_POSTGRES),
        help="PostgreSQL for the postgres-marked tests",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def session_nats_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    outside = request.config.getoption("--nats-url")
    if outside:
        yield outside
        return
    folder = tmp_path_factory.mktemp("session-nats")
    with (folder / "nats-server.log").open("w") as log:
        server = NatsServer(folder / "jetstream", log_line=lambda line: print(line, file=log))
        try:
            yield server.start()
        finally:
            server.stop()


@pytest.fixture
def nats_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    outside = request.config.getoption("--nats-url")
    if outside:
        asyncio.run(_purge(outside))
        yield outside
        return
    log = (tmp_path / "nats-server.log").open("w")
    server = NatsServer(tmp_path / "jetstream", log_line=lambda line: print(line, file=log))
    try:
        yield server.start()
    finally:
        server.stop()
        log.close()


async def _purge(url: str) -> None:
    nc = await connect(url, name="gpuproxy-tests")
    js = nc.jetstream()
    for stream in (topology.COMMAND_STREAM, topology.EVENT_STREAM):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(stream)
    for bucket in (
        topology.RESULTS_BUCKET,
        topology.ACCESS_BUCKET,
        topology.ENDED_SESSIONS_BUCKET,
        topology.RATE_BUCKET,
        topology.INSTANCES_BUCKET,
        topology.RESERVATIONS_BUCKET,
        topology.LEASES_BUCKET,
        topology.STATIC_CLAIMS_BUCKET,
        topology.WORKERS_BUCKET,
        topology.KEYS_BUCKET,
        topology.DRAINS_BUCKET,
    ):
        with contextlib.suppress(NotFoundError):
            await js.delete_key_value(bucket)
    await nc.close()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect(nats_url, name=f"test-{uuid.uuid4().hex[:6]}")
    yield client
    await client.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'gpuproxy.db'}"


@pytest.fixture
def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """The database of tests that work on any: `--database-url`, else a fresh SQLite file."""
    outside: str | None = request.config.getoption("--database-url")
    return outside or sqlite_url


@pytest.fixture(scope="session")
def postgres_url(request: pytest.FixtureRequest) -> str:
    url: str = request.config.getoption("--postgres-url")
    # In a thread of its own: this may first be asked for while the test loop is running.
    with ThreadPoolExecutor(1) as probe:
        reason = probe.submit(asyncio.run, _postgres_unreachable(url)).result()
    if reason:
        message = f"PostgreSQL at {url.split('@')[-1]} does not answer: {reason}"
        if os.environ.get("GPUPROXY_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return url


async def _postgres_unreachable(url: str) -> str:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with asyncio.timeout(5):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    except Exception as exc:
        return type(exc).__name__
    finally:
        await engine.dispose()
    return ""


@pytest.fixture
async def postgres_database(postgres_url: str) -> AsyncIterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    name = f"gpuproxy_test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(postgres_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture
def migrated_database(database_url: str) -> str:
    """`database_url` with every migration applied (run outside the test's event loop)."""
    from gpuproxy import migrate

    migrate.upgrade(database_url)
    return database_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_database(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """A migrated database of each kind in turn: SQLite, then a fresh PostgreSQL one."""
    from gpuproxy import migrate

    url = sqlite_url if request.param == "sqlite" else request.getfixturevalue("postgres_database")
    migrate.upgrade(url)
    return url
