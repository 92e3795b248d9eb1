"""A worker replica's heartbeat: the record that says it is taking commands.

Each replica puts one under `<kind>.<worker id>` in the workers bucket every few seconds and
deletes it on a clean stop; one that dies stops putting it and the bucket's TTL ages it out.
Gateways read the bucket for the status of each worker kind and write nothing.
"""

from __future__ import annotations

import msgspec

from schemas.subjects import WorkerKind


class WorkerHeartbeat(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    worker_id: str
    host: str
    pid: int
    in_flight: int
    """Commands the replica was running when it put this record."""
    started_at_ms: int
    seen_at_ms: int
    """The replica's own clock when it put this record."""


def heartbeat_key(kind: WorkerKind, worker_id: str) -> str:
    return f"{kind}.{worker_id}"
