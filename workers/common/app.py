"""The shell of every worker kind: a FastStream application around the command runtime.

FastStream owns the process lifecycle (signals, start and stop hooks) and the broker
connection. Commands, their keep-alives and their cancellation run on `bus.runtime`, directly
on nats-py underneath the same connection: FastStream 0.7.8's default pull subscriber takes
one message at a time and waits for its handler before pulling again, which measured at about
a fifth of the runtime's throughput (`just bench`, B2 against O1).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Protocol

from faststream import FastStream
from faststream.nats import NatsBroker
from nats.aio.client import Client

from bus.connection import split_servers
from bus.runtime import CommandRuntime, Handler
from schemas import subjects
from schemas.commands import CommandBase
from schemas.events import WorkerStarted, WorkerStopped
from workers.common.config import WorkerConfig

log = logging.getLogger("gpuproxy.worker")


class Service(Protocol):
    """What a worker kind runs besides stateless handlers: shared state, background jobs."""

    async def start(self, nc: Client) -> Mapping[type[CommandBase], Handler]:
        """Get ready on the connection; returns the handlers that need this service."""

    async def stop(self) -> None:
        """Called after the commands drained."""


def worker_app(
    kind: subjects.WorkerKind,
    handlers: Mapping[type[CommandBase], Handler],
    config: WorkerConfig,
    service: Service | None = None,
) -> FastStream:
    broker = NatsBroker(
        split_servers(config.nats_url),
        name=config.worker_id,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        logger=log,
        # Per-message "received/processed" lines only at debug: control messages are chatty.
        log_level=logging.DEBUG,
    )
    app = FastStream(broker, logger=log)
    state: dict[str, CommandRuntime] = {}

    @app.after_startup
    async def start_commands() -> None:
        served = dict(handlers)
        if service is not None:
            served.update(await service.start(broker.connection))
        runtime = CommandRuntime(
            broker.connection,
            kind=kind,
            handlers=served,
            worker_id=config.worker_id,
            ack_wait=config.ack_wait,
            max_deliver=config.max_deliver,
            window=config.window,
            stream_replicas=config.stream_replicas,
        )
        await runtime.start()
        state["runtime"] = runtime
        await runtime.events.publish(
            WorkerStarted(
                event_id=f"started-{config.worker_id}",
                occurred_at_ms=int(time.time() * 1000),
                worker_kind=str(kind),
                worker_id=config.worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
            )
        )

    @app.on_shutdown
    async def drain_commands() -> None:
        runtime = state.pop("runtime", None)
        if runtime is None:
            return
        abandoned = await runtime.stop(config.drain_timeout)
        if service is not None:
            await service.stop()
        await runtime.events.publish(
            WorkerStopped(
                event_id=f"stopped-{config.worker_id}",
                occurred_at_ms=int(time.time() * 1000),
                worker_kind=str(kind),
                worker_id=config.worker_id,
                in_flight_abandoned=abandoned,
            )
        )

    return app
