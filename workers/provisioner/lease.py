"""One replica at a time for a singleton job, elected through a KV lease.

The holder renews its key well within the bucket's age limit; a holder that dies stops
renewing, its key ages out, and the next replica to ask takes over. Two holders at once
can only happen around a takeover, and everything the reconciler does is a revision-checked
update or an idempotent provider call, so an overlap costs calls, never correctness.
"""

from __future__ import annotations

import contextlib
import logging

from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger("gpuproxy.provisioner")


class Lease:
    def __init__(self, kv: KeyValue, name: str, holder: str) -> None:
        self._kv = kv
        self._name = name
        self._holder = holder.encode()
        self.held = False

    async def claim(self) -> bool:
        """Take or renew the lease; True while this replica holds it."""
        try:
            try:
                entry = await self._kv.get(self._name)
            except NotFoundError:
                await self._kv.create(self._name, self._holder)
                self._note(True)
                return True
            if entry.value != self._holder or entry.revision is None:
                self._note(False)
                return False
            await self._kv.update(self._name, self._holder, last=entry.revision)
        except KeyWrongLastSequenceError:
            self._note(False)
            return False
        self._note(True)
        return True

    def _note(self, held: bool) -> None:
        if held != self.held:
            log.info("%s: %s the lease", self._holder.decode(), "took" if held else "lost")
        self.held = held

    async def release(self) -> None:
        if not self.held:
            return
        with contextlib.suppress(Exception):
            entry = await self._kv.get(self._name)
            if entry.value == self._holder and entry.revision is not None:
                await self._kv.delete(self._name, last=entry.revision)
        self.held = False
