"""The reconciler: the registry and every provider's own list, made to agree.

One replica at a time runs it (a KV lease elects it). Each round, per provider:
- an instance stuck past its state's deadline is finished (adopted when its machine turns
  up) or failed, and its machine destroyed;
- a starting or running instance is compared with its machine (exited, taken back, gone,
  ready);
- a stopping instance has its destroy retried until the provider confirms it;
- a machine that carries gpuproxy's label but that the registry does not own (no record, or
  a record that has ended) is destroyed: whatever point a create crashed at, no machine leaks.
Then reservations: an ended lease is released, a completed one whose instances ended is
made degraded or failed, a pending reservation past its deadline (its command is gone) is
undone, a releasing one is driven to its end. A second loop turns GPU time into usage events.

A replica that starts compares every starting and running instance with its machine before
it takes any command (`check_machines`): after a restart (machines die with their host, or
were destroyed meanwhile), nobody is told an instance runs whose machine is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from bus.tasks import cancel_and_wait
from schemas.errors import DeadlineExceeded, GpuproxyError
from schemas.gpus import (
    RESERVATION_HELD,
    TERMINAL_STATES,
    Instance,
    InstanceState,
    ReservationState,
    instance_of_label,
)
from workers.provisioner.config import ProvisionerConfig
from workers.provisioner.fleet import Fleet
from workers.provisioner.instances import Launcher
from workers.provisioner.lease import Lease
from workers.provisioner.metering import Meter
from workers.provisioner.providers.base import Machine, Provider
from workers.provisioner.registry import Registry, now_ms
from workers.provisioner.reservations import Reservations

log = logging.getLogger("gpuproxy.provisioner")

RETENTION_MS = 7 * 24 * 3600 * 1000
TOMBSTONE_SWEEP_SECONDS = 3600.0
"""How often the delete markers of forgotten records are swept from the registry's buckets."""
TOMBSTONE_AGE_SECONDS = 3600.0
"""A delete marker's age before it goes: every watcher has long seen the delete by then."""
"""Ended instances and reservations stay listable this long, then leave the registry; the
event log keeps their whole history."""

EVENT_HEAL_WINDOW_MS = 5 * 60 * 1000
"""Events of states entered this recently are published again each round (JetStream drops
the repeats within its ten-minute dedupe window): a crash between a move and its event
leaves no gap in the log."""

CHECKS_AT_ONCE = 8
"""Instances compared with their machines at the same time when a replica starts."""


