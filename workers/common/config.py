"""A worker process's settings, filled in by the command line."""

from __future__ import annotations

import msgspec


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    worker_id: str
    ack_wait: float = 30.0
    """Seconds JetStream waits for an ack (or keep-alive) before it delivers a command again."""
    max_deliver: int = 5
    window: int = 64
    """Commands one replica runs at once."""
    drain_timeout: float = 20.0
    stream_replicas: int = 1
