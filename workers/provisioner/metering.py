"""GPU time as usage events: whole minutes while an instance is billable, then the rest.

An instance is billable from when its provider accepted the create until it stopped being
billable (a destroy was asked, or it was found failed or taken back). The amount of a slice
is the difference of one running total, `price x elapsed` rounded down to a micro-unit, so
the slices of an instance add up exactly to its price times its billable time, whatever the
slicing. The event is published before the registry notes the progress: a crash between the
two repeats the event with the same id, which JetStream (and billing, by its unique key)
drops.
"""

from __future__ import annotations

import msgspec

from bus.events import EventPublisher
from schemas.events import GpuTimeUsed
from schemas.gpus import Instance
from workers.provisioner.registry import Registry, now_ms

SLICE_MS = 60_000
MS_PER_HOUR = 3_600_000


def charged(instance: Instance, until_ms: int) -> int:
    """Micro-units owed for the billable time up to `until_ms`."""
    elapsed = max(until_ms - instance.billable_from_ms, 0)
    return instance.price_per_hour_micros * elapsed // MS_PER_HOUR


def due_slices(instance: Instance, at_ms: int) -> list[GpuTimeUsed]:
    """The usage events owed now and not yet reported, oldest first."""
    if not instance.billable_from_ms:
        return []
    end = instance.ended_at_ms or 0
    slices: list[GpuTimeUsed] = []
    start = max(instance.metered_until_ms, instance.billable_from_ms)
    if end and start >= end:
        return []
    while True:
        stop = start + SLICE_MS
        final = False
        if end and stop >= end:
            stop, final = end, True
        elif stop > at_ms:
            break
        slices.append(
            GpuTimeUsed(
                event_id=f"gputime-{instance.id}-{start}",
                occurred_at_ms=stop,
                actor=instance.owner,
                instance_id=instance.id,
                owner=instance.owner,
                provider=str(instance.provider),
                reservation_id=instance.reservation_id,
                start_ms=start,
                end_ms=stop,
                price_per_hour_micros=instance.price_per_hour_micros,
                amount_micros=charged(instance, stop) - charged(instance, start),
                final=final,
            )
        )
        if final:
            break
        start = stop
    return slices


def fully_metered(instance: Instance) -> bool:
    return bool(instance.ended_at_ms) and instance.metered_until_ms >= instance.ended_at_ms


class Meter:
    def __init__(self, registry: Registry, events: EventPublisher) -> None:
        self._registry = registry
        self._events = events

    async def pass_once(self) -> int:
        """Report every slice that is due; returns how many events were published."""
        published = 0
        at = now_ms()
        for instance in list(self._registry.instances.mirror.values()):
            if not instance.billable_from_ms or fully_metered(instance):
                continue
            published += await self.meter(instance.id, at)
        return published

    async def meter(self, instance_id: str, at_ms: int) -> int:
        current = await self._registry.instance(instance_id)
        if current is None:
            return 0
        slices = due_slices(current, at_ms)
        for event in slices:
            await self._events.publish(event)
            until = event.end_ms

            def advance(instance: Instance, until: int = until) -> Instance | None:
                if instance.metered_until_ms >= until:
                    return None
                return msgspec.structs.replace(instance, metered_until_ms=until)

            await self._registry.amend(instance_id, advance)
        return len(slices)
