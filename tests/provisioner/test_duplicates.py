"""Two deliveries of one command running at the same time rent one set of machines.

JetStream delivers a command again while its first delivery still runs when the first
replica's keep-alive comes late (a stalled event loop, a network hiccup): two replicas then
run the same command, same command id, at the same time. The tests publish the command twice
under two message ids, which looks to the handlers exactly like that, to two provisioner
replicas, while the marketplace is slow to answer a rent (its lock is held), so both
deliveries are inside the create at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bus.codec import encode
from schemas import subjects
from schemas.commands import (
    CommandBase,
    CreateBatch,
    CreateInstance,
    Reserve,
    SearchOffers,
    name_of,
)
from schemas.gpus import InstanceState, ProviderName, ReservationState
from schemas.replies import BatchCreated, InstanceView, OfferList, ReservationView
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

QUIET = 60.0
"""No reconciler round during the test: it would destroy a second machine after the fact,
and what is proven here is that none is ever rented."""


async def deliver_twice(p: Provisioner, command: CommandBase) -> None:
    js = p.nc.jetstream()
    subject = subjects.command(WorkerKind.PROVISIONER, name_of(command))
    for message_id in (command.command_id, f"{command.command_id}-again"):
        await js.publish(subject, encode(command), headers={subjects.HEADER_MSG_ID: message_id})


async def run_twice_while_renting_is_slow(
    p: Provisioner, q: Provisioner, sim_dir: Path, command: CommandBase, instance_ids: list[str]
) -> None:
    registry = p.service.registry

    async def provisioning() -> bool:
        found = [await registry.instance(i) for i in instance_ids]
        return all(i is not None and i.state is InstanceState.PROVISIONING for i in found)

    with slow_marketplace(sim_dir):
        await deliver_twice(p, command)
        await eventually(provisioning)
        # Long enough for both deliveries to reach the provider call, were they to make it.
        await asyncio.sleep(1.0)

    async def both_done() -> bool:
        return p.runtime.in_flight == 0 and q.runtime.in_flight == 0

    await eventually(both_done, timeout=60)


async def test_two_deliveries_of_one_create_at_once_rent_one_machine(
    nats_url: str, tmp_path: Path
) -> None:
    sim = tmp_path / "sim"
    async with (
        running_provisioner(nats_url, sim, reconcile_seconds=QUIET) as p,
        running_provisioner(nats_url, sim, reconcile_seconds=QUIET) as q,
    ):
        offers: OfferList = await p.call(SearchOffers(command_id=new_id()))
        command = CreateInstance(
            command_id=new_id(),
            actor="alice",
            provider=ProviderName.SIM,
            offer_id=offers.offers[0].offer_id,
        )
        instance_id = instance_id_for(command.command_id, 0)
        await run_twice_while_renting_is_slow(p, q, sim, command, [instance_id])

        machines = p.market.machines()
        assert len(machines) == 1
        instance = await p.service.registry.instance(instance_id)
        assert instance is not None
        assert instance.state in (InstanceState.STARTING, InstanceState.RUNNING)
        assert instance.provider_id == machines[0].id
        answer = await p.call(command)
        assert isinstance(answer, InstanceView)
        assert answer.instance.id == instance_id


async def test_two_deliveries_of_one_batch_at_once_rent_each_machine_once(
    nats_url: str, tmp_path: Path
) -> None:
    sim = tmp_path / "sim"
    async with (
        running_provisioner(nats_url, sim, reconcile_seconds=QUIET) as p,
        running_provisioner(nats_url, sim, reconcile_seconds=QUIET) as q,
    ):
        command = CreateBatch(command_id=new_id(), actor="alice", counts={ProviderName.SIM: 2})
        ids = [instance_id_for(command.command_id, k) for k in range(2)]
        await run_twice_while_renting_is_slow(p, q, sim, command, ids)

        machines = p.market.machines()
        assert len(machines) == 2
        recorded = [await p.service.registry.instance(i) for i in ids]
        assert {i.provider_id for i in recorded if i is not None} == {m.id for m in machines}
        answer = await p.call(command)
        assert isinstance(answer, BatchCreated)
        assert sorted(i.id for i in answer.instances) == sorted(ids)
        assert answer.failures == []


async def test_two_deliveries_of_one_reservation_at_once_rent_one_set_of_machines(
    nats_url: str, tmp_path: Path
) -> None:
    sim = tmp_path / "sim"
    async with (
        running_provisioner(nats_url, sim, reconcile_seconds=QUIET) as p,
        running_provisioner(nats_url, sim, reconcile_seconds=QUIET) as q,
    ):
        command = Reserve(command_id=new_id(), actor="alice", count=2)
        ids = [instance_id_for(command.command_id, k) for k in range(2)]
        await run_twice_while_renting_is_slow(p, q, sim, command, ids)

        assert len(p.market.machines()) == 2
        reservation = await p.service.registry.reservation(reservation_id_for(command.command_id))
        assert reservation is not None
        assert reservation.state is ReservationState.ACTIVE
        answer = await p.call(command)
        assert isinstance(answer, ReservationView)
        assert answer.reservation.id == reservation.id
        assert [i.state for i in answer.instances] == [InstanceState.RUNNING] * 2
