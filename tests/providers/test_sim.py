"""The `sim` provider: a local marketplace whose machines are real processes.

Each test has its own marketplace directory; every machine a test rents is destroyed by the
fixture, and every machine is owned by the test run, so none outlives it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from schemas.errors import FailedPrecondition
from schemas.gpus import GpuOffer, LaunchSpec, OfferQuery, ProviderName, label_of
from simulator.market import CATALOGUE, Offer, process_alive
from workers.provisioner.providers.base import Machine, MachineStatus
from workers.provisioner.providers.sim import SimProvider

SMALL = Offer(
    offer_id="sim-test-a100-40g",
    gpu_model="A100 PCIE",
    num_gpus=1,
    vram_gb=40,
    price_per_hour_micros=1_000_000,
    location="EU-DE",
    capacity=1,
)
PAIR = Offer(
    offer_id="sim-test-l4-24g-x2",
    gpu_model="L4",
    num_gpus=2,
    vram_gb=24,
    price_per_hour_micros=800_000,
    location="US-TX",
    capacity=2,
)
TEST_CATALOGUE = (SMALL, PAIR)


@pytest.fixture
async def providers(tmp_path: Path) -> AsyncIterator[list[SimProvider]]:
    """Two providers on one marketplace, as two provisioner processes would be."""
    made = [
        SimProvider(tmp_path / "market", catalogue=TEST_CATALOGUE, owner_pid=os.getpid())
        for _ in range(2)
    ]
    yield made
    for machine in await made[0].list():
        await made[0].destroy(machine.provider_id)
    for provider in made:
        await provider.close()


@pytest.fixture
def provider(providers: list[SimProvider]) -> SimProvider:
    return providers[0]


async def until(provider: SimProvider, machine_id: str, status: MachineStatus) -> Machine:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        machine = await provider.get(machine_id)
        assert machine is not None
        if machine.status is status:
            return machine
        await asyncio.sleep(0.05)
    pytest.fail(f"{machine_id} never became {status}")


async def until_ready(provider: SimProvider, machine_id: str) -> Machine:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        machine = await provider.get(machine_id)
        assert machine is not None
        if await provider.ready(machine, timeout=1):
            return machine
        await asyncio.sleep(0.05)
    pytest.fail(f"{machine_id} never answered")


# Offers


async def test_search_lists_the_catalogue_cheapest_first(tmp_path: Path) -> None:
    provider = SimProvider(tmp_path)

    offers = await provider.search(OfferQuery())

    assert {offer.offer_id for offer in offers} == {offer.offer_id for offer in CATALOGUE}
    prices = [offer.price_per_hour_micros for offer in offers]
    assert prices == sorted(prices)
    assert all(isinstance(offer, GpuOffer) for offer in offers)
    assert {offer.provider for offer in offers} == {ProviderName.SIM}
    h100 = next(offer for offer in offers if offer.offer_id == "sim-h100-80g-eu-de")
    assert (h100.gpu_model, h100.num_gpus, h100.vram_gb, h100.location) == (
        "H100 SXM",
        1,
        80,
        "EU-DE",
    )
    assert str(h100.available) == h100.metadata["capacity"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (OfferQuery(gpu_model="h100"), {"sim-h100-80g-eu-de", "sim-h100-80g-x8-us-ca"}),
        (OfferQuery(location="eu-d"), {"sim-l40s-48g-eu-de", "sim-h100-80g-eu-de"}),
        (OfferQuery(min_gpus=4), {"sim-a100-80g-x4-eu-nl", "sim-h100-80g-x8-us-ca"}),
        (
            OfferQuery(min_vram_gb=48, max_price_micros=2_500_000),
            {"sim-l40s-48g-eu-de", "sim-h100-80g-eu-de"},
        ),
        (OfferQuery(limit=2), {"sim-rtx3090-24g-eu-nl", "sim-rtx4090-24g-us-ca"}),
    ],
)
async def test_search_applies_the_filters_it_knows(
    tmp_path: Path, query: OfferQuery, expected: set[str]
) -> None:
    offers = await SimProvider(tmp_path).search(query)

    assert {offer.offer_id for offer in offers} == expected


# Machines


async def test_a_rented_machine_runs_answers_and_is_destroyed(provider: SimProvider) -> None:
    spec = LaunchSpec(env={"SIM_MODEL": "sim-test-model"})
    label = label_of("i-lifecycle")

    machine_id = await provider.create(SMALL.offer_id, spec, label=label)
    machine = await until_ready(provider, machine_id)

    assert re.fullmatch(r"sim-m-[0-9a-f]{12}", machine_id)
    assert machine.status is MachineStatus.RUNNING
    assert machine.label == label
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", machine.endpoint)
    assert await provider.list() == [machine]
    async with httpx.AsyncClient(base_url=machine.endpoint, timeout=10) as client:
        models = (await client.get("/v1/models")).json()
        answer = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert [model["id"] for model in models["data"]] == ["sim-test-model"]
    assert answer.json()["usage"]["completion_tokens"] == 2
    record = provider.market.machine(machine_id)
    assert record is not None
    # A session of its own: Ctrl-C to the renter's process group does not reach it.
    assert os.getsid(record.pid) == record.pid

    await provider.destroy(machine_id)

    assert await provider.get(machine_id) is None
    assert await provider.list() == []
    assert not process_alive(record.pid, record.start_ticks)


async def test_destroying_twice_or_an_unknown_machine_is_fine(provider: SimProvider) -> None:
    machine_id = await provider.create(SMALL.offer_id, LaunchSpec(), label="twice")

    await provider.destroy(machine_id)
    await provider.destroy(machine_id)
    await provider.destroy("sim-m-000000000000")
    await provider.destroy("../../etc/passwd")

    assert await provider.get(machine_id) is None
    assert await provider.get("../../etc/passwd") is None


async def test_a_failed_boot_is_reported_exited_with_its_reason(provider: SimProvider) -> None:
    spec = LaunchSpec(env={"SIM_BOOT_FAIL": "1"})

    machine_id = await provider.create(SMALL.offer_id, spec, label="boot-fails")
    machine = await until(provider, machine_id, MachineStatus.EXITED)

    assert "boot failed" in machine.message
    assert machine.endpoint == ""
    assert not await provider.ready(machine)
    # Its hardware is free again; its record stays until it is destroyed.
    assert SMALL.offer_id in {offer.offer_id for offer in await provider.search(OfferQuery())}
    assert [m.provider_id for m in await provider.list()] == [machine_id]


async def test_a_bad_launch_env_makes_the_machine_exit_naming_it(provider: SimProvider) -> None:
    spec = LaunchSpec(env={"SIM_FAIL": "explode"})

    machine_id = await provider.create(SMALL.offer_id, spec, label="bad-env")
    machine = await until(provider, machine_id, MachineStatus.EXITED)

    assert "--fail" in machine.message


async def test_a_slow_boot_runs_before_it_answers(provider: SimProvider) -> None:
    spec = LaunchSpec(env={"SIM_BOOT_DELAY_MS": "1500"})

    machine_id = await provider.create(SMALL.offer_id, spec, label="slow-boot")
    machine = await provider.get(machine_id)

    assert machine is not None
    assert machine.status is MachineStatus.RUNNING
    assert not await provider.ready(machine)
    began = time.monotonic()
    await until_ready(provider, machine_id)
    assert time.monotonic() - began >= 0.5


async def test_launch_env_sets_the_machine_failures(provider: SimProvider) -> None:
    spec = LaunchSpec(env={"SIM_FAIL": "refuse", "SIM_FAIL_RATE": "0.5"})

    machine_id = await provider.create(PAIR.offer_id, spec, label="refusing")
    machine = await until_ready(provider, machine_id)

    async with httpx.AsyncClient(base_url=machine.endpoint, timeout=10) as client:
        statuses = [
            (await client.post("/v1/completions", json={"prompt": "hi"})).status_code
            for _ in range(2)
        ]
    assert statuses == [200, 503]


@pytest.fixture
def owner() -> Iterator[subprocess.Popen[bytes]]:
    """A process to own machines, for a test to end."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


