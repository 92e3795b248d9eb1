"""Publishing events into the replayable log."""

from __future__ import annotations

from nats.js import JetStreamContext

from bus.codec import encode
from schemas import subjects
from schemas.events import EventBase, subject_of


class EventPublisher:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def publish(self, event: EventBase) -> None:
        # The event id is the message id: a republish after a crash is stored once.
        await self._js.publish(
            subject_of(event),
            encode(event),
            headers={subjects.HEADER_MSG_ID: event.event_id},
        )
