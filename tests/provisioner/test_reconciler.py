"""The reconciler: nothing stays transient past its deadline, nothing labelled leaks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import msgspec

from schemas.commands import SearchOffers
from schemas.gpus import GpuOffer, InstanceState, LaunchSpec, label_of
from schemas.replies import OfferList
from tests.provisioner.harness import Provisioner, eventually, new_id, running_provisioner
from workers.provisioner.instances import new_instance
from workers.provisioner.registry import now_ms


async def sim_offer(p: Provisioner) -> GpuOffer:
    found: OfferList = await p.call(SearchOffers(command_id=new_id()))
    return found.offers[0]


async def stuck_provisioning(p: Provisioner, instance_id: str) -> GpuOffer:
    """A record as a provisioner leaves it when it dies right before its provider call."""
    registry = p.service.registry
    offer = await sim_offer(p)
    await registry.add(new_instance(instance_id, "alice", offer, LaunchSpec()))
    moved = await registry.move(instance_id, InstanceState.PROVISIONING, reason="asking")
    assert moved is not None
    return offer


async def state_of(p: Provisioner, instance_id: str, state: InstanceState) -> object:
    found = await p.service.registry.instance(instance_id)
    return found if found is not None and found.state is state else None


async def test_an_instance_stuck_provisioning_is_failed_at_its_deadline(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim", provisioning_seconds=1.0) as p:
        await stuck_provisioning(p, "i-stuck0000000000000")
        failed = await eventually(lambda: state_of(p, "i-stuck0000000000000", InstanceState.FAILED))
        assert "never created it" in failed.reason  # type: ignore[attr-defined]
        assert p.market.machines() == []


async def test_a_machine_created_before_a_crash_is_adopted_and_runs(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        instance_id = "i-adopt0000000000000"
        offer = await stuck_provisioning(p, instance_id)
        machine = p.market.rent(offer.offer_id, label=label_of(instance_id), env={})
        running = await eventually(lambda: state_of(p, instance_id, InstanceState.RUNNING))
        assert running.provider_id == machine.id  # type: ignore[attr-defined]
        assert len(p.market.machines()) == 1


async def test_a_machine_that_dies_fails_its_instance_and_ends_its_gpu_time(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        instance_id = "i-dies00000000000000"
        offer = await stuck_provisioning(p, instance_id)
        machine = p.market.rent(offer.offer_id, label=label_of(instance_id), env={})
        await eventually(lambda: state_of(p, instance_id, InstanceState.RUNNING))
        os.kill(machine.pid, signal.SIGKILL)
        failed = await eventually(lambda: state_of(p, instance_id, InstanceState.FAILED))
        assert failed.reason.startswith("exited at sim")  # type: ignore[attr-defined]
        assert failed.ended_at_ms > 0  # type: ignore[attr-defined]

        async def metered() -> object:
            found = await p.service.registry.instance(instance_id)
            assert found is not None
            return found if found.metered_until_ms == found.ended_at_ms else None

        await eventually(metered)
        await eventually(lambda: _no_machines(p))


async def _no_machines(p: Provisioner) -> bool:
    return p.market.machines() == []


async def test_records_that_ended_long_ago_leave_the_registry(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        offer = await sim_offer(p)
        old = msgspec.structs.replace(
            new_instance("i-old00000000000000", "alice", offer, LaunchSpec()),
            state=InstanceState.TERMINATED,
            reason="destroyed",
            state_since_ms=1_000,
        )
        recent = msgspec.structs.replace(old, id="i-new00000000000000", state_since_ms=now_ms())
        for record in (old, recent):
            await p.service.registry.instances.create(record.id, record)

        async def forgotten() -> bool:
            return await p.service.registry.instance(old.id) is None

        await eventually(forgotten)
        assert await p.service.registry.instance(recent.id) is not None
