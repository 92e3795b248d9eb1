"""What a worker sends back on a command's reply subject.

Replies travel on core NATS as a sequence of chunks: any number of `Data` and `Heartbeat`,
then exactly one terminal `Result` or `Failure`. `seq` counts from 0 within one delivery
`attempt`; a redelivered command starts a new attempt.
"""

from __future__ import annotations

import msgspec

from schemas import SCHEMA_VERSION
from schemas.errors import ErrorInfo


class Pong(msgspec.Struct, frozen=True, kw_only=True, tag="pong"):
    message: str
    worker_kind: str
    worker_id: str
    attempt: int
    """The JetStream delivery count of the command that produced this answer."""


Reply = Pong
"""Every terminal result; grows into a union with the commands."""


class ChunkBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="t"):
    command_id: str
    attempt: int
    seq: int
    schema_version: int = SCHEMA_VERSION


class Data(ChunkBase, frozen=True, kw_only=True, tag="data"):
    """A piece of a streamed answer (for example inference tokens)."""

    body: bytes


class Heartbeat(ChunkBase, frozen=True, kw_only=True, tag="heartbeat"):
    """The worker is still at it; the gateway keeps waiting."""


class Result(ChunkBase, frozen=True, kw_only=True, tag="result"):
    result: Reply


class Failure(ChunkBase, frozen=True, kw_only=True, tag="failure"):
    error: ErrorInfo


Chunk = Data | Heartbeat | Result | Failure
Terminal = Result | Failure


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """A command's terminal answer as kept in the results bucket."""

    result: Reply | None = None
    error: ErrorInfo | None = None
