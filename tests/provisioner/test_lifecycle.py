"""Instances and reservations on the sim marketplace, through the provisioner's commands."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from schemas.commands import (
    CreateInstance,
    DestroyInstance,
    GetReservation,
    ListInstances,
    ReleaseReservation,
    Reserve,
    SearchOffers,
)
from schemas.errors import FailedPrecondition, PermissionDenied
from schemas.events import GpuTimeUsed, InstanceTransitioned
from schemas.gpus import InstanceState, LaunchSpec, OfferQuery, ProviderName, ReservationState
from schemas.replies import InstanceList, InstanceView, OfferList, ReservationView
from tests.provisioner.harness import events_of, eventually, new_id, running_provisioner

pytestmark = pytest.mark.timeout(120)


async def test_offers_are_filtered_and_sorted_by_price(nats_url: str, tmp_path: Path) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        answer = await p.call(SearchOffers(command_id=new_id(), query=OfferQuery(min_vram_gb=40)))
        assert isinstance(answer, OfferList)
        assert answer.offers
        assert all(o.vram_gb >= 40 for o in answer.offers)
        prices = [o.price_per_hour_micros for o in answer.offers]
        assert prices == sorted(prices)
        assert all(o.vendor and o.tier for o in answer.offers)


async def test_a_created_instance_runs_answers_and_is_destroyed(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        offers = await p.call(SearchOffers(command_id=new_id()))
        offer = offers.offers[0]
        made = await p.call(
            CreateInstance(
                command_id=new_id(),
                actor="alice",
                provider=ProviderName.SIM,
                offer_id=offer.offer_id,
                spec=LaunchSpec(env={"SIM_MODEL": "tiny"}),
            )
        )
        assert isinstance(made, InstanceView)
        assert made.instance.state is InstanceState.STARTING
        instance_id = made.instance.id

        async def running() -> object:
            listed = await p.call(ListInstances(command_id=new_id(), actor="alice", owner="alice"))
            assert isinstance(listed, InstanceList)
            found = [i for i in listed.instances if i.id == instance_id]
            return found[0] if found and found[0].state is InstanceState.RUNNING else None

        instance = await eventually(running)
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"{instance.endpoint}/v1/models")  # type: ignore[attr-defined]
        assert answer.status_code == 200

        with pytest.raises(PermissionDenied):
            await p.call(DestroyInstance(command_id=new_id(), actor="bob", instance_id=instance_id))

        gone = await p.call(
            DestroyInstance(command_id=new_id(), actor="alice", instance_id=instance_id)
        )
        assert gone.instance.state is InstanceState.TERMINATED
        assert p.market.machines() == []
        states = [
            e.to_state
            for e in await events_of(p.nc)
            if isinstance(e, InstanceTransitioned) and e.instance_id == instance_id
        ]
        assert states == [
            "pending",
            "provisioning",
            "starting",
            "running",
            "stopping",
            "terminated",
        ]


async def test_reserved_instances_serve_openai_requests_until_released(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        command_id = new_id()
        reserve = Reserve(command_id=command_id, actor="alice", count=2, lease_seconds=600)
        view = await p.call(reserve)
        assert isinstance(view, ReservationView)
        assert view.reservation.state is ReservationState.ACTIVE
        assert [i.state for i in view.instances] == [InstanceState.RUNNING] * 2
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{view.instances[0].endpoint}/v1/chat/completions",
                json={"model": "sim-llama-3-8b", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]

        again = await p.call(reserve)
        assert again.reservation.id == view.reservation.id
        assert len(p.market.machines()) == 2

        released = await p.call(
            ReleaseReservation(
                command_id=new_id(), actor="alice", reservation_id=view.reservation.id
            )
        )
        assert released.reservation.state is ReservationState.RELEASED
        assert {i.state for i in released.instances} == {InstanceState.TERMINATED}
        assert p.market.machines() == []


async def test_a_reservation_too_large_creates_nothing(nats_url: str, tmp_path: Path) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        with pytest.raises(FailedPrecondition) as refused:
            await p.call(
                Reserve(
                    command_id=new_id(),
                    actor="alice",
                    count=3,
                    query=OfferQuery(min_vram_gb=1000),
                )
            )
        assert refused.value.field == "count"
        assert p.market.machines() == []


async def test_a_failed_boot_rolls_the_whole_reservation_back(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        command_id = new_id()
        with pytest.raises(FailedPrecondition) as refused:
            await p.call(
                Reserve(
                    command_id=command_id,
                    actor="alice",
                    count=2,
                    spec=LaunchSpec(env={"SIM_BOOT_FAIL": "1"}),
                )
            )
        assert "exited" in refused.value.message
        await eventually(lambda: _none_left(p))


async def _none_left(p: object) -> bool:
    return p.market.machines() == []  # type: ignore[attr-defined]


async def test_an_ended_lease_destroys_the_instances_and_stops_gpu_time(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        view = await p.call(Reserve(command_id=new_id(), actor="alice", count=1, lease_seconds=2))
        reservation_id = view.reservation.id

        async def expired() -> object:
            got = await p.call(
                GetReservation(command_id=new_id(), actor="alice", reservation_id=reservation_id)
            )
            return got if got.reservation.state is ReservationState.EXPIRED else None

        ended = await eventually(expired)
        instance = ended.instances[0]
        assert instance.state is InstanceState.TERMINATED
        assert p.market.machines() == []

        async def metered() -> list[GpuTimeUsed] | None:
            usage = [
                e
                for e in await events_of(p.nc)
                if isinstance(e, GpuTimeUsed) and e.instance_id == instance.id
            ]
            return usage if usage and usage[-1].final else None

        usage = await eventually(metered)
        assert usage[-1].end_ms == instance.ended_at_ms
        assert usage[0].start_ms == instance.billable_from_ms
        billable_ms = instance.ended_at_ms - instance.billable_from_ms
        assert sum(u.amount_micros for u in usage) == (
            instance.price_per_hour_micros * billable_ms // 3_600_000
        )


async def test_a_reservation_may_take_several_machines_of_one_offer(
    nats_url: str, tmp_path: Path
) -> None:
    async with running_provisioner(nats_url, tmp_path / "sim") as p:
        offers = await p.call(SearchOffers(command_id=new_id()))
        cheapest = offers.offers[0]
        assert cheapest.available > 1
        view = await p.call(
            Reserve(
                command_id=new_id(),
                actor="alice",
                count=2,
                query=OfferQuery(gpu_model=cheapest.gpu_model, location=cheapest.location),
            )
        )
        assert {i.offer_id for i in view.instances} == {cheapest.offer_id}
