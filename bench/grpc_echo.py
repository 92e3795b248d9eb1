"""B3: a bare grpc.aio unary echo, the floor under any gRPC front door.

The server runs in a child process, as the gateway does in O2: client and server then
each have their own interpreter and core, the same split O2's client and gateway get.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from bench.grpc_client import ping_call, ping_stub, wait_until_answering
from bench.measure import Plan, Session, this_process
from bench.processes import child_env, child_process, free_port

ECHO_KIND = "echo"


@contextlib.asynccontextmanager
async def open_grpc_echo(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
    port = free_port()
    log_path = workdir / "grpc-echo.log"
    args = [sys.executable, "-m", "bench.grpc_echo_server", str(port)]
    with child_process(args, env=child_env(), log_path=log_path) as server:
        async with ping_stub(port) as stub:
            await wait_until_answering(
                stub,
                worker_kind=ECHO_KIND,
                within=30.0,
                watched={"echo server": (server, log_path)},
            )
            yield Session(
                ping_call(stub, worker_kind=ECHO_KIND, timeout=plan.call_timeout),
                {**this_process("bench: gRPC client"), "echo server": server.pid},
            )
