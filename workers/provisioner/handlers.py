"""The provisioner's command handlers: who may see and touch what, then the work.

An instance or reservation belongs to the account that made it. Another account gets
PERMISSION_DENIED for it, unless the command comes from an admin (`actor_admin`).

When the caller leaves, reads (search, find, list, get) stop; commands that change something
(create, batch, destroy, renew, release) finish, so their effect is never half made and a
retry with the same key gets the answer; a reservation is rolled back at once (see
`reservations`). A worker that stops cancels every one of them: the command is delivered to
another replica, which carries on from the records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from bus.runtime import Context, Handler
from bus.tasks import cancel_and_wait
from schemas.commands import (
    CommandBase,
    CreateBatch,
    CreateInstance,
    DestroyInstance,
    FindGpu,
    GetReservation,
    ListInstances,
    ListReservations,
    ReleaseReservation,
    RenewReservation,
    Reserve,
    SearchOffers,
    ShareInstance,
    is_keyed,
)
from schemas.errors import (
    FailedPrecondition,
    GpuproxyError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from schemas.gpus import (
    RESERVATION_TERMINAL,
    TERMINAL_STATES,
    Instance,
    InstanceState,
    Reservation,
    ReservationState,
)
from schemas.replies import (
    BatchCreated,
    BatchFailure,
    GpuFound,
    InstanceList,
    InstanceView,
    OfferList,
    Reply,
    ReservationList,
    ReservationView,
)
from workers.provisioner.cancellation import despite_caller_leaving, to_the_end
from workers.provisioner.fleet import Fleet
from workers.provisioner.instances import Launcher, instance_id_for, new_instance
from workers.provisioner.placement import pick
from workers.provisioner.registry import Registry
from workers.provisioner.reservations import Reservations, reservation_id_for

log = logging.getLogger("gpuproxy.provisioner")


def _may_see(owner: str, command: CommandBase) -> bool:
    return command.actor_admin or (bool(command.actor) and owner == command.actor)


def _check_owner(owner: str, command: CommandBase, what: str, field: str) -> None:
    if not _may_see(owner, command):
        raise PermissionDenied(f"{what} belongs to another account", field=field)


def _check_list_owner(command: ListInstances | ListReservations) -> None:
    if command.actor_admin:
        return
    if not command.owner or command.owner != command.actor:
        raise PermissionDenied("only an admin may list another account's", field="user_id")


def _finishing(handler: Handler) -> Handler:
    """The handler, run to its end when its caller leaves (not when the worker stops)."""

    async def finish(command: Any, ctx: Context) -> Reply:
        return await despite_caller_leaving(ctx, handler(command, ctx))

    return finish


class Provisioning:
    def __init__(
        self,
        registry: Registry,
        fleet: Fleet,
        launcher: Launcher,
        reservations: Reservations,
        *,
        start_seconds: float,
    ) -> None:
        self._registry = registry
        self._fleet = fleet
        self._launcher = launcher
        self._reservations = reservations
        self._start_seconds = start_seconds
        self._followers: set[asyncio.Task[Any]] = set()

    def handlers(self) -> Mapping[type[CommandBase], Handler]:
        return {
            SearchOffers: self.search,
            FindGpu: self.find,
            CreateInstance: _finishing(self.create),
            CreateBatch: _finishing(self.batch),
            DestroyInstance: _finishing(self.destroy),
            ListInstances: self.list_instances,
            Reserve: self.reserve,
            GetReservation: self.get_reservation,
            ListReservations: self.list_reservations,
            RenewReservation: _finishing(self.renew),
            ReleaseReservation: _finishing(self.release),
            ShareInstance: _finishing(self.share),
        }

    async def stop(self) -> None:
        await cancel_and_wait(list(self._followers))

    def _follow(self, instance: Instance) -> None:
        """Watch a starting instance to `running` in the background; the reconciler does the
        same each round, so a watch lost with this process is only a slower one."""
        if instance.state is not InstanceState.STARTING:
            return
        deadline = time.monotonic() + self._start_seconds

        async def follow() -> None:
            try:
                await self._launcher.await_ready(instance.id, deadline)
            except GpuproxyError as exc:
                log.info("instance %s: readiness watch ended (%s)", instance.id, exc.message)

        task = asyncio.create_task(follow(), name=f"follow-{instance.id}")
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    async def share(self, command: ShareInstance, ctx: Context) -> InstanceView:
        if not command.actor_admin:
            raise PermissionDenied("only an admin shares an instance", field="instance_id")
        found = await self._registry.instance(command.instance_id)
        if found is None:
            raise NotFound(f"instance {command.instance_id} does not exist", field="instance_id")
        if found.state in TERMINAL_STATES:
            raise FailedPrecondition(
                f"instance {command.instance_id} is {found.state}", field="instance_id"
            )
        changed = await self._registry.amend(
            command.instance_id, lambda i: msgspec.structs.replace(i, shared=command.shared)
        )
        shared = "shared with every account" if command.shared else "its owner's alone"
        return InstanceView(instance=changed or found, message=f"the instance is {shared}")

    # --- offers ------------------------------------------------------------------------------

    async def search(self, command: SearchOffers, ctx: Context) -> OfferList:
        return await self._fleet.search(command.query)

    async def find(self, command: FindGpu, ctx: Context) -> GpuFound:
        instance = (
            await self._registry.instance(command.id) if command.id.startswith("i-") else None
        )
        if instance is not None and instance.provider == command.provider:
            _check_owner(instance.owner, command, f"instance {command.id}", "instance_id")
            return GpuFound(instance=instance)
        offer = await self._fleet.offer(command.provider, command.id)
        if offer is None:
            raise NotFound(
                f"{command.provider} has no offer and you have no instance {command.id}",
                field="instance_id",
            )
        return GpuFound(offer=offer)

    # --- instances ---------------------------------------------------------------------------

    async def create(self, command: CreateInstance, ctx: Context) -> InstanceView:
        instance_id = instance_id_for(command.command_id, 0)
        if await self._registry.instance(instance_id) is None:
            offer = await self._launcher.offer(command.provider, command.offer_id)
            await self._registry.add(new_instance(instance_id, command.actor, offer, command.spec))
        instance = await self._launcher.launch(instance_id)
        self._follow(instance)
        return InstanceView(instance=instance, message=instance.reason)

    async def batch(self, command: CreateBatch, ctx: Context) -> BatchCreated:
        if not any(command.counts.values()):
            raise InvalidArgument("ask for at least one instance", field="counts")
        failures: list[BatchFailure] = []
        ids: list[str] = []
        index = 0
        for provider, count in sorted(command.counts.items()):
            if not count:
                continue
            wanted = [instance_id_for(command.command_id, index + k) for k in range(count)]
            index += count
            missing = [i for i in wanted if await self._registry.instance(i) is None]
            planned = [i for i in wanted if i not in missing]
            if missing:
                try:
                    query = msgspec.structs.replace(command.query, providers=(provider,))
                    found = await self._fleet.search(query)
                except GpuproxyError as exc:
                    failures.extend(
                        BatchFailure(provider=provider, error=exc.to_info()) for _ in missing
                    )
                    ids.extend(planned)
                    continue
                chosen = pick(found.offers, len(missing), "cheapest")
                for instance_id, offer in zip(missing, chosen, strict=False):
                    await self._registry.add(
                        new_instance(instance_id, command.actor, offer, command.spec)
                    )
                    planned.append(instance_id)
                short = len(missing) - len(chosen)
                failures.extend(
                    BatchFailure(
                        provider=provider,
                        error=FailedPrecondition(
                            f"{provider} has fewer matching machines than asked for",
                            field="counts",
                        ).to_info(),
                    )
                    for _ in range(short)
                )
            ids.extend(planned)
        outcomes = await asyncio.gather(
            *(self._launcher.launch(i) for i in ids), return_exceptions=True
        )
        instances: list[Instance] = []
        for instance_id, outcome in zip(ids, outcomes, strict=True):
            if isinstance(outcome, Instance):
                if outcome.state is InstanceState.FAILED:
                    failures.append(
                        BatchFailure(
                            provider=outcome.provider,
                            error=FailedPrecondition(outcome.reason).to_info(),
                        )
                    )
                instances.append(outcome)
                self._follow(outcome)
                continue
            error = (
                outcome
                if isinstance(outcome, GpuproxyError)
                else Internal(f"creating an instance failed ({type(outcome).__name__})")
            )
            current = await self._registry.instance(instance_id)
            if current is not None:
                instances.append(current)
                failures.append(BatchFailure(provider=current.provider, error=error.to_info()))
        return BatchCreated(instances=instances, failures=failures)

    async def destroy(self, command: DestroyInstance, ctx: Context) -> InstanceView:
        instance = await self._registry.instance(command.instance_id)
        if instance is None or (command.provider and instance.provider != command.provider):
            raise NotFound(f"instance {command.instance_id} does not exist", field="instance_id")
        _check_owner(instance.owner, command, f"instance {instance.id}", "instance_id")
        if instance.state in TERMINAL_STATES:
            return InstanceView(instance=instance, message=f"already {instance.state}")
        done = await self._launcher.destroy(instance.id, reason="destroyed by its owner")
        message = (
            "destroyed"
            if done.state is InstanceState.TERMINATED
            else "destroy asked; the provider has not confirmed it yet"
        )
        return InstanceView(instance=done, message=message)

    async def list_instances(self, command: ListInstances, ctx: Context) -> InstanceList:
        _check_list_owner(command)
        found = [
            i
            for i in self._registry.instances.mirror.values()
            if (not command.owner or i.owner == command.owner)
            and (command.include_ended or i.state not in TERMINAL_STATES)
        ]
        found.sort(key=lambda i: (-i.created_at_ms, i.id))
        return InstanceList(instances=found)

    # --- reservations ------------------------------------------------------------------------

    async def reserve(self, command: Reserve, ctx: Context) -> ReservationView:
        if is_keyed(command.command_id):
            # The caller may come back with its key: the retry gets the reservation.
            return await despite_caller_leaving(ctx, self._reservations.reserve(command))
        try:
            return await self._reservations.reserve(command)
        except asyncio.CancelledError:
            if ctx.caller_left:
                # Nobody can come back for it: its machines must not bill until the
                # reconciler's deadline.
                await to_the_end(
                    self._reservations.abandon(
                        reservation_id_for(command.command_id), "the caller left"
                    )
                )
            raise

    async def _owned_reservation(self, command: CommandBase, reservation_id: str) -> Reservation:
        reservation = await self._registry.reservation(reservation_id)
        if reservation is None:
            raise NotFound(f"reservation {reservation_id} does not exist", field="reservation_id")
        _check_owner(reservation.owner, command, f"reservation {reservation_id}", "reservation_id")
        return reservation

    async def get_reservation(self, command: GetReservation, ctx: Context) -> ReservationView:
        reservation = await self._owned_reservation(command, command.reservation_id)
        return await self._reservations.view(reservation)

    async def list_reservations(self, command: ListReservations, ctx: Context) -> ReservationList:
        _check_list_owner(command)
        found = [
            r
            for r in self._registry.reservations.mirror.values()
            if (not command.owner or r.owner == command.owner)
            and (command.include_ended or r.state not in RESERVATION_TERMINAL)
        ]
        found.sort(key=lambda r: (-r.created_at_ms, r.id))
        return ReservationList(reservations=found)

    async def renew(self, command: RenewReservation, ctx: Context) -> ReservationView:
        reservation = await self._owned_reservation(command, command.reservation_id)
        renewed = await self._registry.renew(reservation.id, command.lease_seconds)
        if renewed is None:
            current = await self._registry.reservation(reservation.id) or reservation
            raise FailedPrecondition(
                f"reservation {reservation.id} is {current.state}; "
                "only an active or degraded one renews",
                field="reservation_id",
            )
        return await self._reservations.view(renewed)

    async def release(self, command: ReleaseReservation, ctx: Context) -> ReservationView:
        reservation = await self._owned_reservation(command, command.reservation_id)
        if reservation.state is ReservationState.FAILED:
            return await self._reservations.view(reservation)
        released = await self._reservations.release(reservation, ending=ReservationState.RELEASED)
        return await self._reservations.view(released)
