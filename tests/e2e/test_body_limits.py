"""Every body has a limit (`GPUPROXY_MAX_BODY_BYTES`): an HTTP body is read only up to it and
answered 413 past it, a declared length over it before a byte is read; a gRPC message over
it is RESOURCE_EXHAUSTED; a command the bus cannot carry is refused naming the bus's limit,
never a bus error from deep inside."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import httpx
import pytest
from nats.aio.client import Client

from bus.codec import encode
from gateway.auth.tokens import hmac_ring
from gateway.config import GatewayConfig
from gateway.pb import gpuproxy_pb2 as pb
from schemas.commands import Ping
from schemas.errors import PayloadTooLarge
from schemas.subjects import WorkerKind
from tests.bus.harness import running_caller
from tests.conftest import free_port
from tests.e2e.access_client import grpc_status
from tests.e2e.system import running_gateway

LIMIT = 64 * 1024
LOGIN = "/api/v1/auth/login"


@asynccontextmanager
async def gateway(nats_url: str, database_url: str) -> AsyncIterator[GatewayConfig]:
    config = GatewayConfig(
        nats_url=nats_url,
        database_url=database_url,
        gateway_id=f"gw-{uuid.uuid4().hex[:6]}",
        keys=hmac_ring(secrets.token_urlsafe(48).encode()),
        http_port=free_port(),
        grpc_port=free_port(),
        max_body_bytes=LIMIT,
    )
    async with running_gateway(config):
        yield config


@pytest.fixture
async def limited(nats_url: str, migrated_database: str) -> AsyncIterator[GatewayConfig]:
    async with gateway(nats_url, migrated_database) as config:
        yield config


def _names_the_limit(answer: httpx.Response) -> None:
    assert answer.status_code == 413
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == ("resource_exhausted", "body")
    assert f"larger than {LIMIT} bytes" in error["message"]
    assert "GPUPROXY_MAX_BODY_BYTES" in error["message"]


def _login_body(size: int) -> bytes:
    """A JSON login body of exactly `size` bytes."""
    head = b'{"email": "ada@example.com", "password": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


async def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
    limited: GatewayConfig,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.http_port)
    writer.write(
        f"POST {LOGIN} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Content-Length: {LIMIT + 1}\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        # Not one byte of the body was sent: only a refusal up front can answer this.
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await asyncio.wait_for(reader.readexactly(length), timeout=5)
    finally:
        writer.close()

    assert head.startswith(b"HTTP/1.1 413 ")
    _names_the_limit(httpx.Response(413, content=body))


async def test_a_body_sent_without_a_length_is_read_only_up_to_the_limit(
    limited: GatewayConfig,
) -> None:
    whole = _login_body(2 * LIMIT)
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for start in range(0, len(whole), 4096):
            sent += 1
            yield whole[start : start + 4096]

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{limited.http_port}") as http:
        answer = await http.post(LOGIN, content=chunks(), timeout=10)

    _names_the_limit(answer)


async def test_a_body_at_the_limit_is_read_and_judged_on_its_content(
    limited: GatewayConfig,
) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{limited.http_port}") as http:
        answer = await http.post(LOGIN, content=_login_body(LIMIT), timeout=10)

    assert answer.status_code == 401  # read to the end, and the password checked
    assert answer.json()["error"]["message"] == "the email or password is wrong"


async def test_a_grpc_message_over_the_limit_is_resource_exhausted_naming_it(
    limited: GatewayConfig,
) -> None:
    code, details, _ = await grpc_status(
        _System(limited), "Login", pb.LoginRequest(email="a@b.co", password="x" * LIMIT), ()
    )

    # grpc's own words ("Received message larger than max (65548 vs. 65536)"): the check
    # runs inside grpc before any code of ours, which keeps an oversized message unread.
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"vs. {LIMIT})" in details


class _System:
    """What `grpc_status` needs of a system: where its gRPC door listens."""

    def __init__(self, config: GatewayConfig) -> None:
        self.grpc_target = f"127.0.0.1:{config.grpc_port}"


async def test_a_command_larger_than_the_bus_carries_is_refused_naming_the_bus_limit(
    nc: Client,
) -> None:
    bus_limit = nc.max_payload
    command = Ping(command_id=uuid.uuid4().hex, actor="u1", message="x" * bus_limit)
    assert len(encode(command)) > bus_limit

    async with running_caller(nc) as caller:
        with pytest.raises(PayloadTooLarge) as refused:
            await caller.call(WorkerKind.PROXY, command, timeout=5)

    assert str(bus_limit) in refused.value.message
    assert not refused.value.retriable
