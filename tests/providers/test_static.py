"""The static provider: bring-your-own endpoints as offers of one, claimed in JetStream KV."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import uvicorn
from nats.aio.client import Client
from nats.js.kv import KeyValue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bus.topology import declare_bucket
from schemas.errors import ConfigError, FailedPrecondition, Unavailable
from schemas.gpus import GpuOffer, LaunchSpec, OfferQuery, ProviderName, label_of
from schemas.topology import STATIC_CLAIMS_BUCKET, static_claims_bucket
from tests.conftest import free_port
from workers.provisioner.providers.base import Machine, MachineStatus
from workers.provisioner.providers.static import (
    ENV_VAR,
    StaticEndpoint,
    StaticProvider,
    UpstreamKey,
    from_env,
    load_endpoints,
)

SECRET = "sk-upstream-do-not-leak-0123456789"

TOML = """
[[endpoints]]
name = "lab-4090"
url = "http://10.0.0.5:8000/"
gpu_model = "NVIDIA GeForce RTX 4090"
price_per_hour = "0.35"
location = "EU-DE"

[[endpoints]]
name = "rack_a100"
url = "https://llm.example.com/a100"
gpu_model = "A100-SXM4-80GB"
num_gpus = 4
price_per_hour = 7.2
api_key_env = "RACK_KEY"

