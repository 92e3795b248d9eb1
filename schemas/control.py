"""Control messages on core NATS: not commands, not facts, just signals between processes."""

from __future__ import annotations

import msgspec


class Cancel(msgspec.Struct, frozen=True, kw_only=True):
    """The caller gave up on a command; the replica running it stops and answers `cancelled`."""

    command_id: str
    run: int = 0
    """Which run of the command (`subjects.message_id`): a cancel never stops a later run."""
    reason: str = "cancelled by the caller"


CREDIT_WINDOW = 64
"""Pieces of a streamed answer a worker sends ahead of what its caller has taken. A piece is
what one read of the machine gave (usually a few tokens), so the gateway holds at most this
many of one answer, however slow its client."""
CREDIT_EVERY = 16
"""The caller reports what it has taken every this many pieces."""


class Credit(msgspec.Struct, frozen=True, kw_only=True):
    """The caller has taken `consumed` pieces of a streamed answer: the worker may send up to
    its window beyond that. A slow reader so holds back the worker, which stops reading the
    machine, instead of every piece piling up in the gateway."""

    command_id: str
    run: int = 0
    attempt: int
    """The delivery the pieces came from; a redelivery counts from zero again."""
    consumed: int
