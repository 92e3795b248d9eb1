"""The vast.ai adapter against a local fake of vast.ai's REST API (`tests/fakes/vastai.py`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from schemas.errors import ConfigError, FailedPrecondition, InvalidArgument, Unavailable
from schemas.gpus import GpuOffer, LaunchSpec, OfferQuery, ProviderName, label_of
from tests.fakes.vastai import FakeVastAi
from workers.provisioner.providers.base import Machine, MachineStatus
from workers.provisioner.providers.vastai import (
    DEFAULT_DISK_GB,
    DEFAULT_IMAGE,
    VastAiProvider,
    countries_of,
    from_env,
    location_of,
    machine_of,
)

KEY = "vk-2f9c41d07e5b4a6c"
LABEL = label_of("i-0a1b2c")


@pytest.fixture
async def fake() -> AsyncIterator[FakeVastAi]:
    async with FakeVastAi(KEY) as server:
        yield server


@pytest.fixture
async def vast(fake: FakeVastAi) -> AsyncIterator[VastAiProvider]:
    provider = VastAiProvider(KEY, base_url=fake.url, timeout=2.0, backoff=0.01)
    yield provider
    await provider.close()


async def poll_until_running(vast: VastAiProvider, provider_id: str) -> list[Machine]:
    seen = []
    for _ in range(10):
        machine = await vast.get(provider_id)
        assert machine is not None
        seen.append(machine)
        if machine.status is MachineStatus.RUNNING:
            return seen
    raise AssertionError(f"never running: {seen}")


# -- search ---------------------------------------------------------------------------------


async def test_search_maps_each_offer_to_a_gpu_offer(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101)
    fake.add_offer(102, gpu_name="A100 SXM4", num_gpus=2, gpu_ram=81920, dph_total=2.9)

    offers = await vast.search(OfferQuery())

    assert offers[0] == GpuOffer(
        provider=ProviderName.VASTAI,
        offer_id="101",
        gpu_model="RTX 4090",
        num_gpus=1,
        vram_gb=24,
        price_per_hour_micros=412_300,
        location="US-WA",
        metadata={
            "reliability": "0.9987",
            "inet_down": "912.5",
            "inet_up": "640.2",
            "cpu_cores": "16",
            "cpu_ram": "64000",
            "disk_space": "200",
            "geolocation": "Washington, US",
            "machine_id": "601",
            "cuda_max_good": "12.4",
            "rental": "on-demand",
        },
    )
    assert (offers[1].offer_id, offers[1].num_gpus, offers[1].vram_gb) == ("102", 2, 80)
    assert offers[1].price_per_hour_micros == 2_900_000
    assert fake.requests[0].authorization == f"Bearer {KEY}"


async def test_search_turns_dollars_into_exact_micros_without_float_error(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    # Each of these times 1e6 in float arithmetic misses the integer (412299.99999999994, ...).
    for ask, price in ((1, 0.4123), (2, 2.675), (3, 1.0020740740740741), (4, 0.29)):
        fake.add_offer(ask, dph_total=price)

    offers = await vast.search(OfferQuery())

    prices = {o.offer_id: o.price_per_hour_micros for o in offers}
    assert prices == {"1": 412_300, "2": 2_675_000, "3": 1_002_074, "4": 290_000}


async def test_search_sends_every_filter_it_can_to_vast(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(1, num_gpus=2, dph_total=0.45)
    fake.add_offer(2, num_gpus=1, dph_total=0.30)  # too few GPUs
    fake.add_offer(3, num_gpus=2, dph_total=0.55)  # too dear
    fake.add_offer(4, num_gpus=2, gpu_ram=12288, dph_total=0.20)  # too little memory
    fake.add_offer(5, num_gpus=4, geolocation="Quebec, CA", dph_total=0.25)  # elsewhere

    offers = await vast.search(
        OfferQuery(min_vram_gb=24, max_price_micros=500_000, min_gpus=2, location="us", limit=5)
    )

    assert [o.offer_id for o in offers] == ["1"]
    assert fake.bodies("POST", "/bundles/") == [
        {
            "verified": {"eq": True},
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "order": [["dph_total", "asc"]],
            "type": "on-demand",
            "limit": 5,
            "gpu_ram": {"gte": 24064},
            "dph_total": {"lte": 0.5},
            "num_gpus": {"gte": 2},
            "geolocation": {"eq": "US"},
        }
    ]


async def test_search_by_gpu_model_looks_past_cheaper_models(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    for ask in range(1, 6):
        fake.add_offer(ask, gpu_name="RTX 3060", gpu_ram=12288, dph_total=0.05)
    fake.add_offer(9, gpu_name="A100 SXM4", gpu_ram=81920, dph_total=1.2)

    offers = await vast.search(OfferQuery(gpu_model="a100", limit=2))

    assert [o.offer_id for o in offers] == ["9"]
    assert fake.bodies("POST", "/bundles/")[0]["limit"] >= 1000


async def test_search_leaves_vendor_and_tier_to_the_gpu_catalogue(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(1, gpu_name="H100 SXM")

    [offer] = await vast.search(OfferQuery(vendor="nvidia", tier="enterprise"))

    assert (offer.vendor, offer.tier) == ("", "")
    assert set(fake.bodies("POST", "/bundles/")[0]) == {
        "verified",
        "rentable",
        "rented",
        "order",
        "type",
        "limit",
    }


async def test_search_in_a_region_asks_vast_for_its_countries(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(1, geolocation="Bavaria, DE")
    fake.add_offer(2, geolocation="Texas, US")
    fake.add_offer(3, geolocation="Singapore, SG")

    offers = await vast.search(OfferQuery(location="EU"))

    assert [(o.offer_id, o.location) for o in offers] == [("1", "EU-DE")]
    sent = fake.bodies("POST", "/bundles/")[0]["geolocation"]
    assert "DE" in sent["in"]
    assert "US" not in sent["in"]


@pytest.mark.parametrize(
    ("geolocation", "location"),
    [
        ("Texas, US", "US-TX"),
        ("New York, US", "US-NY"),
        ("US", "US"),
        ("Germany, DE", "EU-DE"),
        ("Singapore, SG", "AP-SG"),
        ("Quebec, CA", "CA-Quebec"),
        ("somewhere", "somewhere"),
        (None, ""),
    ],
)
def test_vast_geolocation_becomes_a_location_like_the_simulators(
    geolocation: str | None, location: str
) -> None:
    assert location_of(geolocation) == location


@pytest.mark.parametrize(
    ("location", "countries"),
    [("US-TX", ["US"]), ("eu-de", ["DE"]), ("CA", ["CA"]), ("E", []), ("", [])],
)
def test_a_location_prefix_is_sent_as_the_countries_it_can_match(
    location: str, countries: list[str]
) -> None:
    assert countries_of(location) == countries


# -- create ---------------------------------------------------------------------------------


async def test_create_passes_image_env_ports_label_and_disk_through(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101)
    spec = LaunchSpec(
        image="vllm/vllm-openai:v0.6.3",
        env={"HF_TOKEN": "hf_secret", "MODEL": "Qwen/Qwen2.5-0.5B"},
        ports=(9000, 8000),
        disk_gb=50,
    )

    provider_id = await vast.create("101", spec, label=LABEL)

    assert provider_id == "7000001"
    assert fake.bodies("PUT", "/asks/101/") == [
        {
            "client_id": "me",
            "image": "vllm/vllm-openai:v0.6.3",
            "env": {
                "-p 9000:9000": "1",
                "-p 8000:8000": "1",
                "HF_TOKEN": "hf_secret",
                "MODEL": "Qwen/Qwen2.5-0.5B",
            },
            "disk": 50,
            "label": LABEL,
            "runtype": "args",
        }
    ]


async def test_create_with_an_empty_spec_runs_the_default_server_on_port_8000(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101)

    await vast.create("101", LaunchSpec(), label=LABEL)

    [body] = fake.bodies("PUT", "/asks/101/")
    assert body["image"] == DEFAULT_IMAGE
    assert body["env"] == {"-p 8000:8000": "1"}
    assert body["disk"] == DEFAULT_DISK_GB
    assert "price" not in body


async def test_create_refuses_env_names_vast_would_read_as_docker_options(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101)

    with pytest.raises(InvalidArgument) as caught:
        await vast.create("101", LaunchSpec(env={"-v /:/host": "1"}), label=LABEL)

    assert caught.value.field == "env"
    assert fake.requests == []


@pytest.mark.parametrize("offer_id", ["", "abc", "101:bid=", "101:bid=-1", "101:bid=0", "1e3"])
async def test_create_refuses_an_offer_id_vast_never_gave(
    fake: FakeVastAi, vast: VastAiProvider, offer_id: str
) -> None:
    with pytest.raises(InvalidArgument):
        await vast.create(offer_id, LaunchSpec(), label=LABEL)

    assert fake.requests == []


async def test_create_of_an_offer_already_taken_names_the_offer(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101)
    fake.take(101)

    with pytest.raises(FailedPrecondition) as caught:
        await vast.create("101", LaunchSpec(), label=LABEL)

    assert "offer 101 is no longer available" in caught.value.message
    assert "no_such_ask" in caught.value.message  # vast.ai's own words follow


async def test_create_of_an_offer_vast_does_not_know_is_refused_as_taken(
    vast: VastAiProvider,
) -> None:
    with pytest.raises(FailedPrecondition, match="offer 555 is no longer available"):
        await vast.create("555", LaunchSpec(), label=LABEL)


# -- interruptible (bid) --------------------------------------------------------------------


async def test_interruptible_offers_carry_their_bid_and_create_bids_it(
    fake: FakeVastAi,
) -> None:
    fake.add_offer(101, min_bid=0.15)
    fake.add_offer(102)  # on-demand only
    vast = VastAiProvider(KEY, base_url=fake.url, interruptible=True)
    try:
        [offer] = await vast.search(OfferQuery())
        provider_id = await vast.create(offer.offer_id, LaunchSpec(), label=LABEL)
        machines = await poll_until_running(vast, provider_id)
    finally:
        await vast.close()

    assert (offer.offer_id, offer.price_per_hour_micros) == ("101:bid=0.15", 150_000)
    assert offer.metadata["rental"] == "interruptible"
    assert fake.bodies("POST", "/bundles/")[0]["type"] == "bid"
    assert fake.bodies("PUT", "/asks/101/")[0]["price"] == 0.15
    assert machines[-1].interruptible


async def test_an_outbid_instance_is_stopped_and_says_so(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101, min_bid=0.15)
    provider_id = await vast.create("101:bid=0.2", LaunchSpec(), label=LABEL)
    await poll_until_running(vast, provider_id)

    fake.outbid(int(provider_id))
    machine = await vast.get(provider_id)

    assert machine is not None
    assert machine.status is MachineStatus.STOPPED
    assert machine.message.startswith("outbid")


# -- status ---------------------------------------------------------------------------------


async def test_an_instance_goes_from_creating_to_running_with_its_endpoint(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101)
    provider_id = await vast.create("101", LaunchSpec(ports=(9000, 8000)), label=LABEL)

    seen = await poll_until_running(vast, provider_id)

    assert [m.status for m in seen] == [
        MachineStatus.CREATING,
        MachineStatus.CREATING,
        MachineStatus.RUNNING,
    ]
    assert [m.message for m in seen[:2]] == ["created", "loading"]
    assert all(m.endpoint == "" for m in seen[:2])
    # The first requested port is the API, mapped by vast.ai to a host port of its own.
    assert seen[-1].endpoint == f"http://127.0.0.1:{fake.host_port(int(provider_id), 9000)}"
    assert (seen[-1].provider_id, seen[-1].label) == (provider_id, LABEL)
    assert not seen[-1].interruptible


async def test_list_reports_every_machine_of_the_account(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101)
    fake.add_offer(102)
    ours = await vast.create("101", LaunchSpec(), label=LABEL)
    theirs = await vast.create("102", LaunchSpec(), label="someone-elses-notebook")

    machines = await vast.list()

    assert {(m.provider_id, m.label) for m in machines} == {
        (ours, LABEL),
        (theirs, "someone-elses-notebook"),
    }
    assert fake.requests[-1].query == {"owner": "me"}


async def test_an_exited_container_reports_vasts_message(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101)
    provider_id = await vast.create("101", LaunchSpec(), label=LABEL)
    await poll_until_running(vast, provider_id)

    fake.exit(int(provider_id), "Error response from daemon: manifest unknown")
    machine = await vast.get(provider_id)

    assert machine is not None
    assert machine.status is MachineStatus.EXITED
    assert machine.message == "Error response from daemon: manifest unknown"


async def test_get_of_an_instance_vast_no_longer_has_is_none(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101)
    provider_id = await vast.create("101", LaunchSpec(), label=LABEL)
    fake.vanish(int(provider_id))

    assert await vast.get(provider_id) is None
    assert await vast.list() == []


@pytest.mark.parametrize(
    ("row", "status", "message"),
    [
        ({"actual_status": None}, MachineStatus.CREATING, "being scheduled"),
        ({"actual_status": "scheduling"}, MachineStatus.CREATING, "scheduling"),
        ({"actual_status": "rebooting"}, MachineStatus.CREATING, "rebooting"),
        ({"actual_status": "offline"}, MachineStatus.EXITED, "its host went offline"),
        (
            {"actual_status": "unknown", "status_msg": "no heartbeat"},
            MachineStatus.EXITED,
            "no heartbeat",
        ),
        (
            {"actual_status": "stopped", "intended_status": "stopped"},
            MachineStatus.STOPPED,
            "stopped by the account or its host",
        ),
        ({"actual_status": "frozen"}, MachineStatus.STOPPED, "stopped by the account or its host"),
        (
            {"actual_status": "loading", "cur_state": "stopped", "is_bid": True},
            MachineStatus.STOPPED,
            "outbid: a higher bid took the machine of this interruptible instance",
        ),
        ({"actual_status": "running", "cur_state": "unloaded"}, None, ""),
    ],
)
def test_vast_status_words_fold_into_machine_statuses(
    row: dict[str, object], status: MachineStatus | None, message: str
) -> None:
    machine = machine_of({"id": 7, **row})

    if status is None:
        assert machine is None
    else:
        assert machine is not None
        assert (machine.status, machine.message) == (status, message)


# -- destroy --------------------------------------------------------------------------------


async def test_destroy_removes_the_instance_and_a_second_destroy_is_fine(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101)
    provider_id = await vast.create("101", LaunchSpec(), label=LABEL)

    await vast.destroy(provider_id)
    await vast.destroy(provider_id)

    assert fake.instances == {}
    assert await vast.get(provider_id) is None
    assert [(r.method, r.path) for r in fake.requests if r.method == "DELETE"] == [
        ("DELETE", f"/instances/{provider_id}/"),
        ("DELETE", f"/instances/{provider_id}/"),
    ]


# -- rate limits, timeouts, keys ------------------------------------------------------------


async def test_a_429_is_waited_out_as_retry_after_asks(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.add_offer(101)
    fake.throttle(2, retry_after=0.1)

    started = time.monotonic()
    offers = await vast.search(OfferQuery())

    assert [o.offer_id for o in offers] == ["101"]
    assert time.monotonic() - started >= 0.2
    assert len(fake.requests) == 3


async def test_429_past_the_backoff_budget_is_unavailable(fake: FakeVastAi) -> None:
    fake.throttle(100)
    vast = VastAiProvider(KEY, base_url=fake.url, max_attempts=3, backoff=0.01)
    try:
        with pytest.raises(Unavailable, match="429"):
            await vast.list()
    finally:
        await vast.close()

    assert len(fake.requests) == 3


async def test_an_answer_slower_than_the_timeout_is_unavailable(fake: FakeVastAi) -> None:
    fake.delay = 1.0
    vast = VastAiProvider(KEY, base_url=fake.url, timeout=0.2)
    try:
        with pytest.raises(Unavailable, match="did not answer"):
            await vast.search(OfferQuery())
    finally:
        await vast.close()


async def test_a_refused_key_is_reported_without_the_key(fake: FakeVastAi) -> None:
    wrong = "vk-WRONG-9e8d7c6b5a"
    fake.add_offer(101)
    vast = VastAiProvider(wrong, base_url=fake.url, backoff=0.01)
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: vast.search(OfferQuery()),
            lambda: vast.create("101", LaunchSpec(), label=LABEL),
            vast.list,
            lambda: vast.get("7000001"),
            lambda: vast.destroy("7000001"),
        ]
        errors = []
        for call in calls:
            with pytest.raises(FailedPrecondition) as caught:
                await call()
            errors.append(caught.value)
    finally:
        await vast.close()

    assert all("refused the API key (401)" in e.message for e in errors)
    for error in errors:
        assert wrong not in f"{error} {error!r} {error.to_info()}"
        assert error.__cause__ is None
    assert wrong not in repr(vast)
    assert all(r.authorization == f"Bearer {wrong}" for r in fake.requests)


async def test_a_5xx_is_unavailable_and_never_repeats_the_key(
    fake: FakeVastAi, vast: VastAiProvider
) -> None:
    fake.fail(1, 503, {"success": False, "msg": f"upstream failed for key {KEY}"})

    with pytest.raises(Unavailable) as caught:
        await vast.list()

    assert "503" in caught.value.message
    assert KEY not in caught.value.message


def test_interruptible_rentals_are_chosen_by_environment() -> None:
    with pytest.raises(ConfigError) as caught:
        from_env({"VASTAI_API_KEY": KEY, "VASTAI_INTERRUPTIBLE": "sometimes"})

    assert caught.value.field == "VASTAI_INTERRUPTIBLE"


async def test_from_env_searches_bid_prices_when_asked(fake: FakeVastAi) -> None:
    fake.add_offer(101, min_bid=0.15)
    vast = from_env(
        {"VASTAI_API_KEY": KEY, "VASTAI_API_URL": fake.url, "VASTAI_INTERRUPTIBLE": "true"}
    )
    assert vast is not None
    try:
        assert [o.offer_id for o in await vast.search(OfferQuery())] == ["101:bid=0.15"]
    finally:
        await vast.close()


def test_without_a_key_vast_is_not_offered() -> None:
    assert from_env({}) is None
    assert from_env({"VASTAI_API_KEY": ""}) is None
    assert from_env({"VASTAI_API_KEY": "  ", "VASTAI_API_URL": "http://x"}) is None


async def test_from_env_takes_the_key_and_the_url(fake: FakeVastAi) -> None:
    fake.add_offer(101)
    vast = from_env({"VASTAI_API_KEY": KEY, "VASTAI_API_URL": fake.url})
    assert vast is not None
    try:
        assert [o.offer_id for o in await vast.search(OfferQuery())] == ["101"]
    finally:
        await vast.close()
