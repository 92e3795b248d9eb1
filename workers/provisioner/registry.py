"""The instance registry and the reservations, in JetStream KV, with their state machines.

Every move of an instance or a reservation is a revision-checked update that checks the move
against the state machine (`schemas.gpus.TRANSITIONS`), followed by its event. A move that is
no longer possible (another replica moved the record on first) is not made, and the caller
sees the record as it now is. Each state is entered at most once, so an event's id names the
record and the state, and a republished event is stored once.

A completed reservation follows its instances: when one of them ends (failed, taken back,
destroyed) the reservation becomes `degraded`, and `failed` when none is left, each with the
reason and its event. The move of the instance makes the reservation's at once; the
reconciler's rounds make it again should a process die in between.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.js import JetStreamContext

from bus.events import EventPublisher
from bus.records import Records
from bus.topology import declare_bucket
from schemas import topology
from schemas.errors import FailedPrecondition
from schemas.events import InstanceTransitioned, ReservationRenewed, ReservationTransitioned
from schemas.gpus import (
    RESERVATION_HELD,
    RESERVATION_TERMINAL,
    TERMINAL_STATES,
    TRANSITIONS,
    Instance,
    InstanceState,
    Reservation,
    ReservationState,
)
from workers.provisioner.config import ProvisionerConfig

log = logging.getLogger("gpuproxy.provisioner")

BILLABLE_END = frozenset(
    {
        InstanceState.STOPPING,
        InstanceState.TERMINATED,
        InstanceState.FAILED,
        InstanceState.PREEMPTED,
    }
)
"""Entering one of these ends the GPU time an instance is charged for."""

LOST = frozenset(
    {
        InstanceState.STOPPING,
        InstanceState.TERMINATED,
        InstanceState.FAILED,
        InstanceState.PREEMPTED,
    }
)
"""An instance of a completed reservation in one of these no longer serves it."""

RESERVATION_MOVES: dict[ReservationState, frozenset[ReservationState]] = {
    ReservationState.PENDING: frozenset(
        {ReservationState.ACTIVE, ReservationState.FAILED, ReservationState.RELEASING}
    ),
    ReservationState.ACTIVE: frozenset(
        {ReservationState.RELEASING, ReservationState.DEGRADED, ReservationState.FAILED}
    ),
    ReservationState.DEGRADED: frozenset({ReservationState.RELEASING, ReservationState.FAILED}),
    ReservationState.RELEASING: frozenset({ReservationState.RELEASED, ReservationState.EXPIRED}),
    ReservationState.RELEASED: frozenset(),
    ReservationState.EXPIRED: frozenset(),
    ReservationState.FAILED: frozenset(),
}


def now_ms() -> int:
    return int(time.time() * 1000)


def instance_event(instance: Instance, from_state: str) -> InstanceTransitioned:
    return InstanceTransitioned(
        event_id=f"instance-{instance.id}-{instance.state}",
        occurred_at_ms=instance.state_since_ms,
        actor=instance.owner,
        instance_id=instance.id,
        owner=instance.owner,
        provider=str(instance.provider),
        from_state=from_state,
        to_state=str(instance.state),
        reason=instance.reason,
        provider_id=instance.provider_id,
        reservation_id=instance.reservation_id,
        price_per_hour_micros=instance.price_per_hour_micros,
    )


def reservation_event(reservation: Reservation, from_state: str) -> ReservationTransitioned:
    return ReservationTransitioned(
        event_id=f"reservation-{reservation.id}-{reservation.state}",
        occurred_at_ms=reservation.updated_at_ms,
        actor=reservation.owner,
        reservation_id=reservation.id,
        owner=reservation.owner,
        from_state=from_state,
        to_state=str(reservation.state),
        reason=reservation.reason,
        instance_ids=reservation.instance_ids,
        lease_expires_at_ms=reservation.lease_expires_at_ms,
    )


class Registry:
    def __init__(
        self, js: JetStreamContext, events: EventPublisher, config: ProvisionerConfig, replicas: int
    ) -> None:
        self._js = js
        self._events = events
        self._replicas = replicas
        self._deadlines = {
            InstanceState.PENDING: config.pending_seconds,
            InstanceState.PROVISIONING: config.provisioning_seconds,
            InstanceState.STARTING: config.start_seconds,
            InstanceState.STOPPING: config.stop_seconds,
        }
        self._instances: Records[Instance] | None = None
        self._reservations: Records[Reservation] | None = None

    async def start(self) -> None:
        self._instances = Records(
            await declare_bucket(self._js, topology.instances_bucket(self._replicas)),
            Instance,
            topology.INSTANCES_BUCKET,
        )
        self._reservations = Records(
            await declare_bucket(self._js, topology.reservations_bucket(self._replicas)),
            Reservation,
            topology.RESERVATIONS_BUCKET,
        )
        await self._instances.start()
        await self._reservations.start()

    async def stop(self) -> None:
        for records in (self._instances, self._reservations):
            if records is not None:
                await records.stop()

    @property
    def instances(self) -> Records[Instance]:
        assert self._instances is not None, "Registry.start() was not awaited"
        return self._instances

    @property
    def reservations(self) -> Records[Reservation]:
        assert self._reservations is not None, "Registry.start() was not awaited"
        return self._reservations

    def deadline_of(self, state: InstanceState, at_ms: int) -> int:
        seconds = self._deadlines.get(state)
        return 0 if seconds is None else at_ms + int(seconds * 1000)

    # --- instances -------------------------------------------------------------------------

    async def instance(self, instance_id: str) -> Instance | None:
        found = await self.instances.get(instance_id)
        return None if found is None else found.value

    async def add(self, instance: Instance) -> tuple[Instance, bool]:
        """Record a new instance (pending); an id that exists gives back what is there."""
        at = now_ms()
        fresh = msgspec.structs.replace(
            instance,
            state=InstanceState.PENDING,
            created_at_ms=at,
            state_since_ms=at,
            deadline_ms=self.deadline_of(InstanceState.PENDING, at),
        )
        stored, created = await self.instances.create(instance.id, fresh)
        if created:
            await self._events.publish(instance_event(stored.value, ""))
        return stored.value, created

    async def move(
        self,
        instance_id: str,
        to: InstanceState,
        *,
        reason: str = "",
        only_from: frozenset[InstanceState] | None = None,
        **changes: Any,
    ) -> Instance | None:
        """Move the instance to `to` if the state machine allows it from where it is now
        (and it is in `only_from`, when given); returns the moved record, or None when the
        move was not made."""

        def mutate(current: Instance) -> Instance | None:
            if to not in TRANSITIONS[current.state]:
                return None
            if only_from is not None and current.state not in only_from:
                return None
            at = now_ms()
            fields: dict[str, Any] = {
                "state": to,
                "reason": reason,
                "state_since_ms": at,
                "deadline_ms": self.deadline_of(to, at),
                **changes,
            }
            if to is InstanceState.STARTING and not current.billable_from_ms:
                fields["billable_from_ms"] = at
                fields["metered_until_ms"] = at
            if to in BILLABLE_END and current.billable_from_ms and not current.ended_at_ms:
                fields["ended_at_ms"] = at
            return msgspec.structs.replace(current, **fields)

        changed = await self.instances.change(instance_id, mutate)
        if changed is None:
            return None
        after = changed.after
        await self._events.publish(instance_event(after, str(changed.before.state)))
        if after.reservation_id and after.state in LOST:
            try:
                await self.follow_instances(after.reservation_id)
            except Exception as exc:
                # The instance moved; its reservation follows at the reconciler's next round.
                log.warning(
                    "reservation %s not updated after %s (%s)",
                    after.reservation_id,
                    after.id,
                    type(exc).__name__,
                )
        return after

    async def amend(
        self, instance_id: str, mutate: Callable[[Instance], Instance | None]
    ) -> Instance | None:
        """A change that is not a move (an endpoint learned, metering progress)."""
        changed = await self.instances.change(instance_id, mutate)
        return None if changed is None else changed.after

    def live_instances(self) -> list[Instance]:
        return [i for i in self.instances.mirror.values() if i.state not in TERMINAL_STATES]

    # --- reservations ----------------------------------------------------------------------

    async def reservation(self, reservation_id: str) -> Reservation | None:
        found = await self.reservations.get(reservation_id)
        return None if found is None else found.value

    async def add_reservation(self, reservation: Reservation) -> tuple[Reservation, bool]:
        stored, created = await self.reservations.create(reservation.id, reservation)
        if created:
            await self._events.publish(reservation_event(stored.value, ""))
        return stored.value, created

    async def move_reservation(
        self,
        reservation_id: str,
        to: ReservationState,
        *,
        only_from: frozenset[ReservationState] | None = None,
        **changes: Any,
    ) -> Reservation | None:
        def mutate(current: Reservation) -> Reservation | None:
            if to not in RESERVATION_MOVES[current.state]:
                return None
            if only_from is not None and current.state not in only_from:
                return None
            return msgspec.structs.replace(
                current, state=to, updated_at_ms=now_ms(), deadline_ms=0, **changes
            )

        changed = await self.reservations.change(reservation_id, mutate)
        if changed is None:
            return None
        await self._events.publish(reservation_event(changed.after, str(changed.before.state)))
        return changed.after

    async def renew(self, reservation_id: str, lease_seconds: int) -> Reservation | None:
        def mutate(current: Reservation) -> Reservation | None:
            if current.state not in RESERVATION_HELD:
                return None
            at = now_ms()
            return msgspec.structs.replace(
                current,
                lease_seconds=lease_seconds,
                lease_expires_at_ms=at + lease_seconds * 1000,
                updated_at_ms=at,
            )

        changed = await self.reservations.change(reservation_id, mutate)
        if changed is None:
            return None
        after = changed.after
        await self._events.publish(
            ReservationRenewed(
                event_id=f"reservation-{after.id}-renewed-{after.lease_expires_at_ms}",
                occurred_at_ms=after.updated_at_ms,
                actor=after.owner,
                reservation_id=after.id,
                owner=after.owner,
                lease_expires_at_ms=after.lease_expires_at_ms,
            )
        )
        return after

    def lost_instances(self, reservation: Reservation) -> list[str]:
        """Ids of the reservation's instances that no longer serve, as the mirror sees them."""
        lost = []
        for instance_id in reservation.instance_ids:
            instance = self.instances.mirror.get(instance_id)
            if instance is None or instance.state in LOST:
                lost.append(instance_id)
        return lost

    async def follow_instances(self, reservation_id: str) -> Reservation | None:
        """Make a completed reservation `degraded` when some of its instances ended and
        `failed` when all did; returns the reservation as it is now."""
        reservation = await self.reservation(reservation_id)
        if reservation is None or reservation.state not in RESERVATION_HELD:
            return reservation
        lost: list[str] = []
        for instance_id in reservation.instance_ids:
            instance = await self.instance(instance_id)
            if instance is None:
                lost.append(f"{instance_id} is gone")
            elif instance.state in LOST:
                lost.append(f"{instance_id} {instance.state}: {instance.reason}")
        if not lost:
            return reservation
        total = len(reservation.instance_ids)
        if len(lost) == total:
            why = f"every instance ended ({'; '.join(lost)})"
            moved = await self.move_reservation(
                reservation_id,
                ReservationState.FAILED,
                reason=why,
                error=FailedPrecondition(why).to_info(),
            )
        else:
            why = f"{len(lost)} of {total} instances ended ({'; '.join(lost)})"
            if reservation.state is ReservationState.ACTIVE:
                moved = await self.move_reservation(
                    reservation_id, ReservationState.DEGRADED, reason=why
                )
            else:
                # Already degraded: one more ended. Its own event says so; the reason is
                # kept true without a second `degraded` (each state is entered once).
                changed = await self.reservations.change(
                    reservation_id,
                    lambda r: (
                        msgspec.structs.replace(r, reason=why, updated_at_ms=now_ms())
                        if r.state is ReservationState.DEGRADED and r.reason != why
                        else None
                    ),
                )
                moved = None if changed is None else changed.after
        return moved or await self.reservation(reservation_id)

    def open_reservations(self) -> list[Reservation]:
        return [r for r in self.reservations.mirror.values() if r.state not in RESERVATION_TERMINAL]

    async def forget_ended(self, before_ms: int) -> None:
        """Remove records that ended before `before_ms` (and, for instances, whose GPU time
        is fully reported)."""
        for instance in list(self.instances.mirror.values()):
            if (
                instance.state in TERMINAL_STATES
                and instance.state_since_ms < before_ms
                and instance.metered_until_ms >= instance.ended_at_ms
            ):
                await self.instances.delete(instance.id)
        for reservation in list(self.reservations.mirror.values()):
            if reservation.state in RESERVATION_TERMINAL and reservation.updated_at_ms < before_ms:
                await self.reservations.delete(reservation.id)

    async def sweep_tombstones(self, older_than_seconds: float) -> None:
        await self.instances.sweep_tombstones(older_than_seconds)
        await self.reservations.sweep_tombstones(older_than_seconds)

    async def republish_recent(self, window_ms: int) -> None:
        """Publish again the event of every state entered within `window_ms`: a process
        that died between a move and its event leaves no gap in the log. Within JetStream's
        dedupe window, a repeat of an event that was stored is dropped."""
        horizon = now_ms() - window_ms
        for instance in list(self.instances.mirror.values()):
            if instance.state_since_ms >= horizon:
                await self._events.publish(instance_event(instance, ""))
        for reservation in list(self.reservations.mirror.values()):
            if reservation.updated_at_ms >= horizon and reservation.state is not (
                ReservationState.ACTIVE
            ):
                await self._events.publish(reservation_event(reservation, ""))
