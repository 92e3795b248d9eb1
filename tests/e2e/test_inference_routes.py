"""Where a request may go without a rental: shared static endpoints (to everyone, or to the
roles and accounts they name), called with their own configured key, on a private network
the operator allowed; and model names as callers use them: aliases and fallback chains."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import openai
import pytest

from schemas.subjects import WorkerKind
from simulator.upstream import DEFAULT_MODEL
from tests.e2e.machines import sdk, served, sim_machine
from tests.e2e.system import System, operator_key, running_system
from tests.providers.test_sim_upstream import Server
from workers.common.static_endpoints import load_endpoints
from workers.proxy.config import ProxyConfig
from workers.proxy.model_routes import ModelRoutes

LAB_KEY = "sk-lab-0123456789abcdef"
PROMPT = [{"role": "user", "content": "hello"}]


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    with ExitStack() as stack:
        lab = stack.enter_context(sim_machine(tmp_path, "--api-key", LAB_KEY))
        other = stack.enter_context(sim_machine(tmp_path, "--model", "sim-other"))
        yield lab, other


@pytest.fixture
async def system(
    nats_url: str, migrated_database: str, machines: tuple[Server, Server]
) -> AsyncIterator[System]:
    lab, other = machines
    endpoints = [
        {
            "name": "lab",
            "url": lab.url,
            "gpu_model": "RTX 4090",
            "price_per_hour": "0.35",
            "api_key_env": "LAB_KEY",
            "shared": True,
        },
        {
            "name": "reserved-for-someone",
            "url": other.url,
            "gpu_model": "RTX 4090",
            "price_per_hour": "0.35",
            "shared": True,
            "shared_with": ["u-someone-else"],
        },
    ]
    config = ProxyConfig(
        static_endpoints=tuple(
            load_endpoints({"GPUPROXY_STATIC_ENDPOINTS": json.dumps(endpoints), "LAB_KEY": LAB_KEY})
        ),
        upstream_allow="127.0.0.0/8",
        model_routes=ModelRoutes(aliases={"fast": DEFAULT_MODEL}, fallbacks={"sim-gone": ["fast"]}),
    )
    async with running_system(
        nats_url, migrated_database, kinds=(WorkerKind.PROXY,), proxying=config
    ) as running:
        yield running


@pytest.fixture
async def user(
    system: System, nats_url: str, migrated_database: str
) -> AsyncIterator[openai.AsyncOpenAI]:
    _, key, _ = await operator_key(nats_url, migrated_database, role="user")
    async with openai.AsyncOpenAI(
        base_url=f"{system.http_base}/v1", api_key=key, max_retries=0, timeout=30
    ) as client:
        yield client


async def test_a_shared_endpoint_serves_an_account_that_rented_nothing_with_its_own_key(
    system: System, user: openai.AsyncOpenAI
) -> None:
    async with sdk(system) as admin:
        await served(admin, DEFAULT_MODEL)
    answer = await user.chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT, max_tokens=3)
    listed = {m.id for m in (await user.models.list()).data}
    assert answer.choices[0].message.content
    assert listed == {DEFAULT_MODEL, "fast"}  # not sim-other: shared with someone else


async def test_an_endpoint_shared_with_others_is_not_this_accounts(
    system: System, user: openai.AsyncOpenAI
) -> None:
    async with sdk(system) as admin:
        await served(admin, "sim-other")  # an admin reaches every machine
    with pytest.raises(openai.NotFoundError):
        await user.chat.completions.create(model="sim-other", messages=PROMPT, max_tokens=3)


async def test_an_alias_and_a_fallback_reach_the_model_that_is_served(
    system: System, user: openai.AsyncOpenAI
) -> None:
    async with sdk(system) as admin:
        await served(admin, DEFAULT_MODEL)
    by_alias = await user.chat.completions.create(model="fast", messages=PROMPT, max_tokens=3)
    by_fallback = await user.chat.completions.create(
        model="sim-gone", messages=PROMPT, max_tokens=3
    )
    assert by_alias.model == by_fallback.model == DEFAULT_MODEL
    assert by_alias.choices[0].message.content == by_fallback.choices[0].message.content
