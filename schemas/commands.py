"""Commands: what a gateway asks a worker kind to do.

Each command is a tagged msgspec Struct; its tag is the last token of its subject
(`gpuproxy.cmd.<kind>.<tag>`). A command's id is its idempotency key: JetStream drops a repeat
inside the dedupe window and the worker answers a redelivery from the results bucket.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas import SCHEMA_VERSION

MAX_PING_DELAY_MS = 60_000


class CommandBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    command_id: str
    """Unique per logical request: the client's idempotency key when it sent one."""
    actor: str = ""
    """Who asked: a user id once accounts exist; empty for anonymous system calls."""
    issued_at_ms: int = 0
    schema_version: int = SCHEMA_VERSION


class Ping(CommandBase, frozen=True, kw_only=True, tag="ping"):
    """Proves the round trip gateway -> JetStream -> worker -> gateway; readiness uses it."""

    message: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    delay_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_PING_DELAY_MS)] = 0
    """Work time the worker spends before answering, for exercising heartbeats and crashes."""


Command = Ping
"""Every command; grows into a union as worker kinds learn more."""


def name_of(command: CommandBase) -> str:
    """The subject token of a command: its tag."""
    tag = type(command).__struct_config__.tag
    assert isinstance(tag, str)
    return tag
