"""O1: gpuproxy's bus in one process: `CommandCaller` -> JetStream -> `CommandRuntime`.

Set up as tests/bus/harness.py does: a caller and a runtime on two connections of their
own, the runtime answering with the real ping handler. Comparable to B1 and B2.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from bench.measure import Plan, Session, WrongAnswer, expect, this_process
from bench.processes import nats_server
from bus.caller import CommandCaller
from bus.connection import connect
from bus.runtime import CommandRuntime
from schemas.commands import Ping
from schemas.replies import Pong
from schemas.subjects import WorkerKind
from workers.common.ping import answer_ping

KIND = WorkerKind.PROVISIONER


@contextlib.asynccontextmanager
async def open_gpuproxy_bus(workdir: Path, plan: Plan) -> AsyncIterator[Session]:
    with nats_server(workdir) as server:
        url = server.url
        worker_nc = await connect(url, name="bench-worker")
        caller_nc = await connect(url, name="bench-gateway")
        runtime = CommandRuntime(
            worker_nc, kind=KIND, handlers={Ping: answer_ping}, worker_id="bench-worker"
        )
        caller = CommandCaller(caller_nc, gateway_id="bench-gateway")
        try:
            await runtime.start()
            await caller.start()

            async def call(n: int) -> None:
                sent = f"bench-{n}"
                # A fresh id per call, as the gateway makes when the client sends no key.
                command = Ping(command_id=uuid.uuid4().hex, message=sent)
                reply = await caller.call(KIND, command, timeout=plan.call_timeout)
                if not isinstance(reply, Pong):
                    raise WrongAnswer(f"expected a Pong, got {type(reply).__name__}")
                expect(sent, reply.message)
                expect(str(KIND), reply.worker_kind, "answering worker kind")

            yield Session(call, {**this_process("bench: caller+worker"), "nats-server": server.pid})
        finally:
            await caller.stop()
            await runtime.stop(drain_timeout=5)
            await caller_nc.close()
            await worker_nc.close()
