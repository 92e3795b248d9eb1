"""A whole gpuproxy in the test's process: gateway on real sockets, one worker of each kind."""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import msgspec
from faststream import FastStream

from bus.connection import connect
from gateway.accounts.keys import ApiKeys
from gateway.accounts.projection import Projection
from gateway.accounts.store import Accounts
from gateway.auth.tokens import hmac_ring
from gateway.config import GatewayConfig
from gateway.database import engine_for
from gateway.server import serve
from schemas.access import SCOPES_BY_ROLE, Role
from schemas.subjects import WorkerKind
from simulator.market import Market
from tests.conftest import free_port
from tests.provisioner.harness import fast_config
from workers.billing.app import build as billing
from workers.common.config import WorkerConfig
from workers.provisioner.app import build as provisioner
from workers.provisioner.config import ProvisionerConfig
from workers.proxy.app import build as proxy
from workers.proxy.config import ProxyConfig

OPERATOR_PASSWORD = "operator password 1"

BUILDERS = {
    WorkerKind.PROXY: proxy,
    WorkerKind.BILLING: billing,
}


class System(msgspec.Struct, kw_only=True):
    gateway: GatewayConfig
    admin_id: str = ""
    admin_email: str = ""
    api_key: str = ""
    """An admin's key with every scope and no rate limit, for tests about something else."""

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"


@asynccontextmanager
async def worker_app(
    kind: WorkerKind,
    nats_url: str,
    provisioning: ProvisionerConfig | None = None,
    proxying: ProxyConfig | None = None,
) -> AsyncIterator[FastStream]:
    config = WorkerConfig(nats_url=nats_url, worker_id=f"{kind}-{uuid.uuid4().hex[:6]}")
    with tempfile.TemporaryDirectory(prefix="gpuproxy-sim-") as sim_dir:
        if kind is WorkerKind.PROVISIONER:
            app = provisioner(config, provisioning or fast_config(Path(sim_dir)), {})
        elif kind is WorkerKind.PROXY:
            app = proxy(config, proxying)
        else:
            app = BUILDERS[kind](config)
        await app.start()
        try:
            yield app
        finally:
            await app.stop()
            if kind is WorkerKind.PROVISIONER:
                # The sim marketplace's machines are this test's processes: none outlives it.
                market = Market(provisioning.sim_dir if provisioning else Path(sim_dir))
                for machine in market.machines():
                    market.destroy(machine.id)


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
    nats_url: str,
    database_url: str,
    *,
    kinds: tuple[WorkerKind, ...] = tuple(WorkerKind),
    operator: bool = True,
    trusted_proxies: tuple[str, ...] = (),
    auth_attempts_per_minute: int = 60,
    provisioning: ProvisionerConfig | None = None,
    proxying: ProxyConfig | None = None,
) -> AsyncIterator[System]:
    """The system; with `operator`, an admin key for calls that need a credential (the
    database must then be migrated and reachable)."""
    config = GatewayConfig(
        nats_url=nats_url,
        database_url=database_url,
        gateway_id=f"gw-{uuid.uuid4().hex[:6]}",
        keys=hmac_ring(secrets.token_urlsafe(48).encode()),
        http_port=free_port(),
        grpc_port=free_port(),
        request_timeout=10.0,
        probe_timeout=2.0,
        trusted_proxies=trusted_proxies,
        auth_attempts_per_minute=auth_attempts_per_minute,
    )
    async with AsyncExitStack() as stack:
        for kind in kinds:
            await stack.enter_async_context(worker_app(kind, nats_url, provisioning, proxying))
        await stack.enter_async_context(running_gateway(config))
        if not operator:
            yield System(gateway=config)
            return
        admin_id, api_key, email = await operator_key(nats_url, database_url)
        yield System(gateway=config, admin_id=admin_id, api_key=api_key, admin_email=email)


async def operator_key(
    nats_url: str, database_url: str, *, role: str = "admin", rate_limit: int = 0
) -> tuple[str, str, str]:
    """A fresh account of `role` (password `OPERATOR_PASSWORD`) with a key holding all its
    scopes, made the way the gateway makes them (SQL, then the access bucket); returns the
    user id, the key and the email."""
    engine = engine_for(database_url)
    nc = await connect(nats_url, name="test-operator")
    try:
        projection = Projection(engine, nc.jetstream())
        await projection.start()
        user = await Accounts(engine).register(
            f"{role}-{uuid.uuid4().hex[:8]}@example.com",
            OPERATOR_PASSWORD,
            role=role,
            rate_limit_per_minute=rate_limit,
        )
        made = await ApiKeys(engine).create(
            user.id,
            name="tests",
            scopes=SCOPES_BY_ROLE[Role(role)],
            expires_at_ms=None,
            rate_limit_per_minute=rate_limit or None,
        )
        await projection.user(user.id)
        await projection.key(made.info.id)
        return user.id, made.api_key, user.email
    finally:
        await nc.drain()
        await engine.dispose()


def _with_key(details: Any, api_key: str) -> Any:
    metadata = list(details.metadata or ())
    if not any(k in ("authorization", "x-api-key") for k, _ in metadata):
        metadata.append(("x-api-key", api_key))
    return details._replace(metadata=grpc.aio.Metadata(*metadata))


# grpc.aio files an interceptor under the first call kind it implements: one class per kind.
class _UnaryKey(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds `x-api-key` to every call that carries no credential of its own."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_key(details, self._api_key), request)


class _StreamKey(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_with_key(details, self._api_key), request_iterator)


def keyed_channel(target: str, api_key: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, interceptors=[_UnaryKey(api_key), _StreamKey(api_key)])