[[endpoints]]
name = "mystery"
url = "http://mystery.local:11434"
gpu_model = "Frobnicator 3000"
vram_gb = 20
price_per_hour = 0
"""


def good(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "box",
        "url": "http://127.0.0.1:8000",
        "gpu_model": "RTX 3090",
        "price_per_hour": "0.2",
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def inline(*entries: dict[str, Any], **env: str) -> dict[str, str]:
    return {ENV_VAR: json.dumps(list(entries)), **env}


def endpoint(name: str, url: str = "http://127.0.0.1:1", price: int = 1_000_000) -> StaticEndpoint:
    return StaticEndpoint(
        name=name, url=url, gpu_model="RTX 4090", vram_gb=24, price_per_hour_micros=price
    )


# --- configuration ---------------------------------------------------------------------------


def test_a_toml_file_declares_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "static.toml"
    path.write_text(TOML)

    found = load_endpoints({ENV_VAR: str(path), "RACK_KEY": SECRET})

    assert found == [
        StaticEndpoint(
            name="lab-4090",
            url="http://10.0.0.5:8000",
            gpu_model="NVIDIA GeForce RTX 4090",
            vram_gb=24,
            price_per_hour_micros=350_000,
            location="EU-DE",
        ),
        StaticEndpoint(
            name="rack_a100",
            url="https://llm.example.com/a100",
            gpu_model="A100-SXM4-80GB",
            vram_gb=80,
            price_per_hour_micros=7_200_000,
            num_gpus=4,
            api_key_env="RACK_KEY",
            api_key=UpstreamKey(SECRET),
        ),
        StaticEndpoint(
            name="mystery",
            url="http://mystery.local:11434",
            gpu_model="Frobnicator 3000",
            vram_gb=20,
            price_per_hour_micros=0,
        ),
    ]
    assert found[1].api_key is not None
    assert found[1].api_key.reveal() == SECRET


def test_inline_json_declares_endpoints_with_exact_prices() -> None:
    raw = '[{"name": "a", "url": "http://h:1", "gpu_model": "L4", "price_per_hour": 0.1}, ' + (
        '{"name": "b", "url": "http://h:2", "gpu_model": "T4", "price_per_hour": 3}]'
    )

    found = load_endpoints({ENV_VAR: f"  {raw}\n"})

    assert [(e.name, e.vram_gb, e.price_per_hour_micros) for e in found] == [
        ("a", 24, 100_000),
        ("b", 16, 3_000_000),
    ]


@pytest.mark.parametrize("value", [None, "", "   "])
def test_nothing_configured_means_no_provider(value: str | None) -> None:
    env = {} if value is None else {ENV_VAR: value}

    assert load_endpoints(env) == []
    assert from_env(env, claims=None) is None  # type: ignore[arg-type]


def test_an_empty_list_means_no_provider() -> None:
    assert from_env({ENV_VAR: "[]"}, claims=None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (good(name=None), "endpoints[1].name is required"),
        (good(name="a.b"), "endpoints[1].name must be 1-64 letters, digits, '_' or '-'"),
        (good(name=7), "endpoints[1].name must be a string"),
        (good(name="first"), "endpoints[1].name 'first' is already used by endpoints[0]"),
        (good(url=None), "endpoints[1].url is required"),
        (good(url="ftp://h/x"), "endpoints[1].url must be an http:// or https:// URL"),
        (good(url="http://:80"), "endpoints[1].url must be an http:// or https:// URL"),
        (good(url="http://h:99999"), "endpoints[1].url is not a valid URL"),
        (good(url="http://h:8000/v1/"), "endpoints[1].url must be the server's base URL"),
        (good(url="http://h:8000/?x=1"), "endpoints[1].url must not have a query"),
        (good(gpu_model=None), "endpoints[1].gpu_model is required"),
        (
            good(gpu_model="Frobnicator 3000"),
            "endpoints[1].vram_gb is required: the GPU catalogue does not know",
        ),
        (good(num_gpus=0), "endpoints[1].num_gpus must be a whole number from 1 to"),
        (good(num_gpus="2"), "endpoints[1].num_gpus must be a whole number"),
        (good(vram_gb=True), "endpoints[1].vram_gb must be a whole number"),
        (good(price_per_hour=None), "endpoints[1].price_per_hour is required"),
        (good(price_per_hour="-0.01"), "endpoints[1].price_per_hour must not be negative"),
        (good(price_per_hour=-1), "endpoints[1].price_per_hour must not be negative"),
        (good(price_per_hour="cheap"), "endpoints[1].price_per_hour must be a decimal number"),
        (good(price_per_hour="NaN"), "endpoints[1].price_per_hour must be a finite number"),
        (good(price_per_hour=True), "endpoints[1].price_per_hour must be a decimal number"),
        (good(price_per_hour=[1]), "endpoints[1].price_per_hour must be a decimal number"),
        (
            good(price_per_hour="0.0000001"),
            "endpoints[1].price_per_hour has more than 6 decimal places",
        ),
        (good(price_per_hour="1e9"), "endpoints[1].price_per_hour must be at most"),
        (good(location=3), "endpoints[1].location must be a string"),
        (good(prce_per_hour="1"), "endpoints[1] has unknown key 'prce_per_hour'"),
        (good(api_key_env="NOT_SET_ANYWHERE"), "endpoints[1].api_key_env names NOT_SET_ANYWHERE"),
        (good(api_key_env="bad name"), "endpoints[1].api_key_env must be the name of"),
        ("box", "endpoints[1] must be a table of settings"),
    ],
)
def test_a_bad_entry_is_named_with_the_key_at_fault(entry: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_endpoints(inline(good(name="first"), entry))

    assert caught.value.field == ENV_VAR
    assert caught.value.message.startswith(message)


def test_a_key_written_into_the_configuration_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_endpoints(inline(good(api_key=SECRET)))

    assert caught.value.message.startswith("endpoints[0].api_key: the key itself does not")
    assert "api_key_env" in caught.value.message
    assert SECRET not in str(caught.value)


def test_credentials_in_a_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as caught:
        load_endpoints(inline(good(url=f"https://user:{SECRET}@llm.example.com")))

    assert caught.value.message.startswith("endpoints[0].url must not carry credentials")
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("[[endpoints]\nname =", "is not valid TOML"),
        ('[[endpoint]]\nname = "a"\n', "has unknown top-level key 'endpoint'"),
        ('endpoints = "a"\n', "endpoints must be an array of tables"),
    ],
)
def test_a_bad_toml_file_is_named(tmp_path: Path, document: str, message: str) -> None:
    path = tmp_path / "static.toml"
    path.write_text(document)

    with pytest.raises(ConfigError, match=message) as caught:
        load_endpoints({ENV_VAR: str(path)})

    assert str(path) in caught.value.message
    assert caught.value.field == ENV_VAR


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(ConfigError) as caught:
        load_endpoints({ENV_VAR: str(missing)})

    assert caught.value.message == f"names {missing}, which cannot be read (FileNotFoundError)"


@pytest.mark.parametrize("raw", ["[{", "[1, 2"])
def test_bad_inline_json_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="is not a valid JSON array of endpoints"):
        load_endpoints({ENV_VAR: raw})


def test_an_error_in_a_later_entry_does_not_carry_an_earlier_key(tmp_path: Path) -> None:
    env = inline(good(name="a", api_key_env="UPSTREAM"), good(name="b", price_per_hour="-1"))

    with pytest.raises(ConfigError) as caught:
        load_endpoints({**env, "UPSTREAM": SECRET})

    assert caught.value.message == "endpoints[1].price_per_hour must not be negative"
    assert SECRET not in repr(caught.value)


def test_the_upstream_key_never_shows_in_a_repr() -> None:
    [found] = load_endpoints({**inline(good(api_key_env="UPSTREAM")), "UPSTREAM": SECRET})

    assert found.api_key is not None
    for shown in (repr(found), str(found), repr([found]), repr(found.api_key), f"{found.api_key}"):
        assert SECRET not in shown
    assert "<upstream key>" in repr(found)


# --- the provider ------------------------------------------------------------------------------


@pytest.fixture
async def connections(nats_url: str) -> AsyncIterator[tuple[Client, Client]]:
    """Two connections, as two provisioner replicas would have."""
    first = await nats.connect(nats_url)
    second = await nats.connect(nats_url)
    yield first, second
    await first.close()
    await second.close()


async def bucket(nc: Client) -> KeyValue:
    return await declare_bucket(nc.jetstream(), static_claims_bucket())


@pytest.fixture
async def claims(connections: tuple[Client, Client]) -> KeyValue:
    return await bucket(connections[0])


ENDPOINTS = [
    endpoint("b-cheap", url="http://127.0.0.1:9001", price=500_000),
    endpoint("a-dear", url="http://127.0.0.1:9002", price=2_000_000),
    StaticEndpoint(
        name="rack",
        url="http://127.0.0.1:9003",
        gpu_model="Instinct MI250X",
        vram_gb=128,
        price_per_hour_micros=1_000_000,
        num_gpus=2,
        location="US-TX",
    ),
]
SPEC = LaunchSpec()


async def test_the_bucket_is_the_declared_one(claims: KeyValue) -> None:
    status = await claims.status()

    assert status.bucket == STATIC_CLAIMS_BUCKET


async def test_search_offers_every_free_endpoint_by_price(claims: KeyValue) -> None:
    provider = StaticProvider(ENDPOINTS, claims)

    offers = await provider.search(OfferQuery())

    assert [o.offer_id for o in offers] == ["b-cheap", "rack", "a-dear"]
    assert offers[1] == GpuOffer(
        provider=ProviderName.STATIC,
        offer_id="rack",
        gpu_model="MI250X",
        num_gpus=2,
        vram_gb=128,
        price_per_hour_micros=1_000_000,
        location="US-TX",
        vendor="amd",
        tier="high_end",
    )
    assert (offers[0].vendor, offers[0].tier) == ("nvidia", "mid_range")


async def test_search_leaves_out_claimed_endpoints(claims: KeyValue) -> None:
    provider = StaticProvider(ENDPOINTS, claims)

    await provider.create("rack", SPEC, label=label_of("i-1"))

    assert [o.offer_id for o in await provider.search(OfferQuery())] == ["b-cheap", "a-dear"]


async def test_create_returns_the_endpoint_name_and_get_reports_it_running(
    claims: KeyValue,
) -> None:
    provider = StaticProvider(ENDPOINTS, claims)

    provider_id = await provider.create("a-dear", SPEC, label=label_of("i-7"))

    assert provider_id == "a-dear"
    assert await provider.get("a-dear") == Machine(
        provider_id="a-dear",
        label="gpuproxy-i-7",
        status=MachineStatus.RUNNING,
        endpoint="http://127.0.0.1:9002",
    )
    assert await provider.get("b-cheap") is None


async def test_a_second_claim_of_one_endpoint_fails(claims: KeyValue) -> None:
    provider = StaticProvider(ENDPOINTS, claims)
    await provider.create("rack", SPEC, label=label_of("i-1"))

    with pytest.raises(FailedPrecondition, match="offer rack is already taken"):
        await provider.create("rack", SPEC, label=label_of("i-2"))

    machine = await provider.get("rack")
    assert machine is not None
    assert machine.label == "gpuproxy-i-1"


async def test_an_unknown_offer_cannot_be_created(claims: KeyValue) -> None:
    provider = StaticProvider(ENDPOINTS, claims)

    with pytest.raises(FailedPrecondition, match="offer nope is not a configured static"):
        await provider.create("nope", SPEC, label=label_of("i-1"))


@pytest.mark.parametrize("after_a_release", [False, True])
async def test_two_replicas_racing_for_one_endpoint_have_exactly_one_winner(
    connections: tuple[Client, Client], after_a_release: bool
) -> None:
    replicas = [StaticProvider(ENDPOINTS, await bucket(nc)) for nc in connections]
    if after_a_release:
        # A released claim leaves a delete marker: re-claiming takes another path in KV.
        await replicas[0].create("rack", SPEC, label=label_of("i-0"))
        await replicas[1].destroy("rack")

    results = await asyncio.gather(
        *(r.create("rack", SPEC, label=label_of(f"i-{n}")) for n, r in enumerate(replicas, 1)),
        return_exceptions=True,
    )

    assert sorted(type(r).__name__ for r in results) == ["FailedPrecondition", "str"]
    winner = next(n for n, r in enumerate(results, 1) if r == "rack")
    for replica in replicas:
        machine = await replica.get("rack")
        assert machine is not None
        assert machine.label == label_of(f"i-{winner}")


async def test_many_creates_on_many_endpoints_claim_each_once(
    connections: tuple[Client, Client],
) -> None:
    many = [endpoint(f"e{n}") for n in range(8)]
    replicas = [StaticProvider(many, await bucket(nc)) for nc in connections]

    results = await asyncio.gather(
        *(
            replica.create(e.name, SPEC, label=label_of(f"i-{e.name}-{n}"))
            for e in many
            for n, replica in enumerate(replicas)
        ),
        return_exceptions=True,
    )

    assert sorted(r for r in results if isinstance(r, str)) == [e.name for e in many]
    assert sum(isinstance(r, FailedPrecondition) for r in results) == len(many)
    assert await replicas[1].search(OfferQuery()) == []


async def test_list_reports_every_claim_and_destroy_releases_it(claims: KeyValue) -> None:
    provider = StaticProvider(ENDPOINTS, claims)
    assert await provider.list() == []
    await provider.create("rack", SPEC, label=label_of("i-1"))
    await provider.create("b-cheap", SPEC, label="someone-elses")

    listed = await provider.list()

    assert [(m.provider_id, m.label, m.status) for m in listed] == [
        ("b-cheap", "someone-elses", MachineStatus.RUNNING),
        ("rack", "gpuproxy-i-1", MachineStatus.RUNNING),
    ]

    await provider.destroy("rack")

    assert await provider.get("rack") is None
    assert [m.provider_id for m in await provider.list()] == ["b-cheap"]
    assert "rack" in {o.offer_id for o in await provider.search(OfferQuery())}


@pytest.mark.parametrize("provider_id", ["rack", "never-claimed", "not a name", "a.b.>"])
async def test_destroying_what_is_gone_counts_as_destroyed(
    claims: KeyValue, provider_id: str
) -> None:
    provider = StaticProvider(ENDPOINTS, claims)
    await provider.create("rack", SPEC, label=label_of("i-1"))
    await provider.destroy("rack")

    await provider.destroy(provider_id)

    assert await provider.get(provider_id) is None


async def test_a_claim_on_an_endpoint_no_longer_configured_still_lists_and_destroys(
    claims: KeyValue,
) -> None:
    before = StaticProvider(ENDPOINTS, claims)
    await before.create("rack", SPEC, label=label_of("i-1"))
    after = StaticProvider(ENDPOINTS[:2], claims)

    assert await after.list() == [
        Machine(
            provider_id="rack",
            label="gpuproxy-i-1",
            status=MachineStatus.STOPPED,
            message="endpoint rack is no longer configured",
        )
    ]

    await after.destroy("rack")

    assert await after.list() == []


async def test_from_env_builds_the_provider_on_the_bucket(claims: KeyValue) -> None:
    provider = from_env(inline(good(name="one")), claims)

    assert provider is not None
    assert provider.name is ProviderName.STATIC
    assert [o.offer_id for o in await provider.search(OfferQuery())] == ["one"]
    await provider.close()


async def test_a_bus_that_cannot_be_reached_is_unavailable(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    provider = StaticProvider(ENDPOINTS, await bucket(nc))
    await nc.close()

    with pytest.raises(Unavailable, match="static endpoints: cannot claim an endpoint"):
        await provider.create("rack", SPEC, label=label_of("i-1"))
    with pytest.raises(Unavailable, match="cannot list claims"):
        await provider.search(OfferQuery())


# --- readiness against a real local server ----------------------------------------------------


class Upstream:
    """A tiny OpenAI-compatible server: `/v1/models`, behind a bearer key when given one."""

    def __init__(self, key: str = "") -> None:
        self.key = key
        self.seen_authorization: list[str] = []
        self.app = Starlette(routes=[Route("/v1/models", self.models)])

    async def models(self, request: Request) -> JSONResponse:
        given = request.headers.get("authorization", "")
        self.seen_authorization.append(given)
        if self.key and given != f"Bearer {self.key}":
            return JSONResponse({"error": "unauthorised"}, status_code=401)
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})


class _QuietServer(uvicorn.Server):
    # The test process owns the signals.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(upstream: Upstream) -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn.Config(
        upstream.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none"
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


def running(provider_id: str, url: str) -> Machine:
    return Machine(
        provider_id=provider_id, label=label_of("i-1"), status=MachineStatus.RUNNING, endpoint=url
    )


async def test_ready_sends_the_configured_key(claims: KeyValue) -> None:
    upstream = Upstream(key=SECRET)
    async with serving(upstream) as port:
        url = f"http://127.0.0.1:{port}"
        [configured] = load_endpoints(
            {**inline(good(name="keyed", url=url, api_key_env="UPSTREAM")), "UPSTREAM": SECRET}
        )
        provider = StaticProvider([configured], claims)
        await provider.create("keyed", SPEC, label=label_of("i-1"))
        machine = await provider.get("keyed")
        assert machine is not None

        assert await provider.ready(machine)
        assert upstream.seen_authorization == [f"Bearer {SECRET}"]


async def test_ready_without_the_key_is_refused_by_a_keyed_server(claims: KeyValue) -> None:
    upstream = Upstream(key=SECRET)
    async with serving(upstream) as port:
        url = f"http://127.0.0.1:{port}"
        provider = StaticProvider([endpoint("plain", url=url)], claims)

        assert not await provider.ready(running("plain", url))
        assert upstream.seen_authorization == [""]


async def test_ready_answers_for_an_endpoint_without_a_key(claims: KeyValue) -> None:
    async with serving(Upstream()) as port:
        url = f"http://127.0.0.1:{port}"
        provider = StaticProvider([endpoint("plain", url=url)], claims)

        assert await provider.ready(running("plain", url))
        assert not await provider.ready(
            Machine(provider_id="plain", label="x", status=MachineStatus.STOPPED, endpoint=url)
        )


async def test_the_key_goes_only_to_the_configured_url(claims: KeyValue) -> None:
    upstream = Upstream(key=SECRET)
    async with serving(upstream) as port:
        configured = StaticEndpoint(
            name="keyed",
            url=f"http://127.0.0.1:{port}",
            gpu_model="L4",
            vram_gb=24,
            price_per_hour_micros=0,
            api_key_env="UPSTREAM",
            api_key=UpstreamKey(SECRET),
        )
        provider = StaticProvider([configured], claims)

        assert not await provider.ready(running("keyed", f"http://localhost:{port}"))
        assert upstream.seen_authorization == [""]


async def test_ready_is_false_when_nothing_answers(claims: KeyValue) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    keyed = StaticEndpoint(
        name="keyed",
        url=url,
        gpu_model="L4",
        vram_gb=24,
        price_per_hour_micros=0,
        api_key=UpstreamKey(SECRET),
    )
    provider = StaticProvider([keyed, endpoint("plain", url=url)], claims)

    assert not await provider.ready(running("keyed", url), timeout=1.0)
    assert not await provider.ready(running("plain", url), timeout=1.0)
