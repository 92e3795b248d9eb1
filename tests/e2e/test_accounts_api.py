"""Accounts through both front doors, over real sockets, with the events they leave."""

from __future__ import annotations

import grpc
import httpx
import msgspec
import pytest
from nats.aio.client import Client

from gateway.auth.tokens import TokenAuthority
from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from schemas import topology
from schemas.events import Event, SessionEnded, SessionStarted, UserRegistered
from tests.e2e.system import System

PASSWORD = "correct horse battery"


async def register(http: httpx.AsyncClient, email: str = "ada@example.com") -> str:
    answer = await http.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert answer.status_code == 201, answer.text
    user_id: str = answer.json()["user_id"]
    return user_id


async def all_events(nc: Client) -> list[tuple[bytes, Event]]:
    js = nc.jetstream()
    sub = await js.subscribe("gpuproxy.evt.>", stream=topology.EVENT_STREAM, ordered_consumer=True)
    found = []
    while True:
        try:
            msg = await sub.next_msg(timeout=0.5)
        except TimeoutError:
            break
        found.append((msg.data, msgspec.json.decode(msg.data, type=Event)))
    await sub.unsubscribe()
    return found


async def test_register_login_refresh_logout_over_http(
    http: httpx.AsyncClient, system: System
) -> None:
    user_id = await register(http)
    login = await http.post(
        "/api/v1/auth/login", json={"email": "ADA@example.com", "password": PASSWORD}
    )
    assert login.status_code == 200
    grant = login.json()
    assert (grant["user_id"], grant["email"], grant["token_type"]) == (
        user_id,
        "ada@example.com",
        "bearer",
    )
    claims = TokenAuthority(system.gateway.keys).verify(grant["access_token"])
    assert (claims.sub, claims.role) == (user_id, "user")
    assert "admin" not in claims.scopes

    refreshed = await http.post(
        "/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]}
    )
    assert refreshed.status_code == 200
    again = await http.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]})
    assert again.status_code == 401
    assert again.json()["error"]["code"] == "unauthenticated"

    fresh = await http.post(
        "/api/v1/auth/login", json={"email": "ada@example.com", "password": PASSWORD}
    )
    token = fresh.json()["refresh_token"]
    assert (
        await http.post("/api/v1/auth/logout", json={"refresh_token": token})
    ).status_code == 204
    after = await http.post("/api/v1/auth/refresh", json={"refresh_token": token})
    assert after.status_code == 401


async def test_registering_an_email_twice_is_a_conflict_naming_the_field(
    http: httpx.AsyncClient,
) -> None:
    await register(http)
    answer = await http.post(
        "/api/v1/auth/register", json={"email": "Ada@Example.com", "password": PASSWORD}
    )
    assert answer.status_code == 409
    assert answer.json()["error"]["field"] == "email"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "nobody", "password": PASSWORD}, "email"),
        ({"email": "ada@example.com", "password": "short"}, "password"),
        ({"email": "ada@example.com"}, "password"),
        ({"email": "ada@example.com", "password": PASSWORD, "role": "admin"}, "role"),
    ],
)
async def test_bad_registration_is_refused_naming_the_field(
    http: httpx.AsyncClient, body: dict[str, str], field: str
) -> None:
    answer = await http.post("/api/v1/auth/register", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["field"] == field


async def test_a_wrong_password_gets_401_without_echoing_it(http: httpx.AsyncClient) -> None:
    await register(http)
    answer = await http.post(
        "/api/v1/auth/login", json={"email": "ada@example.com", "password": "guess-guess-guess"}
    )
    assert answer.status_code == 401
    assert "guess-guess-guess" not in answer.text


async def test_grpc_login_returns_a_token_the_gateway_signed(
    http: httpx.AsyncClient, system: System
) -> None:
    user_id = await register(http)
    async with grpc.aio.insecure_channel(system.grpc_target) as channel:
        stub = pb_grpc.GPUProxyServiceStub(channel)
        answer = await stub.Login(pb.LoginRequest(email="ada@example.com", password=PASSWORD))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Login(pb.LoginRequest(email="ada@example.com", password="not it at all"))
    assert (answer.user_id, answer.email) == (user_id, "ada@example.com")
    assert answer.refresh_token
    assert answer.expires_in == system.gateway.access_ttl
    assert TokenAuthority(system.gateway.keys).verify(answer.token).sub == user_id
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not it at all" not in (raised.value.details() or "")


async def test_account_changes_are_events_that_carry_no_secret(
    http: httpx.AsyncClient, nc: Client
) -> None:
    user_id = await register(http)
    grant = (
        await http.post(
            "/api/v1/auth/login", json={"email": "ada@example.com", "password": PASSWORD}
        )
    ).json()
    await http.post("/api/v1/auth/logout", json={"refresh_token": grant["refresh_token"]})
    events = await all_events(nc)
    facts = [event for _, event in events if not type(event).__name__.startswith("Worker")]
    assert [type(e) for e in facts] == [UserRegistered, SessionStarted, SessionEnded]
    assert all(getattr(e, "user_id", None) == user_id for e in facts)
    raw = b"\n".join(data for data, _ in events)
    for secret in (PASSWORD, grant["access_token"], grant["refresh_token"].split(".")[1]):
        assert secret.encode() not in raw
