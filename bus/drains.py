"""Deliveries a stopping worker handed back, counted apart from the command's budget.

JetStream counts every delivery of a message, whether its worker failed it or merely stopped
before running it; a command caught by a few rolling restarts would be dead-lettered though
it never failed once. So the consumer redelivers without limit, a draining worker notes each
hand-back here first, and the budget a worker checks is deliveries minus hand-backs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re

from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger("gpuproxy.worker")

_KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")


class Drains:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def count(self, msg_id: str) -> int:
        """How many times the delivery of `msg_id` was handed back."""
        try:
            entry = await self._kv.get(_key(msg_id))
        except KeyNotFoundError:
            return 0
        except (NatsError, TimeoutError) as exc:
            # Unknown drains count as failures: at worst a command ends a little early.
            log.warning("drains of %s unreadable (%s)", msg_id, type(exc).__name__)
            return 0
        raw = (entry.value or b"0").decode()
        return int(raw) if raw.isdigit() else 0

    async def note(self, msg_id: str) -> None:
        """One more hand-back. Only the replica holding a delivery hands it back, so a
        plain read and write cannot race with another writer of the same key."""
        with contextlib.suppress(NatsError, TimeoutError):
            await self._kv.put(_key(msg_id), str(await self.count(msg_id) + 1).encode())


def _key(msg_id: str) -> str:
    # KV keys allow letters, digits and - / _ = . only; message ids are made of those.
    return msg_id if _KV_KEY.fullmatch(msg_id) else hashlib.sha256(msg_id.encode()).hexdigest()
