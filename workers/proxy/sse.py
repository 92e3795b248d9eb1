"""Server-sent events read from an upstream as its bytes arrive.

The proxy passes an upstream's events on as they are, but must look inside each: to count
tokens, to find the usage, to notice the end. Bytes arrive cut anywhere, so events are
assembled across reads; only whole events are handed on.
"""

from __future__ import annotations

import msgspec

DONE = b"[DONE]"


class Event(msgspec.Struct, frozen=True):
    raw: bytes
    """The event as received, blank-line terminator included."""
    name: str
    """The `event:` field; empty when the event has none (chat and completions)."""
    data: bytes
    """The `data:` lines joined by newlines, as the SSE rules say."""


class EventReader:
    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[Event]:
        """The events that `chunk` completes, in order."""
        buffer = self._pending + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events: list[Event] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            raw = buffer[start : end + 2]
            start = end + 2
            event = _parse(raw)
            if event is not None:
                events.append(event)
        self._pending = buffer[start:]
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not finished yet (left when a stream is cut)."""
        return self._pending


def _parse(raw: bytes) -> Event | None:
    name = ""
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode(errors="replace")
    if not data and not name:
        return None  # a comment or keep-alive line: nothing to pass on
    return Event(raw=raw, name=name, data=b"\n".join(data))
