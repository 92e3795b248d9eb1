"""A worker process's settings, filled in by the command line."""

from __future__ import annotations

import msgspec

from bus.connection import RECONNECT_BUFFER_BYTES, NatsCredentials
from schemas import topology


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    nats_credentials: NatsCredentials | None = None
    """The worker kind's NATS user; None: a server without authentication (or the URL's own)."""
    nats_reconnect_buffer: int = RECONNECT_BUFFER_BYTES
    worker_id: str
    ack_wait: float = 30.0
    """Seconds JetStream waits for an ack (or keep-alive) before it delivers a command again."""
    max_deliver: int = 5
    window: int = 64
    """Commands one replica runs at once."""
    drain_timeout: float = 20.0
    stream_replicas: int = 1
    heartbeat_seconds: float = topology.HEARTBEAT_SECONDS
    """How often the replica puts its heartbeat in the workers bucket."""
