"""The official `openai` SDK against the gateway: a reserved `sim` machine answers chat,
completions, embeddings, responses and models, streamed and whole, through the bus and the
proxy worker; every request leaves one priced `usage.inference` event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
from nats.aio.client import Client

from schemas import topology
from schemas.gpus import Instance
from schemas.prices import DEFAULT_PRICES, cost_micros
from simulator.upstream import DEFAULT_MODEL
from tests.e2e.machines import usage_events
from tests.e2e.system import System, operator_key, running_system
from tests.provisioner.harness import fast_config
from workers.proxy.config import ProxyConfig

PROMPT = [{"role": "user", "content": "tell me about rivers"}]


SECRET = b"a test secret that is long enough for machine keys"


@pytest.fixture
async def system(nats_url: str, migrated_database: str, tmp_path: Path) -> AsyncIterator[System]:
    """The whole system, its machines started with their own API keys."""
    async with running_system(
        nats_url,
        migrated_database,
        provisioning=fast_config(tmp_path / "sim", upstream_secret=SECRET),
        proxying=ProxyConfig(upstream_secret=SECRET),
    ) as running:
        yield running


@pytest.fixture
async def reserved(system: System, http: httpx.AsyncClient) -> dict[str, Any]:
    answer = await http.post(
        "/api/v1/gpu/instances/reserve",
        json={"count": 1, "filters": {"provider": "sim"}, "lease_seconds": 600},
        headers={"x-api-key": system.api_key},
    )
    assert answer.status_code == 201, answer.text
    reservation: dict[str, Any] = answer.json()["reservation"]
    return reservation


@pytest.fixture
async def served(system: System, reserved: dict[str, Any]) -> AsyncIterator[openai.AsyncOpenAI]:
    """An SDK client for the admin's key, once a reserved sim machine serves the model."""
    client = openai.AsyncOpenAI(
        base_url=f"{system.http_base}/v1", api_key=system.api_key, max_retries=0, timeout=30
    )
    for _ in range(200):
        listed = await client.models.list()
        if any(m.id == DEFAULT_MODEL for m in listed.data):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the reserved machine never served its model")
    yield client
    await client.close()


async def test_a_machine_answers_the_gateway_but_not_a_caller_who_found_its_address(
    served: openai.AsyncOpenAI, reserved: dict[str, Any], nc: Client
) -> None:
    instance_id = reserved["instances"][0]["id"]
    kv = await nc.jetstream().key_value(topology.INSTANCES_BUCKET)
    entry = await kv.get(instance_id)
    assert entry.value is not None
    endpoint = msgspec.json.decode(entry.value, type=Instance).endpoint
    assert reserved["instances"][0]["endpoint"] == f"instance://{instance_id}"
    async with httpx.AsyncClient(timeout=10) as direct:
        bypass = await direct.post(
            f"{endpoint}/v1/chat/completions",
            json={"model": DEFAULT_MODEL, "messages": PROMPT, "max_tokens": 2},
        )
    through = await served.chat.completions.create(
        model=DEFAULT_MODEL, messages=PROMPT, max_tokens=2
    )
    assert bypass.status_code == 401
    assert through.choices[0].message.content


