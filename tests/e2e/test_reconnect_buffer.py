"""Workers and gateways keep the same reconnect buffer: a large message sent while the
connection is down waits for the server instead of failing (nats-py's own default is 2 MiB)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from bus.connection import connect
from gpuproxy.natsd import NatsServer, payload_limit
from tests.conftest import free_port
from workers.common.config import WorkerConfig
from workers.proxy.app import build as proxy

LARGE = b"x" * (3 * 1024 * 1024)


def server(tmp_path: Path, port: int) -> NatsServer:
    # The same store each time: what the stream holds outlives the restart.
    return NatsServer(tmp_path / "jetstream", port=port, max_payload=payload_limit(len(LARGE)))


async def stored(url: str) -> bytes | None:
    nc = await connect(url, name="reader")
    try:
        for _ in range(150):
            try:
                msg = await nc.jetstream().get_msg("LARGE", seq=1)
            except NotFoundError:
                await asyncio.sleep(0.1)
                continue
            return msg.data
        return None
    finally:
        await nc.close()


async def test_a_worker_buffers_a_3_mib_message_while_it_reconnects(tmp_path: Path) -> None:
    port = free_port()
    first = server(tmp_path, port)
    url = first.start()
    setup = await connect(url, name="setup")
    await setup.jetstream().add_stream(StreamConfig(name="LARGE", subjects=["large"]))
    await setup.close()
    app = proxy(WorkerConfig(nats_url=url, worker_id=f"proxy-{uuid.uuid4().hex[:6]}"))
    await app.start()
    second = server(tmp_path, port)
    try:
        first.stop()
        worker = app.broker.connection
        # nats-py offers no awaitable for "disconnected"; the state flips within a moment.
        while worker.is_connected:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await worker.publish("large", LARGE)
        second.start()
        kept = await stored(url)
        await app.stop()
    finally:
        second.stop()
        first.stop()

    assert kept == LARGE
