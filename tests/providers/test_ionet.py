"""The io.net adapter against a local fake of io.net's IO Cloud CaaS API (tests/fakes/ionet.py)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from schemas.errors import ConfigError, FailedPrecondition, InvalidArgument, Unavailable
from schemas.gpus import GpuOffer, LaunchSpec, OfferQuery, ProviderName, label_of
from tests.fakes.ionet import FakeHardware, IoNetFake
from workers.provisioner.providers.base import MachineStatus
from workers.provisioner.providers.ionet import (
    DEFAULT_DURATION_HOURS,
    DEFAULT_IMAGE,
    LABEL_ENV,
    IoNetProvider,
)

LABEL = label_of("i-7f3a")
H100, RTX4090, A100, L40S = 112, 57, 9, 31
IOWA, FRANKFURT = 3, 7


@pytest.fixture
def fake() -> Iterator[IoNetFake]:
    with IoNetFake() as server:
        server.add_location(IOWA, "us", "Iowa")
        server.add_location(FRANKFURT, "de", "Frankfurt")
        server.add_hardware(
            FakeHardware(
                H100,
                "H100",
                num_cards=8,
                vram_per_card=80,
                price=27.875342465753423,
                replicas={IOWA: 2, FRANKFURT: 1},
            )
        )
        server.add_hardware(
            FakeHardware(RTX4090, "GeForce RTX 4090", price=0.33, replicas={IOWA: 4})
        )
        server.add_hardware(FakeHardware(A100, "A100", vram_per_card=80, price=1.2, replicas={}))
        server.add_hardware(
            FakeHardware(L40S, "L40S", vram_per_card=48, price=None, quote=0.95, replicas={IOWA: 1})
        )
        yield server


def provider_for(fake: IoNetFake, **options: float) -> IoNetProvider:
    settings: dict[str, float] = {"timeout": 2.0, "max_attempts": 3, "backoff": 0.01, **options}
    return IoNetProvider(
        fake.api_key,
        base_url=fake.url,
        timeout=settings["timeout"],
        max_attempts=int(settings["max_attempts"]),
        backoff=settings["backoff"],
    )


@pytest.fixture
async def provider(fake: IoNetFake) -> AsyncIterator[IoNetProvider]:
    ionet = provider_for(fake)
    yield ionet
    await ionet.close()


def by_id(offers: list[GpuOffer]) -> dict[str, GpuOffer]:
    return {offer.offer_id: offer for offer in offers}


async def test_search_offers_each_location_with_free_replicas_at_exact_micros(
    provider: IoNetProvider,
) -> None:
    offers = by_id(await provider.search(OfferQuery()))

    assert set(offers) == {"112@3x8", "112@7x8", "57@3x1", "31@3x1"}
    h100 = offers["112@7x8"]
    assert h100 == GpuOffer(
        provider=ProviderName.IONET,
        offer_id="112@7x8",
        gpu_model="H100",
        num_gpus=8,
        vram_gb=80,
        price_per_hour_micros=27_875_343,  # 27.875342465753423 USD/h, rounded up to a micro
        location="DE",
        vendor="NVIDIA",
        metadata={
            "hardware_id": "112",
            "location_id": "7",
            "location_name": "Frankfurt",
            "available_replicas": "1",
        },
    )
    assert offers["57@3x1"].price_per_hour_micros == 330_000
    assert offers["57@3x1"].location == "US"


async def test_search_prices_hardware_the_catalogue_does_not_from_the_price_check(
    provider: IoNetProvider, fake: IoNetFake
) -> None:
    offers = by_id(await provider.search(OfferQuery(gpu_model="l40s")))

    assert list(offers) == ["31@3x1"]
    # 0.95 USD/h plus io.net's 0.25% fee: 0.952375.
    assert offers["31@3x1"].price_per_hour_micros == 952_375
    (price,) = fake.received("GET", "/caas/price")
    assert price.query == {
        "location_ids": "[3]",
        "hardware_id": "31",
        "duration_hours": "1",
        "gpus_per_container": "1",
        "replica_count": "1",
    }


async def test_search_filters_before_asking_for_availability(
    provider: IoNetProvider, fake: IoNetFake
) -> None:
    offers = await provider.search(OfferQuery(min_vram_gb=70, location="de"))

    assert [offer.offer_id for offer in offers] == ["112@7x8"]
    asked = [r.query["hardware_id"] for r in fake.received("GET", "/available-replicas")]
    assert asked == ["112"]  # the sold-out A100 and the small GPUs cost no call


async def test_create_deploys_the_offer_with_image_env_port_and_label(
    provider: IoNetProvider, fake: IoNetFake
) -> None:
    spec = LaunchSpec(
        image="ghcr.io/acme/server:1.2", env={"MODEL": "qwen3-8b"}, ports=(9000, 9001)
    )

    deployment_id = await provider.create("112@7x8", spec, label=LABEL)

    (deploy,) = fake.received("POST", "/caas/deploy")
    assert deploy.body == {
        "resource_private_name": LABEL,
        "duration_hours": DEFAULT_DURATION_HOURS,
        "gpus_per_container": 8,
        "hardware_id": 112,
        "location_ids": [7],
        "container_config": {
            "replica_count": 1,
            "env_variables": {"MODEL": "qwen3-8b", LABEL_ENV: LABEL},
            "traffic_port": 9000,
        },
        "registry_config": {"image_url": "ghcr.io/acme/server:1.2"},
    }
    assert deploy.api_key == fake.api_key
    assert fake.deployments[deployment_id].name == LABEL


async def test_create_without_image_or_port_runs_the_default_server_on_8000(
    provider: IoNetProvider, fake: IoNetFake
) -> None:
    await provider.create("57@3x1", LaunchSpec(), label=LABEL)

    (deploy,) = fake.received("POST", "/caas/deploy")
    assert deploy.body["registry_config"] == {"image_url": DEFAULT_IMAGE}
    assert deploy.body["container_config"]["traffic_port"] == 8000


async def test_deployment_is_creating_until_io_net_runs_it_then_running_at_its_public_url(
    provider: IoNetProvider,
) -> None:
    deployment_id = await provider.create("57@3x1", LaunchSpec(), label=LABEL)

    first = await provider.get(deployment_id)
    second = await provider.get(deployment_id)
    third = await provider.get(deployment_id)

    assert first is not None
    assert second is not None
    assert third is not None
    assert (first.status, second.status) == (MachineStatus.CREATING, MachineStatus.CREATING)
    assert first.label == LABEL
    assert third.status is MachineStatus.RUNNING
    assert third.label == LABEL
    assert third.endpoint == f"https://{deployment_id}.caas.fake.test"
    assert third.provider_id == deployment_id


async def test_list_finds_the_machine_by_its_label(provider: IoNetProvider) -> None:
    ours = await provider.create("57@3x1", LaunchSpec(), label=LABEL)
    other = await provider.create("112@3x8", LaunchSpec(), label="someone-elses-job")

    machines = {m.provider_id: m for m in await provider.list()}

    assert machines[ours].label == LABEL
    assert machines[other].label == "someone-elses-job"
    assert machines[ours].status is MachineStatus.CREATING


async def test_list_reads_every_page(provider: IoNetProvider, fake: IoNetFake) -> None:
    fake.add_hardware(FakeHardware(77, "T4", price=0.1, replicas={IOWA: 150}))
    created = {await provider.create("77@3x1", LaunchSpec(), label=f"job-{n}") for n in range(105)}

    machines = await provider.list()

    assert {m.provider_id for m in machines} == created
    assert [r.query["page"] for r in fake.received("GET", "/caas/deployments")] == ["0", "1"]


async def test_destroy_deletes_and_a_gone_deployment_counts_as_destroyed(
    provider: IoNetProvider, fake: IoNetFake
) -> None:
    deployment_id = await provider.create("57@3x1", LaunchSpec(), label=LABEL)

    await provider.destroy(deployment_id)
    await provider.destroy(deployment_id)  # io.net refuses a second delete: already ending
    await provider.destroy("0b6c5bd4-9a51-4c0e-8b0e-3d7f6f1d2a10")  # 404: never there

    assert len(fake.received("DELETE", deployment_id)) == 2
    machine = await provider.get(deployment_id)
    assert machine is not None
    assert machine.status is MachineStatus.EXITED
    assert deployment_id not in {m.provider_id for m in await provider.list()}


async def test_get_of_an_unknown_deployment_is_none(provider: IoNetProvider) -> None:
    assert await provider.get("0b6c5bd4-9a51-4c0e-8b0e-3d7f6f1d2a10") is None


async def test_failed_deployment_is_exited_with_io_nets_reason(
    provider: IoNetProvider, fake: IoNetFake
) -> None:
    deployment_id = await provider.create("57@3x1", LaunchSpec(), label=LABEL)
    fake.end(deployment_id, status="FAILED", message="Container exited with code 1: CUDA OOM")

    machine = await provider.get(deployment_id)

    assert machine is not None
    assert machine.status is MachineStatus.EXITED
    assert machine.message == "failed: Container exited with code 1: CUDA OOM"


async def test_completed_deployment_is_exited(provider: IoNetProvider, fake: IoNetFake) -> None:
    deployment_id = await provider.create("57@3x1", LaunchSpec(), label=LABEL)
    fake.end(deployment_id, status="COMPLETED")

    machine = await provider.get(deployment_id)

    assert machine is not None
    assert (machine.status, machine.message) == (MachineStatus.EXITED, "completed")


async def test_no_capacity_is_a_failed_precondition_naming_the_offer(
    provider: IoNetProvider, fake: IoNetFake
) -> None:
    fake.no_capacity(H100)

    with pytest.raises(FailedPrecondition) as refused:
        await provider.create("112@7x8", LaunchSpec(), label=LABEL)

    assert "112@7x8" in refused.value.message
    assert "Not enough available replicas" in refused.value.message
    assert not fake.deployments


async def test_a_malformed_offer_id_is_refused_before_any_call(
    provider: IoNetProvider, fake: IoNetFake
) -> None:
    with pytest.raises(InvalidArgument):
        await provider.create("hw-112", LaunchSpec(), label=LABEL)
    with pytest.raises(InvalidArgument):
        await provider.get("../deployments")
    assert not fake.requests


async def test_429_is_retried_after_backoff(provider: IoNetProvider, fake: IoNetFake) -> None:
    fake.throttle(2)

    deployment_id = await provider.create("57@3x1", LaunchSpec(), label=LABEL)

    assert len(fake.received("POST", "/caas/deploy")) == 3
    assert list(fake.deployments) == [deployment_id]


async def test_429_that_never_stops_is_unavailable(
    provider: IoNetProvider, fake: IoNetFake
) -> None:
    fake.throttle(1000)

    with pytest.raises(Unavailable, match="429"):
        await provider.search(OfferQuery())

    assert len(fake.requests) == 3


async def test_an_answer_slower_than_the_timeout_is_unavailable(fake: IoNetFake) -> None:
    fake.delay = 0.5
    ionet = provider_for(fake, timeout=0.1)
    try:
        with pytest.raises(Unavailable, match="within"):
            await ionet.get("0b6c5bd4-9a51-4c0e-8b0e-3d7f6f1d2a10")
    finally:
        await ionet.close()


async def test_io_net_that_cannot_be_reached_is_unavailable() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    ionet = IoNetProvider("k", base_url=f"http://127.0.0.1:{port}", timeout=1.0)
    try:
        with pytest.raises(Unavailable, match="cannot be reached"):
            await ionet.list()
    finally:
        await ionet.close()


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_is_a_failed_precondition_that_never_shows_the_key(
    fake: IoNetFake, status: int
) -> None:
    key = "ionet-secret-key-0c1d2e3f"
    if status == 403:
        fake.forbidden_keys.add(key)
    ionet = IoNetProvider(key, base_url=fake.url, max_attempts=1)
    try:
        with pytest.raises(FailedPrecondition) as refused:
            await ionet.create("57@3x1", LaunchSpec(), label=LABEL)
        with pytest.raises(FailedPrecondition) as listing:
            await ionet.search(OfferQuery())
    finally:
        await ionet.close()

    for error in (refused.value, listing.value):
        assert f"({status})" in error.message
        assert "IONET_API_KEY" in error.message
        assert key not in str(error)


def test_from_env_without_a_key_offers_no_provider() -> None:
    assert IoNetProvider.from_env({}) is None
    assert IoNetProvider.from_env({"IONET_API_KEY": "  "}) is None


async def test_from_env_reads_key_url_and_duration(fake: IoNetFake) -> None:
    ionet = IoNetProvider.from_env(
        {"IONET_API_KEY": fake.api_key, "IONET_API_URL": fake.url, "IONET_DURATION_HOURS": "6"}
    )
    assert ionet is not None
    try:
        await ionet.create("57@3x1", LaunchSpec(), label=LABEL)
    finally:
        await ionet.close()

    (deploy,) = fake.received("POST", "/caas/deploy")
    assert deploy.body["duration_hours"] == 6


def test_from_env_refuses_a_duration_that_is_not_whole_hours() -> None:
    with pytest.raises(ConfigError) as wrong:
        IoNetProvider.from_env({"IONET_API_KEY": "k", "IONET_DURATION_HOURS": "0.5"})
    assert wrong.value.field == "IONET_DURATION_HOURS"
