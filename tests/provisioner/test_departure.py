"""What a provisioner command does when its caller leaves, and when its worker stops.

The gateway cancels a reservation only when its client sent no idempotency key (nobody can
come back for it): the reservation is then rolled back at once, its machines destroyed. A
worker that stops is no departure: the command goes to another replica, which finishes it.
A create finishes whoever left: its machine is recorded and listed, never left billing
unknown.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bus.codec import encode
from schemas import subjects
from schemas.commands import (
    KEYED_PREFIX,
    CommandBase,
    CreateInstance,
    ListInstances,
    Reserve,
    SearchOffers,
    name_of,
)
from schemas.gpus import InstanceState, LaunchSpec, ProviderName, ReservationState
from schemas.replies import InstanceList, InstanceView, OfferList, ReservationView
from schemas.subjects import WorkerKind
from tests.provisioner.harness import (
    Provisioner,
    eventually,
    new_id,
    running_provisioner,
    slow_marketplace,
)
from workers.provisioner.instances import instance_id_for
from workers.provisioner.reservations import reservation_id_for

pytestmark = pytest.mark.timeout(120)

SLOW_BOOT = LaunchSpec(env={"SIM_BOOT_DELAY_MS": "60000"})
"""Machines that take a minute to answer: the reservation is still pending when it is cut."""


async def send(p: Provisioner, command: CommandBase) -> None:
    """Publish the command with no caller waiting on it (the test plays the caller's part)."""
    await p.nc.jetstream().publish(
        subjects.command(WorkerKind.PROVISIONER, name_of(command)),
        encode(command),
        headers={subjects.HEADER_MSG_ID: command.command_id},
    )


async def test_a_reservation_whose_caller_left_is_rolled_back_at_once(
    nats_url: str, tmp_path: Path
) -> None:
    # No reconciler round within the test: what destroys the machines is the command itself.
    async with running_provisioner(nats_url, tmp_path / "sim", reconcile_seconds=60.0) as p:
        command = Reserve(
            command_id=new_id(), actor="alice", count=2, spec=SLOW_BOOT, ready_seconds=300
        )
        await send(p, command)

        async def both_rented() -> bool:
            return len(p.market.machines()) == 2

        await eventually(both_rented)
        left_at = time.monotonic()
        assert p.runtime.cancel(command.command_id, "the caller left")

        async def none_left() -> bool:
            return p.market.machines() == []

        await eventually(none_left, timeout=15)
        assert time.monotonic() - left_at < 15
        reservation = await p.service.registry.reservation(reservation_id_for(command.command_id))
        assert reservation is not None
        assert reservation.state is ReservationState.FAILED
        assert reservation.reason == "the caller left"
        for instance_id in reservation.instance_ids:
            instance = await p.service.registry.instance(instance_id)
            assert instance is not None
            assert instance.state is InstanceState.TERMINATED


async def test_a_keyed_reservation_whose_caller_left_completes_for_the_retry(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        command = Reserve(
            command_id=f"{KEYED_PREFIX}{new_id()}",
            actor="alice",
            count=1,
            spec=LaunchSpec(env={"SIM_BOOT_DELAY_MS": "1500"}),
        )
        await send(p, command)

        async def rented() -> bool:
            return len(p.market.machines()) == 1

        await eventually(rented)
        p.runtime.cancel(command.command_id, "the caller left")

        retry = await p.call(command)
        assert isinstance(retry, ReservationView)
        assert retry.reservation.state is ReservationState.ACTIVE
        assert [i.provider_id for i in retry.instances] == [m.id for m in p.market.machines()]


async def test_a_reservation_cut_by_its_worker_stopping_is_finished_by_another_replica(
    nats_url: str, tmp_path: Path
) -> None:
    sim = tmp_path / "sim"
    command = Reserve(
        command_id=new_id(),
        actor="alice",
        count=1,
        spec=LaunchSpec(env={"SIM_BOOT_DELAY_MS": "3000"}),
    )
    async with running_provisioner(nats_url, sim, drain_seconds=0.2, keep_machines=True) as p:
        await send(p, command)

        async def rented() -> bool:
            return len(p.market.machines()) == 1

        await eventually(rented)
        machine = p.market.machines()[0]
    # The worker stopped mid-reservation: nothing was rolled back.
    assert [m.id for m in p.market.machines()] == [machine.id]

    async with running_provisioner(nats_url, sim) as other:
        reservation_id = reservation_id_for(command.command_id)

        async def active() -> object:
            found = await other.service.registry.reservation(reservation_id)
            return found if found and found.state is ReservationState.ACTIVE else None

        await eventually(active, timeout=60)
        view = await other.call(command)
        assert isinstance(view, ReservationView)
        assert [i.provider_id for i in view.instances] == [machine.id]
        assert [m.id for m in other.market.machines()] == [machine.id]


async def test_a_create_whose_caller_left_still_records_its_machine(
    nats_url: str, tmp_path: Path
) -> None:
    sim = tmp_path / "sim"
    async with running_provisioner(nats_url, sim, reconcile_seconds=60.0) as p:
        offers: OfferList = await p.call(SearchOffers(command_id=new_id()))
        command = CreateInstance(
            command_id=new_id(),
            actor="alice",
            provider=ProviderName.SIM,
            offer_id=offers.offers[0].offer_id,
        )
        instance_id = instance_id_for(command.command_id, 0)

        async def asking() -> bool:
            found = await p.service.registry.instance(instance_id)
            return found is not None and found.state is InstanceState.PROVISIONING

        with slow_marketplace(sim):
            await send(p, command)
            await eventually(asking)
            # The caller leaves while the marketplace is still answering the rent.
            p.runtime.cancel(command.command_id, "the caller left")

        async def started() -> object:
            found = await p.service.registry.instance(instance_id)
            return found if found and found.state is not InstanceState.PROVISIONING else None

        instance = await eventually(started)
        machines = p.market.machines()
        assert [m.id for m in machines] == [instance.provider_id]  # type: ignore[attr-defined]
        answer = await p.call(command)
        assert isinstance(answer, InstanceView)
        assert answer.instance.id == instance_id
        mine = await p.call(ListInstances(command_id=new_id(), actor="alice", owner="alice"))
        assert isinstance(mine, InstanceList)
        assert [i.id for i in mine.instances] == [instance_id]
