"""No internal text reaches a client: a database that stops taking writes in the middle of a
login is answered with a fixed message and an error id on both doors, and the log holds the
traceback under that id without the SQL statement's bound values (here, a password hash)."""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from argon2 import PasswordHasher

from gateway.accounts.store import Accounts
from gateway.database import engine_for
from gateway.errors import INTERNAL_MESSAGE
from gateway.pb import gpuproxy_pb2 as pb
from gateway.unexpected import ERROR_ID
from gpuproxy import migrate
from tests.e2e.access_client import grpc_status
from tests.e2e.system import running_system

PASSWORD = "a password that works"
OUTDATED = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
"""Weaker than today's parameters: a login with it stores a fresh hash (an SQL write)."""
INTERNAL_TEXT = ("argon2", "SQL", "UPDATE", "password_hash", "locked", "Unexpected", "Error")


@pytest.fixture
def database(tmp_path: Path) -> str:
    # SQLite waits this long (seconds) for a lock before it gives up on a write.
    url = f"sqlite+aiosqlite:///{tmp_path / 'gpuproxy.db'}?timeout=0.2"
    migrate.upgrade(url)
    return url


async def user_with_outdated_hash(url: str, path: Path) -> tuple[str, str]:
    """A user whose login rewrites its hash; returns its email and the hash stored now."""
    engine = engine_for(url)
    try:
        user = await Accounts(engine).register("ada@example.com", PASSWORD)
    finally:
        await engine.dispose()
    stored = OUTDATED.hash(PASSWORD)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE users SET password_hash = ? WHERE id = ?", (stored, user.id))
    return user.email, stored


@contextlib.contextmanager
def writes_blocked(folder: Path) -> Iterator[None]:
    """Another process holds the database's write lock: reads go on, every write fails."""
    holder = sqlite3.connect(folder / "gpuproxy.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_a_database_failing_mid_login_answers_an_error_id_and_leaks_nothing_on_both_doors(
    nats_url: str, database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    email, stored = await user_with_outdated_hash(database, tmp_path / "gpuproxy.db")
    caplog.set_level(logging.INFO)
    async with running_system(nats_url, database, kinds=(), operator=False) as system:
        with writes_blocked(tmp_path):
            async with httpx.AsyncClient(base_url=system.http_base, timeout=10) as http:
                answer = await http.post(
                    "/api/v1/auth/login", json={"email": email, "password": PASSWORD}
                )
            code, details, trailing = await grpc_status(
                system, "Login", pb.LoginRequest(email=email, password=PASSWORD), ()
            )

    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error == {"code": "internal", "message": INTERNAL_MESSAGE, "error_id": error["error_id"]}
    assert re.fullmatch(r"[0-9a-f]{32}", error["error_id"])

    assert code is grpc.StatusCode.INTERNAL
    grpc_id = trailing[ERROR_ID]
    assert details == f"{INTERNAL_MESSAGE} (error id {grpc_id})"
    assert grpc_id != error["error_id"]

    for told in (answer.text, details, str(trailing)):
        assert not [word for word in INTERNAL_TEXT if word in told], told
    logged = caplog.text
    for error_id in (error["error_id"], grpc_id):
        assert f"error id {error_id}" in logged
    assert "database is locked" in logged  # the operator learns what happened...
    assert "SQL parameters hidden" in logged
    assert "$argon2" not in logged  # ...but neither the old hash nor the new one
    assert stored not in logged
    assert PASSWORD not in logged
    assert "Exception in ASGI application" not in logged


async def test_the_same_login_succeeds_once_the_database_takes_writes_again(
    nats_url: str, database: str, tmp_path: Path
) -> None:
    email, _ = await user_with_outdated_hash(database, tmp_path / "gpuproxy.db")
    async with (
        running_system(nats_url, database, kinds=(), operator=False) as system,
        httpx.AsyncClient(base_url=system.http_base, timeout=10) as http,
    ):
        with writes_blocked(tmp_path):
            failed = await http.post(
                "/api/v1/auth/login", json={"email": email, "password": PASSWORD}
            )
        worked = await http.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})

    assert (failed.status_code, worked.status_code) == (500, 200)