async def test_a_machine_ends_with_its_owner(
    tmp_path: Path, owner: subprocess.Popen[bytes]
) -> None:
    provider = SimProvider(tmp_path, catalogue=TEST_CATALOGUE, owner_pid=owner.pid)
    try:
        machine_id = await provider.create(SMALL.offer_id, LaunchSpec(), label="owned")
        await until_ready(provider, machine_id)

        owner.kill()
        await asyncio.to_thread(owner.wait)

        machine = await until(provider, machine_id, MachineStatus.EXITED)
        assert "owner process" in machine.message
    finally:
        for machine in await provider.list():
            await provider.destroy(machine.provider_id)


# One marketplace, many renters


async def test_two_providers_on_one_state_dir_see_the_same_machines(
    providers: list[SimProvider],
) -> None:
    first, second = providers

    machine_id = await first.create(PAIR.offer_id, LaunchSpec(), label="shared")

    assert await second.get(machine_id) == await first.get(machine_id)
    assert await second.list() == await first.list()
    offers = await second.search(OfferQuery())
    [pair] = [offer for offer in offers if offer.offer_id == PAIR.offer_id]
    assert pair.available == 1

    await second.destroy(machine_id)

    assert await first.get(machine_id) is None


async def test_a_full_offer_is_failed_precondition_naming_it(
    providers: list[SimProvider],
) -> None:
    first, second = providers
    await first.create(SMALL.offer_id, LaunchSpec(), label="only-one")

    with pytest.raises(FailedPrecondition, match=f"offer {SMALL.offer_id} is no longer available"):
        await second.create(SMALL.offer_id, LaunchSpec(), label="one-too-many")

    offered = {offer.offer_id for offer in await second.search(OfferQuery())}
    assert offered == {PAIR.offer_id}


async def test_an_unknown_offer_is_failed_precondition(provider: SimProvider) -> None:
    with pytest.raises(FailedPrecondition, match="offer sim-nope is no longer available"):
        await provider.create("sim-nope", LaunchSpec(), label="nope")


async def test_concurrent_rents_never_exceed_capacity(providers: list[SimProvider]) -> None:
    rents = [
        providers[n % 2].create(PAIR.offer_id, LaunchSpec(), label=f"race-{n}") for n in range(5)
    ]

    results = await asyncio.gather(*rents, return_exceptions=True)

    rented = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, FailedPrecondition)]
    assert (len(rented), len(refused)) == (PAIR.capacity, 5 - PAIR.capacity)
    assert len(await providers[1].list()) == PAIR.capacity
