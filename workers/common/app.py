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
from faststream.security import SASLPlaintext
from nats.aio.client import Client

from bus.connection import inbox_prefix, split_servers
from bus.runtime import CommandRuntime, Handler
from schemas import subjects
from schemas.commands import CommandBase
from schemas.events import WorkerStarted, WorkerStopped
from workers.common.config import WorkerConfig
from workers.common.presence import Presence

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
        # The same buffer as the gateway's: a worker's largest reply must fit while it
        # reconnects, and nats-py's 2 MiB does not hold one.
        pending_size=config.nats_reconnect_buffer,
        inbox_prefix=inbox_prefix(str(kind)),
        security=(
            SASLPlaintext(config.nats_credentials.user, config.nats_credentials.password)
            if config.nats_credentials is not None
            else None
        ),
        logger=log,
        # Per-message "received/processed" lines only at debug: control messages are chatty.
        log_level=logging.DEBUG,
    )
    app = FastStream(broker, logger=log)
    state: dict[str, CommandRuntime] = {}
    presences: list[Presence] = []

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
        # Announced only once its consumer pulls: a replica in the status takes commands.
        presence = Presence(
            broker.connection,
            kind=kind,
            worker_id=config.worker_id,
            in_flight=lambda: runtime.in_flight,
            period=config.heartbeat_seconds,
            replicas=config.stream_replicas,
        )
        await presence.start()
        presences.append(presence)
        log.info("worker %s taking %s commands", config.worker_id, kind)
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
        # Out of the status first: gateways stop counting a replica that takes no more work.
        for presence in presences:
            await presence.stop()
        presences.clear()
        running = runtime.in_flight
        log.info(
            "worker %s stops taking commands; draining %d running (up to %gs)",
            config.worker_id,
            running,
            config.drain_timeout,
        )
        abandoned = await runtime.stop(config.drain_timeout)
        log.info(
            "worker %s drained: %d finished, %d handed back to JetStream for another replica",
            config.worker_id,
            max(running - abandoned, 0),
            abandoned,
        )
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
        log.info("worker %s stopped", config.worker_id)

    return app
