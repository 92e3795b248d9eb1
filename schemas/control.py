"""Control messages on core NATS: not commands, not facts, just signals between processes."""

from __future__ import annotations

import msgspec


class Cancel(msgspec.Struct, frozen=True, kw_only=True):
    """The caller gave up on a command; the replica running it stops and answers `cancelled`."""

    command_id: str
    run: int = 0
    """Which run of the command (`subjects.message_id`): a cancel never stops a later run."""
    reason: str = "cancelled by the caller"
