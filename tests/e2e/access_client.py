"""A user of the system for access tests: signs up, signs in, calls both front doors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import httpx

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from tests.e2e.system import OPERATOR_PASSWORD, System

PASSWORD = "correct horse battery"


class User:
    def __init__(self, http: httpx.AsyncClient, system: System) -> None:
        self.http = http
        self.system = system
        self.email = f"u-{uuid.uuid4().hex[:8]}@example.com"
        self.user_id = ""
        self.token = ""
        self.refresh_token = ""
        self.password = PASSWORD

    @classmethod
    async def signed_up(cls, http: httpx.AsyncClient, system: System) -> User:
        user = cls(http, system)
        made = await http.post(
            "/api/v1/auth/register", json={"email": user.email, "password": PASSWORD}
        )
        assert made.status_code == 201, made.text
        user.user_id = made.json()["user_id"]
        await user.log_in()
        return user

    @classmethod
    async def operator(cls, http: httpx.AsyncClient, system: System) -> User:
        """The system's admin, signed in."""
        user = cls(http, system)
        user.email, user.user_id, user.password = (
            system.admin_email,
            system.admin_id,
            OPERATOR_PASSWORD,
        )
        await user.log_in()
        return user

    async def log_in(self) -> None:
        grant = await self.http.post(
            "/api/v1/auth/login", json={"email": self.email, "password": self.password}
        )
        assert grant.status_code == 200, grant.text
        self.token = grant.json()["access_token"]
        self.refresh_token = grant.json()["refresh_token"]

    @property
    def session(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    async def call(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        return await self.http.request(method, path, headers=headers or self.session, **kw)

    async def make_key(self, **wanted: Any) -> dict[str, Any]:
        answer = await self.call("POST", "/api/v1/auth/apikey", json={"name": "k", **wanted})
        assert answer.status_code == 201, answer.text
        made: dict[str, Any] = answer.json()
        return made


async def grpc_ping(system: System, metadata: tuple[tuple[str, str], ...]) -> pb.PingResponse:
    async with grpc.aio.insecure_channel(system.grpc_target) as channel:
        answer: pb.PingResponse = await pb_grpc.GPUProxyServiceStub(channel).Ping(
            pb.PingRequest(message="hi"), metadata=metadata, timeout=10
        )
        return answer


async def grpc_status(
    system: System, method: str, request: Any, metadata: tuple[tuple[str, str], ...]
) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """Call one unary method; its status, details and trailing metadata."""
    async with grpc.aio.insecure_channel(system.grpc_target) as channel:
        stub = pb_grpc.GPUProxyServiceStub(channel)
        try:
            await getattr(stub, method)(request, metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            trailing = {k: str(v) for k, v in (exc.trailing_metadata() or ())}
            return exc.code(), exc.details() or "", trailing
    return grpc.StatusCode.OK, "", {}


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> float:
    """Seconds until `check` holds; fails after `within`."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within, "did not happen in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def clear_of_a_new_minute(margin: float = 15.0) -> None:
    """Limits count per clock minute: start a counting test well inside one."""
    into = time.time() % 60
    if into > 60 - margin:
        await asyncio.sleep(60 - into + 0.2)
