"""Two gateway processes on one bus and one database agree on access: revocations, disabled
users, role changes and logouts reach the other replica within 5 seconds; rate limits hold
across both; and no credential ever shows up in the database, logs, events or errors."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from nats.aio.client import Client
from sqlalchemy import inspect as sql_inspect
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.e2e.access_client import PASSWORD, clear_of_a_new_minute, eventually
from tests.e2e.processes import gpuproxy, parts_env, provisioned, wait_serving

pytestmark = pytest.mark.slow

PROMISE_SECONDS = 5.0


class Replica:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.http_base = f"http://127.0.0.1:{env['SERVER_PORT']}"
        self.grpc_target = f"127.0.0.1:{env['GRPC_PORT']}"


@asynccontextmanager
async def replicas(
    tmp_path: Path, nats_url: str, database_url: str, count: int = 2, **settings: str
) -> AsyncIterator[tuple[list[Replica], str]]:
    """`count` gateway processes and a provisioner worker; also the operator's API key."""
    env, _ = parts_env(tmp_path, nats_url, DATABASE_URL=database_url, **settings)
    operator_key = await asyncio.to_thread(provisioned, env)
    with ExitStack() as stack:
        gateways = []
        for n in range(count):
            own = {**env, "SERVER_PORT": str(free_port()), "GRPC_PORT": str(free_port())}
            replica = Replica(own, tmp_path / f"gateway-{n}.log")
            process: subprocess.Popen[bytes] = stack.enter_context(
                gpuproxy(["gateway"], own, replica.log)
            )
            gateways.append((replica, process))
        stack.enter_context(gpuproxy(["worker", "provisioner"], env, tmp_path / "worker.log"))
        for replica, process in gateways:
            await asyncio.to_thread(wait_serving, replica.grpc_target, process, replica.log)
        yield [r for r, _ in gateways], operator_key


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[Replica], httpx.AsyncClient]]:
    opened: dict[str, httpx.AsyncClient] = {}

    def client(replica: Replica) -> httpx.AsyncClient:
        if replica.http_base not in opened:
            opened[replica.http_base] = httpx.AsyncClient(base_url=replica.http_base, timeout=10)
        return opened[replica.http_base]

    yield client
    for http in opened.values():
        await http.aclose()


async def sign_up(http: httpx.AsyncClient, email: str) -> dict[str, Any]:
    made = await http.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert made.status_code == 201, made.text
    grant = await http.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert grant.status_code == 200, grant.text
    return {"user_id": made.json()["user_id"], **grant.json()}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def status_of(http: httpx.AsyncClient, headers: dict[str, str], path: str) -> int:
    return (await http.get(path, headers=headers)).status_code


