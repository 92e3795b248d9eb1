"""Reservations: several instances created together, all or nothing, held under a lease.

The reservation is recorded (with the ids of its instances) before any provider call, and its
ids derive from the command id. A command delivered again after a crash therefore finds the
reservation where the crash left it and carries on: instances already asked for are adopted
by label, none is created twice. A reservation that cannot be completed is failed and every
instance it made is destroyed; one whose lease ends, or that its owner releases, has its
instances destroyed too.

A reservation command whose caller left (only a caller without an idempotency key is
cancelled: nobody can come back for the answer) is rolled back at once (`abandon`): failed
with the reason "the caller left", every machine it made destroyed. A command cancelled
because its worker stops is not rolled back: another replica carries on from the records.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from schemas.commands import Reserve
from schemas.errors import (
    Cancelled,
    DeadlineExceeded,
    ErrorInfo,
    FailedPrecondition,
    GpuproxyError,
    Internal,
    NotFound,
    error_from_info,
)
from schemas.gpus import (
    RESERVATION_HELD,
    RESERVATION_TERMINAL,
    TERMINAL_STATES,
    Instance,
    InstanceState,
    Reservation,
    ReservationState,
)
from schemas.replies import ReservationView
from workers.provisioner import faults
from workers.provisioner.config import ProvisionerConfig
from workers.provisioner.fleet import Fleet
from workers.provisioner.instances import Launcher, instance_id_for, new_instance
from workers.provisioner.placement import pick
from workers.provisioner.registry import Registry, now_ms

log = logging.getLogger("gpuproxy.provisioner")

ROLLBACK_GRACE_SECONDS = 60
"""A pending reservation's deadline lies this far past its ready time: the command working on
it gives up first, the reconciler only when that command is gone."""


def reservation_id_for(command_id: str) -> str:
    digest = hashlib.blake2b(f"reservation/{command_id}".encode(), digest_size=10).hexdigest()
    return f"r-{digest}"


class Reservations:
    def __init__(
        self, registry: Registry, fleet: Fleet, launcher: Launcher, config: ProvisionerConfig
    ) -> None:
        self._registry = registry
        self._fleet = fleet
        self._launcher = launcher
        self._config = config

    async def view(self, reservation: Reservation) -> ReservationView:
        instances = [
            found
            for found in await asyncio.gather(
                *(self._registry.instance(i) for i in reservation.instance_ids)
            )
            if found is not None
        ]
        return ReservationView(reservation=reservation, instances=instances)

    async def reserve(self, command: Reserve) -> ReservationView:
        reservation_id = reservation_id_for(command.command_id)
        reservation = await self._registry.reservation(reservation_id)
        if reservation is None:
            reservation = await self._plan(reservation_id, command)
        if reservation.state is ReservationState.FAILED:
            raise error_from_info(reservation.error or Internal(reservation.reason).to_info())
        if reservation.state is not ReservationState.PENDING:
            return await self.view(reservation)
        return await self._complete(reservation, command)

    async def _plan(self, reservation_id: str, command: Reserve) -> Reservation:
        found = await self._fleet.search(command.query)
        strategy = command.strategy or self._config.placement
        chosen = pick(found.offers, command.count, strategy)
        if len(chosen) < command.count:
            missing = "; ".join(
                f"{p} did not answer: {why}" for p, why in found.unavailable.items()
            )
            raise FailedPrecondition(
                f"only {len(chosen)} machines match the filters, {command.count} asked for"
                + (f" ({missing})" if missing else ""),
                field="count",
            )
        at = now_ms()
        ids = tuple(instance_id_for(command.command_id, k) for k in range(command.count))
        planned = Reservation(
            id=reservation_id,
            owner=command.actor,
            count=command.count,
            state=ReservationState.PENDING,
            reason="creating instances",
            instance_ids=ids,
            query=command.query,
            spec=command.spec,
            strategy=strategy,
            lease_seconds=command.lease_seconds,
            created_at_ms=at,
            updated_at_ms=at,
            deadline_ms=at + (command.ready_seconds + ROLLBACK_GRACE_SECONDS) * 1000,
        )
        reservation, _ = await self._registry.add_reservation(planned)
        # Recorded before any provider call, so a crash from here on leaves a record that
        # the next delivery (or the reconciler) finishes or undoes.
        for instance_id, offer in zip(reservation.instance_ids, chosen, strict=True):
            await self._registry.add(
                new_instance(
                    instance_id, command.actor, offer, command.spec, reservation_id=reservation.id
                )
            )
        return reservation

    async def _complete(self, reservation: Reservation, command: Reserve) -> ReservationView:
        deadline = time.monotonic() + command.ready_seconds
        # An instance record may be missing if a crash came between the reservation and its
        # instances; it is made again from the plan's offers.
        missing = [i for i in reservation.instance_ids if await self._registry.instance(i) is None]
        if missing:
            await self._replan(reservation, command, missing)
        faults.checkpoint("reserve.before_create")
        launched = await asyncio.gather(
            *(self._launcher.launch(i) for i in reservation.instance_ids), return_exceptions=True
        )
        faults.checkpoint("reserve.after_create")
        for outcome in launched:
            if isinstance(outcome, BaseException):
                error = (
                    outcome
                    if isinstance(outcome, GpuproxyError)
                    else Internal(f"creating an instance failed ({type(outcome).__name__})")
                )
                return await self._fail(reservation, error)
        ready = await asyncio.gather(
            *(self._launcher.await_ready(i, deadline) for i in reservation.instance_ids)
        )
        not_ready = [i for i in ready if i.state is not InstanceState.RUNNING]
        if not_ready:
            return await self._fail(reservation, self._why_not_ready(not_ready, command))
        faults.checkpoint("reserve.before_active")
        at = now_ms()
        active = await self._registry.move_reservation(
            reservation.id,
            ReservationState.ACTIVE,
            only_from=frozenset({ReservationState.PENDING}),
            reason="every instance is ready",
            lease_expires_at_ms=at + reservation.lease_seconds * 1000,
        )
        if active is None:
            # Released or failed meanwhile (the owner, or the reconciler past the deadline).
            current = await self._registry.reservation(reservation.id)
            assert current is not None
            if current.state is ReservationState.FAILED:
                raise error_from_info(current.error or Internal(current.reason).to_info())
            return await self.view(current)
        view = await self.view(active)
        faults.checkpoint("reserve.before_reply")
        return view

    async def _replan(self, reservation: Reservation, command: Reserve, missing: list[str]) -> None:
        found = await self._fleet.search(command.query)
        chosen = pick(found.offers, len(missing), reservation.strategy)
        if len(chosen) < len(missing):
            raise FailedPrecondition(
                f"only {len(chosen)} machines match the filters now", field="count"
            )
        for instance_id, offer in zip(missing, chosen, strict=True):
            await self._registry.add(
                new_instance(
                    instance_id,
                    reservation.owner,
                    offer,
                    reservation.spec,
                    reservation_id=reservation.id,
                )
            )

    @staticmethod
    def _why_not_ready(instances: list[Instance], command: Reserve) -> GpuproxyError:
        failed = [i for i in instances if i.state in TERMINAL_STATES]
        if failed:
            first = failed[0]
            return FailedPrecondition(
                f"instance {first.id} at {first.provider} {first.state}: {first.reason}"
            )
        return DeadlineExceeded(
            f"{len(instances)} of {command.count} instances were not ready within "
            f"{command.ready_seconds}s"
        )

    async def _fail(self, reservation: Reservation, error: GpuproxyError) -> ReservationView:
        """Fail the reservation, destroy everything it made, and raise `error`."""
        failed = await self.fail(reservation.id, error.to_info())
        if failed is not None and failed.state is not ReservationState.FAILED:
            return await self.view(failed)
        raise error

    async def fail(self, reservation_id: str, error: ErrorInfo) -> Reservation | None:
        moved = await self._registry.move_reservation(
            reservation_id,
            ReservationState.FAILED,
            only_from=frozenset({ReservationState.PENDING}),
            reason=error.message,
            error=error,
        )
        current = moved or await self._registry.reservation(reservation_id)
        if current is None:
            return None
        if current.state is ReservationState.FAILED:
            await self._destroy_all(current, f"reservation {current.id} failed")
        return current

    async def abandon(self, reservation_id: str, reason: str) -> Reservation | None:
        """Undo what the command of a reservation made, now: its caller left and nobody will
        ever receive the reservation."""
        current = await self._registry.reservation(reservation_id)
        if current is None:
            return None  # cancelled before anything was recorded: nothing was made
        if current.state is ReservationState.PENDING:
            return await self.fail(reservation_id, Cancelled(reason).to_info())
        if current.state in RESERVATION_HELD:
            # Completed a moment before the cancel arrived, with nobody left to receive it.
            return await self.release(current, ending=ReservationState.RELEASED)
        return current

    async def release(self, reservation: Reservation, *, ending: ReservationState) -> Reservation:
        """End the reservation (`released` or `expired`) and destroy its instances."""
        if reservation.state in RESERVATION_TERMINAL:
            return reservation
        if reservation.state is not ReservationState.RELEASING:
            moved = await self._registry.move_reservation(
                reservation.id,
                ReservationState.RELEASING,
                reason="lease ended" if ending is ReservationState.EXPIRED else "released",
                ending=str(ending),
            )
            reservation = moved or await self._registry.reservation(reservation.id) or reservation
            if reservation.state is not ReservationState.RELEASING:
                return reservation
        return await self.finish_release(reservation)

    async def finish_release(self, reservation: Reservation) -> Reservation:
        reason = (
            "the reservation's lease ended"
            if reservation.ending == ReservationState.EXPIRED
            else "the reservation was released"
        )
        instances = await self._destroy_all(reservation, reason)
        if any(i.state not in TERMINAL_STATES for i in instances):
            return reservation  # a destroy is not confirmed yet; the reconciler goes on
        ending = ReservationState(reservation.ending or ReservationState.RELEASED)
        moved = await self._registry.move_reservation(
            reservation.id, ending, reason=reservation.reason
        )
        return moved or await self._registry.reservation(reservation.id) or reservation

    async def _destroy_all(self, reservation: Reservation, reason: str) -> list[Instance]:
        outcomes = await asyncio.gather(
            *(self._launcher.destroy(i, reason=reason) for i in reservation.instance_ids),
            return_exceptions=True,
        )
        instances = []
        for instance_id, outcome in zip(reservation.instance_ids, outcomes, strict=True):
            if isinstance(outcome, Instance):
                instances.append(outcome)
            elif isinstance(outcome, NotFound):
                continue  # never recorded: nothing was created for it
            else:
                log.warning(
                    "reservation %s: destroying %s failed (%s)",
                    reservation.id,
                    instance_id,
                    type(outcome).__name__,
                )
                current = await self._registry.instance(instance_id)
                if current is not None:
                    instances.append(current)
        return instances