async def test_chat_whole_and_streamed_give_the_same_tokens_and_cost(
    served: openai.AsyncOpenAI,
) -> None:
    raw = await served.chat.completions.with_raw_response.create(
        model=DEFAULT_MODEL, messages=PROMPT, max_tokens=8, seed=7
    )
    whole = raw.parse()
    stream = await served.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=PROMPT,
        max_tokens=8,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        pieces.extend(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage

    assert whole.choices[0].message.content == "".join(pieces)
    assert whole.usage is not None
    assert usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens == 8
    assert int(raw.headers["x-gpuproxy-cost-micros"]) == (usage.model_extra or {})["cost_micros"]


async def test_a_stream_without_asking_for_usage_shows_no_usage(
    served: openai.AsyncOpenAI,
) -> None:
    stream = await served.chat.completions.create(
        model=DEFAULT_MODEL, messages=PROMPT, max_tokens=4, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


async def test_completions_whole_and_streamed(served: openai.AsyncOpenAI) -> None:
    whole = await served.completions.create(model=DEFAULT_MODEL, prompt="once", max_tokens=5)
    stream = await served.completions.create(
        model=DEFAULT_MODEL, prompt="once", max_tokens=5, stream=True
    )
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert whole.choices[0].text == text
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 5


async def test_embeddings(served: openai.AsyncOpenAI) -> None:
    made = await served.embeddings.create(model=DEFAULT_MODEL, input=["a", "b"])
    assert [d.index for d in made.data] == [0, 1]
    assert made.data[0].embedding != made.data[1].embedding


async def test_responses_whole_and_streamed(served: openai.AsyncOpenAI) -> None:
    whole = await served.responses.create(
        model=DEFAULT_MODEL, input="tell me about rivers", max_output_tokens=6, store=False
    )
    stream = await served.responses.create(
        model=DEFAULT_MODEL,
        input="tell me about rivers",
        max_output_tokens=6,
        store=False,
        stream=True,
    )
    deltas, completed = [], None
    async for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type in ("response.completed", "response.incomplete"):
            completed = event.response
    assert whole.output_text == "".join(deltas)
    assert completed is not None
    assert completed.usage is not None
    assert whole.usage is not None
    assert completed.usage.output_tokens == whole.usage.output_tokens


async def test_an_unknown_model_is_404_in_openai_shape_and_nothing_runs(
    served: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        await served.chat.completions.create(model="no-such-model", messages=PROMPT)
    assert raised.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await served.chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT, max_tokens=0)
    assert bad.value.param == "max_tokens"


async def test_every_request_leaves_one_priced_usage_event(
    served: openai.AsyncOpenAI, nc: Client
) -> None:
    made = await served.chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT, max_tokens=3)
    assert made.usage is not None
    seen = await usage_events(nc)
    mine = [e for e in seen if e.usage.output_tokens == 3]
    assert len(mine) == 1
    price = DEFAULT_PRICES.get(DEFAULT_MODEL)
    assert price is not None
    assert mine[0].outcome == "completed"
    assert mine[0].cost_micros == cost_micros(
        price,
        input_tokens=made.usage.prompt_tokens,
        cached_tokens=0,
        output_tokens=made.usage.completion_tokens,
    )


async def test_an_instance_an_admin_shares_serves_every_account(
    system: System,
    http: httpx.AsyncClient,
    served: openai.AsyncOpenAI,
    reserved: dict[str, Any],
    nats_url: str,
    migrated_database: str,
) -> None:
    instance_id = reserved["instances"][0]["id"]
    _, key, _ = await operator_key(nats_url, migrated_database, role="user")
    async with openai.AsyncOpenAI(
        base_url=f"{system.http_base}/v1", api_key=key, max_retries=0, timeout=30
    ) as user:
        with pytest.raises(openai.NotFoundError):
            await user.chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT)
        refused = await http.post(
            f"/api/v1/gpu/instances/{instance_id}/share",
            json={"shared": True},
            headers={"x-api-key": key},
        )
        shared = await http.post(
            f"/api/v1/gpu/instances/{instance_id}/share",
            json={"shared": True},
            headers={"x-api-key": system.api_key},
        )
        assert shared.status_code == 200, shared.text
        for _ in range(100):
            if (await user.models.list()).data:
                break
            await asyncio.sleep(0.05)
        answer = await user.chat.completions.create(
            model=DEFAULT_MODEL, messages=PROMPT, max_tokens=2
        )
    assert refused.status_code == 403
    assert shared.status_code == 200, shared.text
    assert shared.json()["instance"]["shared"] is True
    assert answer.choices[0].message.content
