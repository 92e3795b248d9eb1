"""Checks on what a client sends, shared by both front doors; each names the field at fault."""

from __future__ import annotations

import hashlib

from nats.nuid import NUID

from schemas import subjects
from schemas.commands import KEYED_PREFIX, MAX_PING_DELAY_MS
from schemas.errors import InvalidArgument
from schemas.subjects import WorkerKind

_ids = NUID()
"""nats-py's unique ids: random per process, then sequential; a fraction of uuid4's cost."""


def command_id(idempotency_key: str | None, *, field: str, owner: str) -> str:
    """A fresh id, or one derived from the client's idempotency key and the caller.

    Keys are scoped to their caller: two users who pick the same key get different
    commands, so nobody is ever answered with another account's result.
    """
    if not idempotency_key:
        return _ids.next().decode()
    if not subjects.TOKEN.fullmatch(idempotency_key):
        raise InvalidArgument(
            "must be 1 to 64 characters of letters, digits, '-' or '_'", field=field
        )
    scoped = hashlib.blake2b(f"{owner}\x00{idempotency_key}".encode(), digest_size=16)
    return f"{KEYED_PREFIX}{scoped.hexdigest()}"


def worker_kind(value: str, *, field: str = "worker_kind") -> WorkerKind:
    if not value:
        return WorkerKind.PROVISIONER
    try:
        return WorkerKind(value)
    except ValueError:
        kinds = ", ".join(k.value for k in WorkerKind)
        raise InvalidArgument(f"unknown worker kind; one of {kinds}", field=field) from None


def ping_delay(value: int, *, field: str = "delay_ms") -> int:
    if not 0 <= value <= MAX_PING_DELAY_MS:
        raise InvalidArgument(f"must be between 0 and {MAX_PING_DELAY_MS}", field=field)
    return value


def ping_message(value: str, *, field: str = "message") -> str:
    if len(value) > 1024:
        raise InvalidArgument("must be at most 1024 characters", field=field)
    return value
