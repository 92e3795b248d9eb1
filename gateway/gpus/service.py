"""GPU calls as both front doors make them: commands to the provisioner, on the caller's
behalf. The provisioner checks ownership against `actor`; the gateway only says whether the
actor is an admin (who may see and act on every account's instances). Whose things a list
shows is resolved before it gets here (`AccountService.acting_for`)."""

from __future__ import annotations

from typing import Any, TypeVar

from bus.caller import CommandCaller
from gateway import validation
from gateway.auth.principal import Principal
from gateway.gpus.preferences import PreferenceStore, with_defaults
from schemas.commands import (
    DEFAULT_LEASE_SECONDS,
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
)
from schemas.errors import Internal
from schemas.gpus import Instance, LaunchSpec, OfferQuery, ProviderName
from schemas.replies import (
    BatchCreated,
    GpuFound,
    InstanceList,
    InstanceView,
    OfferList,
    ReservationList,
    ReservationView,
)
from schemas.subjects import WorkerKind

R = TypeVar("R")

RESERVE_MARGIN_SECONDS = 60.0
"""A reservation's answer may take its ready time plus the provider calls around it."""


class GpuService:
    def __init__(
        self, caller: CommandCaller, preferences: PreferenceStore, *, timeout: float
    ) -> None:
        self._caller = caller
        self._preferences = preferences
        self._timeout = timeout

    async def _call(
        self, command: CommandBase, expected: type[R], *, timeout: float | None = None
    ) -> R:
        reply: Any = await self._caller.call(
            WorkerKind.PROVISIONER, command, timeout=timeout or self._timeout
        )
        if not isinstance(reply, expected):
            raise Internal(f"the provisioner answered {type(reply).__name__}")
        return reply

    @staticmethod
    def _who(caller: Principal, key: str | None, field: str) -> dict[str, Any]:
        return {
            "command_id": validation.command_id(key, field=field, owner=caller.user_id),
            "actor": caller.user_id,
            "actor_admin": caller.is_admin,
        }

    async def search(self, caller: Principal, query: OfferQuery) -> OfferList:
        return await self._call(SearchOffers(**self._who(caller, None, ""), query=query), OfferList)

    async def find(self, caller: Principal, provider: ProviderName, id: str) -> GpuFound:
        command = FindGpu(**self._who(caller, None, ""), provider=provider, id=id)
        return await self._call(command, GpuFound)

    async def create(
        self,
        caller: Principal,
        provider: ProviderName,
        offer_id: str,
        spec: LaunchSpec,
        idempotency_key: str | None,
        key_field: str,
    ) -> InstanceView:
        command = CreateInstance(
            **self._who(caller, idempotency_key, key_field),
            provider=provider,
            offer_id=offer_id,
            spec=spec,
        )
        return await self._call(command, InstanceView)

    async def batch(
        self,
        caller: Principal,
        counts: dict[ProviderName, int],
        query: OfferQuery,
        spec: LaunchSpec,
        idempotency_key: str | None,
        key_field: str,
    ) -> BatchCreated:
        command = CreateBatch(
            **self._who(caller, idempotency_key, key_field), counts=counts, query=query, spec=spec
        )
        return await self._call(command, BatchCreated)

    async def destroy(
        self,
        caller: Principal,
        provider: ProviderName | None,
        instance_id: str,
        idempotency_key: str | None,
        key_field: str,
    ) -> InstanceView:
        command = DestroyInstance(
            **self._who(caller, idempotency_key, key_field),
            provider=provider,
            instance_id=instance_id,
        )
        return await self._call(command, InstanceView)

    async def share(self, caller: Principal, instance_id: str, shared: bool) -> InstanceView:
        command = ShareInstance(
            **self._who(caller, None, ""), instance_id=instance_id, shared=shared
        )
        return await self._call(command, InstanceView)

    async def instances(
        self, caller: Principal, owner: str, *, include_ended: bool
    ) -> InstanceList:
        """The instances of `owner` ("" for every account's, admins only)."""
        command = ListInstances(
            **self._who(caller, None, ""), owner=owner, include_ended=include_ended
        )
        return await self._call(command, InstanceList)

    async def reserve(
        self,
        caller: Principal,
        *,
        count: int,
        query: OfferQuery,
        spec: LaunchSpec,
        strategy: str,
        lease_seconds: int | None,
        ready_seconds: int,
        idempotency_key: str | None,
        key_field: str,
    ) -> ReservationView:
        preferences = await self._preferences.of(caller.user_id)
        query, spec = with_defaults(query, spec, preferences)
        command = Reserve(
            **self._who(caller, idempotency_key, key_field),
            count=count,
            query=query,
            spec=spec,
            strategy=strategy or preferences.strategy,
            lease_seconds=lease_seconds or preferences.lease_seconds or DEFAULT_LEASE_SECONDS,
            ready_seconds=ready_seconds,
        )
        return await self._call(
            command, ReservationView, timeout=ready_seconds + RESERVE_MARGIN_SECONDS
        )

    async def reservation(self, caller: Principal, reservation_id: str) -> ReservationView:
        command = GetReservation(**self._who(caller, None, ""), reservation_id=reservation_id)
        return await self._call(command, ReservationView)

    async def reservations(
        self, caller: Principal, owner: str, *, include_ended: bool
    ) -> list[ReservationView]:
        """The reservations of `owner` ("" for every account's, admins only), each with its
        instances as the single reservation's answer carries them."""
        command = ListReservations(
            **self._who(caller, None, ""), owner=owner, include_ended=include_ended
        )
        listed = await self._call(command, ReservationList)
        if not any(r.instance_ids for r in listed.reservations):
            return [ReservationView(reservation=r) for r in listed.reservations]
        # Asked after the reservations, so every instance they name is already recorded;
        # ended ones too, since a reservation shows its failed or terminated instances.
        found = await self.instances(caller, owner, include_ended=True)
        by_id: dict[str, Instance] = {i.id: i for i in found.instances}
        return [
            ReservationView(
                reservation=r,
                instances=[by_id[i] for i in r.instance_ids if i in by_id],
            )
            for r in listed.reservations
        ]

    async def renew(
        self, caller: Principal, reservation_id: str, lease_seconds: int
    ) -> ReservationView:
        command = RenewReservation(
            **self._who(caller, None, ""),
            reservation_id=reservation_id,
            lease_seconds=lease_seconds,
        )
        return await self._call(command, ReservationView)

    async def release(self, caller: Principal, reservation_id: str) -> ReservationView:
        command = ReleaseReservation(**self._who(caller, None, ""), reservation_id=reservation_id)
        return await self._call(command, ReservationView)