async def test_revocations_and_account_changes_reach_the_other_replica_within_5_s(
    tmp_path: Path, nats_url: str, any_database: str, clients: Any
) -> None:
    async with replicas(tmp_path, nats_url, any_database) as ((a, b), operator_key):
        at_a, at_b = clients(a), clients(b)
        admin = {"x-api-key": operator_key}
        ada = await sign_up(at_a, "ada@example.com")
        made = await at_a.post(
            "/api/v1/auth/apikey", headers=bearer(ada["access_token"]), json={"name": "k"}
        )
        key = {"x-api-key": made.json()["api_key"]}
        assert await status_of(at_b, key, "/api/v1/user/me") == 200

        await at_a.delete(
            f"/api/v1/auth/apikeys/{made.json()['id']}", headers=bearer(ada["access_token"])
        )

        async def key_refused() -> bool:
            return await status_of(at_b, key, "/api/v1/user/me") == 401

        revoked_in = await eventually(key_refused, within=PROMISE_SECONDS)

        await at_a.post("/api/v1/auth/logout", json={"refresh_token": ada["refresh_token"]})

        async def session_ended() -> bool:
            return await status_of(at_b, bearer(ada["access_token"]), "/api/v1/user/me") == 401

        logout_in = await eventually(session_ended, within=PROMISE_SECONDS)
        again = await at_b.post(
            "/api/v1/auth/refresh", json={"refresh_token": ada["refresh_token"]}
        )
        assert again.status_code == 401

        bob = await sign_up(at_a, "bob@example.com")
        await at_a.patch(
            f"/api/v1/admin/users/{bob['user_id']}", headers=admin, json={"role": "admin"}
        )
        promoted = await at_a.post(
            "/api/v1/auth/login", json={"email": "bob@example.com", "password": PASSWORD}
        )
        as_bob = bearer(promoted.json()["access_token"])
        assert await status_of(at_b, as_bob, "/api/v1/admin/users") == 200
        await at_a.patch(
            f"/api/v1/admin/users/{bob['user_id']}", headers=admin, json={"role": "user"}
        )

        async def demoted() -> bool:
            return await status_of(at_b, as_bob, "/api/v1/admin/users") == 403

        demoted_in = await eventually(demoted, within=PROMISE_SECONDS)
        await at_a.patch(
            f"/api/v1/admin/users/{bob['user_id']}", headers=admin, json={"disabled": True}
        )

        async def disabled() -> bool:
            return await status_of(at_b, as_bob, "/api/v1/user/me") == 401

        disabled_in = await eventually(disabled, within=PROMISE_SECONDS)
        async with grpc.aio.insecure_channel(b.grpc_target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await pb_grpc.GPUProxyServiceStub(channel).Ping(
                    pb.PingRequest(), metadata=tuple(as_bob.items()), timeout=10
                )
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    print(
        f"seen by the other replica after: key revoked {revoked_in:.3f} s, logout "
        f"{logout_in:.3f} s, role lowered {demoted_in:.3f} s, user disabled {disabled_in:.3f} s"
    )


async def test_a_rate_limit_holds_across_two_gateway_processes(
    tmp_path: Path, nats_url: str, any_database: str, clients: Any
) -> None:
    async with replicas(tmp_path, nats_url, any_database) as ((a, b), _):
        await clear_of_a_new_minute()
        ada = await sign_up(clients(a), "ada@example.com")
        made = await clients(a).post(
            "/api/v1/auth/apikey",
            headers=bearer(ada["access_token"]),
            json={"name": "k", "rate_limit_per_minute": 10},
        )
        key = {"x-api-key": made.json()["api_key"]}
        codes = [await status_of(clients((a, b)[n % 2]), key, "/api/v1/user/me") for n in range(16)]
        both = await asyncio.gather(
            *(status_of(clients((a, b)[n % 2]), key, "/api/v1/user/me") for n in range(8))
        )
    assert codes.count(200) == 10, codes
    assert codes[:10] == [200] * 10
    assert set(both) == {429}


async def test_no_credential_is_ever_stored_logged_published_or_echoed(
    tmp_path: Path, nats_url: str, any_database: str, clients: Any, nc: Client
) -> None:
    async with replicas(tmp_path, nats_url, any_database, LOG_LEVEL="debug") as ((a, b), _):
        at_a, at_b = clients(a), clients(b)
        secrets: list[str] = [PASSWORD, "wrong password attempt"]
        answers: list[str] = []

        ada = await sign_up(at_a, "ada@example.com")
        secrets += [ada["refresh_token"], ada["access_token"]]
        bad = await at_b.post(
            "/api/v1/auth/login", json={"email": "ada@example.com", "password": secrets[1]}
        )
        answers.append(bad.text)
        made = await at_a.post(
            "/api/v1/auth/apikey", headers=bearer(ada["access_token"]), json={"name": "k"}
        )
        key = made.json()["api_key"]
        public, secret = key.rsplit("_", 1)
        forged = f"{public}_{secret[::-1]}"
        secrets += [key, secret, forged, forged.rsplit("_", 1)[1]]
        async with grpc.aio.insecure_channel(b.grpc_target) as channel:
            stub = pb_grpc.GPUProxyServiceStub(channel)
            login = await stub.Login(pb.LoginRequest(email="ada@example.com", password=PASSWORD))
            secrets += [login.token, login.refresh_token]
            by_grpc = await stub.CreateAPIKey(pb.CreateAPIKeyRequest(name="g", token=login.token))
            secrets += [by_grpc.api_key, by_grpc.api_key.rsplit("_", 1)[1]]
            await stub.Ping(pb.PingRequest(), metadata=(("x-api-key", key),), timeout=10)
            for metadata in ((("x-api-key", forged),), (("authorization", f"Bearer {forged}"),)):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.Ping(pb.PingRequest(), metadata=metadata, timeout=10)
                answers.append(f"{raised.value.details()} {raised.value.trailing_metadata()}")
        for headers in ({"x-api-key": key}, {"authorization": f"Bearer {key}"}):
            answers.append((await at_b.get("/api/v1/user/me", headers=headers)).text)
        for headers in ({"x-api-key": forged}, {"authorization": f"Bearer {forged}"}):
            answers.append((await at_a.get("/api/v1/user/me", headers=headers)).text)
        refreshed = await at_b.post(
            "/api/v1/auth/refresh", json={"refresh_token": ada["refresh_token"]}
        )
        secrets += [refreshed.json()["refresh_token"], refreshed.json()["access_token"]]
        reused = await at_a.post(
            "/api/v1/auth/refresh", json={"refresh_token": ada["refresh_token"]}
        )
        answers.append(reused.text)
        # The reuse above ended ada's first session, the refreshed token's too; the gRPC
        # login is a session of its own.
        answers.append(
            (
                await at_a.delete(
                    f"/api/v1/auth/apikeys/{made.json()['id']}", headers=bearer(login.token)
                )
            ).text
        )
        answers.append((await at_b.get("/api/v1/user/me", headers={"x-api-key": key})).text)
        answers.append((await at_a.get("/api/v1/user/export", headers=bearer(login.token))).text)
        await asyncio.sleep(1.5)  # one flush of the usage records
    places = {
        "answers": "\n".join(answers),
        "database": await database_text(any_database),
        "logs": await asyncio.to_thread(logs_text, tmp_path),
        "bus": await bus_text(nc),
    }
    assert "apikey.created" in places["bus"]
    assert "apikey.revoked" in places["bus"]
    for where, content in places.items():
        for secret in secrets:
            assert secret not in content, f"a credential ({secret[:6]}...) is in the {where}"


def logs_text(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.glob("*.log"))


async def database_text(url: str) -> str:
    """Every row of every table, as text."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as db:
            tables = await db.run_sync(lambda sync: sql_inspect(sync).get_table_names())
            dumped = []
            for table in tables:
                rows = (await db.execute(text(f'SELECT * FROM "{table}"'))).all()
                dumped.append(f"{table}: {rows!r}")
        return "\n".join(dumped)
    finally:
        await engine.dispose()


async def bus_text(nc: Client) -> str:
    """Every message of every stream (events, commands, KV buckets), raw."""
    js = nc.jetstream()
    found = []
    for info in await js.streams_info():
        name = info.config.name
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(name, seq)
            except Exception:
                continue
            found.append(f"{name} {msg.subject} {msg.headers} {msg.data!r}")
    return "\n".join(found)
