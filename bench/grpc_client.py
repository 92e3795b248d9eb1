"""The gRPC side of B3 and O2: one channel, `GPUProxyService/Ping` calls, answers checked."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.measure import Call, expect
from bench.processes import tail
from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    # Only in the generated stubs: what the stub class becomes on an aio channel.
    from gateway.pb.gpuproxy_pb2_grpc import GPUProxyServiceAsyncStub


class NotReady(RuntimeError):
    pass


@contextlib.asynccontextmanager
async def ping_stub(port: int) -> AsyncIterator[GPUProxyServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.GPUProxyServiceStub(channel)


def ping_call(
    stub: GPUProxyServiceAsyncStub,
    *,
    worker_kind: str,
    timeout: float,
    metadata: tuple[tuple[str, str], ...] = (),
) -> Call:
    async def call(n: int) -> None:
        sent = f"bench-{n}"
        reply = await stub.Ping(pb.PingRequest(message=sent), timeout=timeout, metadata=metadata)
        expect(sent, reply.message)
        expect(worker_kind, reply.worker_kind, "answering worker kind")

    return call


async def signed_in_key(stub: GPUProxyServiceAsyncStub, email: str, password: str) -> str:
    """Log in as an operator would and make an API key without a limit of its own."""
    login = await stub.Login(pb.LoginRequest(email=email, password=password), timeout=30)
    made = await stub.CreateAPIKey(
        pb.CreateAPIKeyRequest(name="bench", token=login.token, rate_limit_per_minute=0),
        timeout=30,
    )
    return str(made.api_key)


async def wait_until_answering(
    stub: GPUProxyServiceAsyncStub,
    *,
    worker_kind: str,
    within: float,
    watched: dict[str, tuple[subprocess.Popen[bytes], Path]],
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """Ping until an answer comes back; fail early, with its log, if a child has exited."""
    deadline = time.monotonic() + within
    probe = ping_call(stub, worker_kind=worker_kind, timeout=1.0, metadata=metadata)
    last = "no attempt"
    while time.monotonic() < deadline:
        for name, (process, log_path) in watched.items():
            if process.poll() is not None:
                raise NotReady(
                    f"{name} exited with {process.returncode} before answering:\n{tail(log_path)}"
                )
        try:
            await probe(-1)
            return
        except grpc.aio.AioRpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        await asyncio.sleep(0.1)
    logs = "\n".join(f"--- {name}:\n{tail(path)}" for name, (_, path) in watched.items())
    raise NotReady(f"no answer to Ping within {within:.0f} s (last: {last})\n{logs}")


async def wait_until_serving(
    port: int, *, within: float, watched: dict[str, tuple[subprocess.Popen[bytes], Path]]
) -> None:
    """Wait for the standard health service to say SERVING (needs no credential)."""
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the package ships no stubs
        while time.monotonic() < deadline:
            for name, (process, log_path) in watched.items():
                if process.poll() is not None:
                    raise NotReady(f"{name} exited with {process.returncode}:\n{tail(log_path)}")
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise NotReady(f"the gateway was not serving within {within:.0f} s")
