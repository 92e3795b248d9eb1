"""O2: the whole ping through gpuproxy, one process per part, driven over gRPC.

nats-server, `gpuproxy worker provisioner` and `gpuproxy gateway` run as the deployment
runs them; this process is only the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from bench.grpc_client import (
    ping_call,
    ping_stub,
    signed_in_key,
    wait_until_answering,
    wait_until_serving,
)
from bench.measure import Plan, Session, this_process
from bench.processes import child_env, child_process, free_port, nats_server
from gpuproxy import first_admin, migrate

KIND = "provisioner"
OPERATOR = {
    "GPUPROXY_ADMIN_EMAIL": "bench@gpuproxy.local",
    "GPUPROXY_ADMIN_PASSWORD": secrets.token_urlsafe(18),
}
STARTUP_SECONDS = 60.0
"""Two Python processes importing gpuproxy on a busy two-core machine can take a while."""


@contextlib.asynccontextmanager
async def open_gpuproxy_e2e(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
    grpc_port = free_port()
    with nats_server(workdir) as server:
        url = server.url
        env = child_env(
            NATS_URL=url,
            DATABASE_URL=f"sqlite+aiosqlite:///{workdir / 'b.db'}",
            GPUPROXY_DATA_DIR=str(workdir),
            GPUPROXY_BIND="127.0.0.1",
            SERVER_PORT=str(free_port()),
            GRPC_PORT=str(grpc_port),
            LOG_LEVEL="warning",
            JWT_SECRET=secrets.token_urlsafe(48),
        )
        # The operator's steps: migrate, first admin, then (below) log in and make a key.
        database_url = env["DATABASE_URL"]
        await asyncio.to_thread(migrate.upgrade, database_url)
        await asyncio.to_thread(first_admin.ensure, database_url, OPERATOR)
        gpuproxy = [sys.executable, "-m", "gpuproxy"]
        worker_log = workdir / "worker.log"
        gateway_log = workdir / "gateway.log"
        # Entered in this order, left in the reverse: the gateway stops before the worker,
        # and both before nats-server.
        with (
            child_process([*gpuproxy, "worker", KIND], env=env, log_path=worker_log) as worker,
            child_process([*gpuproxy, "gateway"], env=env, log_path=gateway_log) as gateway,
        ):
            async with ping_stub(grpc_port) as stub:
                watched = {"gateway": (gateway, gateway_log), "worker": (worker, worker_log)}
                await wait_until_serving(grpc_port, within=STARTUP_SECONDS, watched=watched)
                key = await signed_in_key(
                    stub, OPERATOR["GPUPROXY_ADMIN_EMAIL"], OPERATOR["GPUPROXY_ADMIN_PASSWORD"]
                )
                credential = (("x-api-key", key),)
                await wait_until_answering(
                    stub,
                    worker_kind=KIND,
                    within=STARTUP_SECONDS,
                    watched=watched,
                    metadata=credential,
                )
                yield Session(
                    ping_call(
                        stub, worker_kind=KIND, timeout=plan.call_timeout, metadata=credential
                    ),
                    {
                        **this_process("bench: gRPC client"),
                        "gateway": gateway.pid,
                        "nats-server": server.pid,
                        "worker": worker.pid,
                    },
                )
