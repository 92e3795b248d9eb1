"""The reconciler: nothing stays transient past its deadline, nothing labelled leaks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from schemas.gpus import GpuOffer, InstanceState, LaunchSpec, ProviderName, label_of
from tests.provisioner.harness import Provisioner, eventually, running_provisioner
from workers.provisioner.instances import new_instance


def sim_offer(p: Provisioner) -> GpuOffer:
    offer, _ = p.market.availability()[0]
    return GpuOffer(
        provider=ProviderName.SIM,
        offer_id=offer.offer_id,
        gpu_model=offer.gpu_model,
        num_gpus=offer.num_gpus,
        vram_gb=offer.vram_gb,
        price_per_hour_micros=offer.price_per_hour_micros,
    )


async def stuck_provisioning(p: Provisioner, instance_id: str) -> None:
    """A record as a provisioner leaves it when it dies right before its provider call."""
    registry = p.service.registry
    await registry.add(new_instance(instance_id, "alice", sim_offer(p), LaunchSpec()))
    moved = await registry.move(instance_id, InstanceState.PROVISIONING, reason="asking")
    assert moved is not None


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
        await stuck_provisioning(p, instance_id)
        offer = sim_offer(p)
        machine = p.market.rent(offer.offer_id, label=label_of(instance_id), env={})
        running = await eventually(lambda: state_of(p, instance_id, InstanceState.RUNNING))
        assert running.provider_id == machine.id  # type: ignore[attr-defined]
        assert len(p.market.machines()) == 1


async def test_a_machine_that_dies_fails_its_instance_and_ends_its_gpu_time(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        instance_id = "i-dies00000000000000"
        await stuck_provisioning(p, instance_id)
        machine = p.market.rent(sim_offer(p).offer_id, label=label_of(instance_id), env={})
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
