"""A whole gpuproxy in the test's process: gateway on real sockets, one worker of each kind."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import msgspec
from faststream import FastStream

from gateway.auth.tokens import hmac_ring
from gateway.config import GatewayConfig
from gateway.server import serve
from schemas.subjects import WorkerKind
from tests.conftest import free_port
from workers.billing.app import build as billing
from workers.common.config import WorkerConfig
from workers.provisioner.app import build as provisioner
from workers.proxy.app import build as proxy

BUILDERS = {
    WorkerKind.PROVISIONER: provisioner,
    WorkerKind.PROXY: proxy,
    WorkerKind.BILLING: billing,
}


class System(msgspec.Struct, kw_only=True):
    gateway: GatewayConfig

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"


@asynccontextmanager
async def worker_app(kind: WorkerKind, nats_url: str) -> AsyncIterator[FastStream]:
    app = BUILDERS[kind](
        WorkerConfig(nats_url=nats_url, worker_id=f"{kind}-{uuid.uuid4().hex[:6]}")
    )
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@asynccontextmanager
async def running_gateway(config: GatewayConfig) -> AsyncIterator[None]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(config, stop, ready=ready, handle_signals=False))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()
    try:
        yield
    finally:
        stop.set()
        await task


@asynccontextmanager
async def running_system(
    nats_url: str, database_url: str, *, kinds: tuple[WorkerKind, ...] = tuple(WorkerKind)
) -> AsyncIterator[System]:
    config = GatewayConfig(
        nats_url=nats_url,
        database_url=database_url,
        gateway_id=f"gw-{uuid.uuid4().hex[:6]}",
        keys=hmac_ring(secrets.token_urlsafe(48).encode()),
        http_port=free_port(),
        grpc_port=free_port(),
        request_timeout=10.0,
        probe_timeout=2.0,
    )
    async with AsyncExitStack() as stack:
        for kind in kinds:
            await stack.enter_async_context(worker_app(kind, nats_url))
        await stack.enter_async_context(running_gateway(config))
        yield System(gateway=config)