class Reconciler:
    def __init__(
        self,
        registry: Registry,
        fleet: Fleet,
        launcher: Launcher,
        reservations: Reservations,
        meter: Meter,
        lease: Lease,
        config: ProvisionerConfig,
    ) -> None:
        self._registry = registry
        self._fleet = fleet
        self._launcher = launcher
        self._reservations = reservations
        self._meter = meter
        self._lease = lease
        self._config = config
        self._tasks: list[asyncio.Task[None]] = []
        self.rounds = 0
        self._next_sweep = 0.0

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._hold_lease(), name="reconciler-lease"),
            asyncio.create_task(
                self._every(self._config.reconcile_seconds, self.round), name="reconciler"
            ),
            asyncio.create_task(
                self._every(self._config.meter_seconds, self._meter.pass_once), name="meter"
            ),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        # Leaving the lease early only saves the next leader a wait; never hold a stop on it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self._lease.release()

    async def _hold_lease(self) -> None:
        period = max(self._config.lease_seconds / 3, 0.2)
        while True:
            try:
                await self._lease.claim()
            except Exception as exc:
                log.warning("reconciler lease not renewed (%s)", type(exc).__name__)
                self._lease.held = False
            await asyncio.sleep(period)

    async def _every(self, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            if not self._lease.held:
                continue
            try:
                await job()
            except Exception as exc:
                log.exception("reconciler job failed (%s)", type(exc).__name__)

    async def check_machines(self, seconds: float) -> None:
        """Compare each starting or running instance with its machine, within `seconds`:
        those whose machine is gone, exited or taken back are ended (and their reservations
        follow) before this replica answers anyone."""
        live = [
            i
            for i in self._registry.live_instances()
            if i.state in (InstanceState.STARTING, InstanceState.RUNNING)
        ]
        # A few at a time: a marketplace limits the rate of its API calls.
        gate = asyncio.Semaphore(CHECKS_AT_ONCE)

        async def check(instance: Instance) -> None:
            async with gate:
                try:
                    await self._launcher.observe(instance)
                except GpuproxyError as exc:
                    log.info("instance %s not checked (%s)", instance.id, exc.message)

        try:
            async with asyncio.timeout(seconds):
                await asyncio.gather(*(check(i) for i in live))
        except TimeoutError:
            log.warning("instances not all checked within %gs; the reconciler goes on", seconds)

    async def round(self) -> None:
        for provider in self._fleet.providers():
            await self._reconcile_provider(provider)
        await self._reconcile_orphan_records()
        await self._reconcile_reservations()
        await self._registry.republish_recent(EVENT_HEAL_WINDOW_MS)
        await self._registry.forget_ended(now_ms() - RETENTION_MS)
        if time.monotonic() >= self._next_sweep:
            await self._registry.sweep_tombstones(TOMBSTONE_AGE_SECONDS)
            self._next_sweep = time.monotonic() + TOMBSTONE_SWEEP_SECONDS
        self.rounds += 1

    async def _reconcile_provider(self, provider: Provider) -> None:
        listed_at = now_ms()
        try:
            machines = await provider.list()
        except GpuproxyError as exc:
            log.info("reconciler: %s did not list its machines (%s)", provider.name, exc.message)
            return
        ours: dict[str, Machine] = {}
        for machine in machines:
            instance_id = instance_of_label(machine.label)
            if instance_id is not None:
                ours[instance_id] = machine
        for instance in self._registry.live_instances():
            if instance.provider != provider.name:
                continue
            try:
                await self._reconcile_instance(instance, ours.get(instance.id))
            except GpuproxyError as exc:
                log.info("reconciler: instance %s not settled (%s)", instance.id, exc.message)
        for instance_id, machine in ours.items():
            await self._destroy_if_orphan(provider, instance_id, machine, listed_at)

    async def _reconcile_instance(self, instance: Instance, machine: Machine | None) -> None:
        current = await self._registry.instance(instance.id)
        if current is None or current.state in TERMINAL_STATES:
            return
        overdue = bool(current.deadline_ms) and now_ms() > current.deadline_ms
        match current.state:
            case InstanceState.PENDING | InstanceState.PROVISIONING:
                if machine is not None:
                    # The create got through but its answer was never written: adopt it.
                    await self._registry.move(
                        current.id,
                        InstanceState.STARTING,
                        reason="found at the provider",
                        only_from=frozenset({current.state}),
                        provider_id=machine.provider_id,
                    )
                elif overdue:
                    await self._registry.move(
                        current.id,
                        InstanceState.FAILED,
                        reason=f"the provider never created it within "
                        f"{(current.deadline_ms - current.state_since_ms) / 1000:g}s",
                        only_from=frozenset({current.state}),
                    )
            case InstanceState.STARTING | InstanceState.RUNNING:
                await self._launcher.observe(current)
            case InstanceState.STOPPING:
                await self._launcher.destroy(current.id, reason=current.reason)

    async def _destroy_if_orphan(
        self, provider: Provider, instance_id: str, machine: Machine, listed_at: int
    ) -> None:
        record = await self._registry.instance(instance_id)
        if record is not None and record.state_since_ms >= listed_at:
            # It moved after the list was taken: whoever moved it owns the machine's end,
            # and the next round sees the machine as it is then.
            return
        if record is None:
            why = "no record owns it"
        elif record.provider_id and record.provider_id != machine.provider_id:
            why = "a second machine for one instance"
        elif record.state in TERMINAL_STATES:
            why = f"its instance is {record.state}"
        else:
            return
        log.warning(
            "reconciler: destroying %s machine %s (%s)", provider.name, machine.provider_id, why
        )
        try:
            await provider.destroy(machine.provider_id)
        except GpuproxyError as exc:
            log.warning("reconciler: destroy of %s failed (%s)", machine.provider_id, exc.message)

    async def _reconcile_orphan_records(self) -> None:
        """Instances at a provider that is no longer configured cannot be checked; they are
        failed once their deadline passes, never left transient."""
        configured = set(self._fleet.names)
        for instance in self._registry.live_instances():
            if instance.provider in configured:
                continue
            if instance.deadline_ms and now_ms() > instance.deadline_ms:
                await self._registry.move(
                    instance.id,
                    InstanceState.FAILED,
                    reason=f"provider {instance.provider} is no longer configured",
                )

    async def _reconcile_reservations(self) -> None:
        at = now_ms()
        for reservation in self._registry.open_reservations():
            try:
                if reservation.state in RESERVATION_HELD:
                    if reservation.lease_expires_at_ms and at >= reservation.lease_expires_at_ms:
                        await self._reservations.release(
                            reservation, ending=ReservationState.EXPIRED
                        )
                    elif self._registry.lost_instances(reservation):
                        await self._registry.follow_instances(reservation.id)
                elif reservation.state is ReservationState.RELEASING:
                    await self._reservations.finish_release(reservation)
                elif (
                    reservation.state is ReservationState.PENDING
                    and reservation.deadline_ms
                    and at > reservation.deadline_ms
                ):
                    await self._reservations.fail(
                        reservation.id,
                        DeadlineExceeded(
                            "the reservation was not completed in time and was rolled back"
                        ).to_info(),
                    )
            except GpuproxyError as exc:
                log.info("reconciler: reservation %s not settled (%s)", reservation.id, exc.message)
