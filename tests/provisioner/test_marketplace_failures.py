"""A marketplace's refusals and surprises, through the provisioner: the fake vast.ai API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from schemas.commands import CreateInstance, SearchOffers
from schemas.errors import FailedPrecondition, Unavailable
from schemas.gpus import Instance, InstanceState, ProviderName
from tests.fakes.vastai import FakeVastAi
from tests.provisioner.harness import Provisioner, eventually, new_id, running_provisioner

KEY = "vast-test-key-0123456789"


@pytest.fixture
async def vast() -> AsyncIterator[FakeVastAi]:
    async with FakeVastAi(KEY) as fake:
        fake.add_offer(4242)
        fake.add_offer(4343, gpu_name="A100 SXM4", gpu_ram=81920, dph_total=1.5)
        yield fake


@pytest.fixture
async def p(nats_url: str, tmp_path: Path, vast: FakeVastAi) -> AsyncIterator[Provisioner]:
    env = {"VASTAI_API_KEY": KEY, "VASTAI_API_URL": vast.url, "VASTAI_INTERRUPTIBLE": "false"}
    async with running_provisioner(
        nats_url, tmp_path / "sim", env=env, providers=("vastai",)
    ) as running:
        yield running


async def create(p: Provisioner, offer_id: str) -> Instance:
    made = await p.call(
        CreateInstance(
            command_id=new_id(), actor="alice", provider=ProviderName.VASTAI, offer_id=offer_id
        )
    )
    instance: Instance = made.instance
    return instance


async def settled(p: Provisioner, instance_id: str, state: InstanceState) -> Instance:
    async def check() -> Instance | None:
        found = await p.service.registry.instance(instance_id)
        return found if found is not None and found.state is state else None

    return await eventually(check)


async def test_offers_come_from_the_marketplace_with_exact_prices(p: Provisioner) -> None:
    found = await p.call(SearchOffers(command_id=new_id()))
    assert [(o.offer_id, o.price_per_hour_micros) for o in found.offers] == [
        ("4242", 412_300),
        ("4343", 1_500_000),
    ]
    assert found.offers[1].tier == "high_end"


async def test_an_offer_taken_meanwhile_fails_with_the_providers_reason(
    p: Provisioner, vast: FakeVastAi
) -> None:
    await p.call(SearchOffers(command_id=new_id()))
    vast.take(4242)
    with pytest.raises(FailedPrecondition) as refused:
        await create(p, "4242")
    assert "no longer available" in refused.value.message
    assert vast.instances == {}


async def test_a_marketplace_that_keeps_throttling_answers_unavailable(
    p: Provisioner, vast: FakeVastAi
) -> None:
    await p.call(SearchOffers(command_id=new_id()))
    vast.throttle(1000, retry_after=0.01)
    with pytest.raises(Unavailable) as refused:
        await create(p, "4242")
    assert "429" in refused.value.message
    assert KEY not in refused.value.message


async def test_an_exited_machine_fails_its_instance_and_is_destroyed(
    p: Provisioner, vast: FakeVastAi
) -> None:
    instance = await create(p, "4343")
    assert instance.state is InstanceState.STARTING
    vast.exit(int(instance.provider_id), "CUDA error: no kernel image")
    failed = await settled(p, instance.id, InstanceState.FAILED)
    assert "CUDA error" in failed.reason
    await eventually(lambda: _gone(vast, int(instance.provider_id)))


async def test_a_vanished_machine_fails_its_instance(p: Provisioner, vast: FakeVastAi) -> None:
    instance = await create(p, "4242")
    vast.vanish(int(instance.provider_id))
    failed = await settled(p, instance.id, InstanceState.FAILED)
    assert "no longer has" in failed.reason
    assert failed.ended_at_ms >= failed.billable_from_ms > 0


async def _gone(vast: FakeVastAi, instance_id: int) -> bool:
    return instance_id not in vast.instances


async def test_an_outbid_machine_is_preempted_and_destroyed(
    nats_url: str, tmp_path: Path, vast: FakeVastAi
) -> None:
    vast.offers[4242]["min_bid"] = 0.2
    env = {"VASTAI_API_KEY": KEY, "VASTAI_API_URL": vast.url, "VASTAI_INTERRUPTIBLE": "true"}
    async with running_provisioner(nats_url, tmp_path / "sim", env=env, providers=("vastai",)) as p:
        found = await p.call(SearchOffers(command_id=new_id()))
        bid = next(o for o in found.offers if o.offer_id.startswith("4242:"))
        instance = await create(p, bid.offer_id)
        vast.outbid(int(instance.provider_id))
        preempted = await settled(p, instance.id, InstanceState.PREEMPTED)
        assert "outbid" in preempted.reason
        await eventually(lambda: _gone(vast, int(instance.provider_id)))
