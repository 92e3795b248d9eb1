"""Load balancing shared by proxy replicas: two `gpuproxy worker proxy` processes routing over
four machines keep each strategy's promise as one would, and the strategy and the load book
are read and set through both doors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from nats.aio.client import Client

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from simulator.upstream import DEFAULT_MODEL
from tests.e2e.machines import register, served, sim_machines
from tests.e2e.processes import gpuproxy, gpuproxy_env
from tests.e2e.system import System, running_system
from tests.providers.test_sim_upstream import Server

pytestmark = pytest.mark.slow

PRICES = [1_000_000, 2_000_000, 4_000_000, 4_000_000]
"""Hourly prices of the four machines (24 GB each): weights 4:2:1:1 by VRAM per price."""

TURNS = [
    "You are a careful assistant who answers questions about geography in detail.",
    "Which rivers cross the most countries, and why do their basins matter?",
    "And what about the deltas they form where they meet the sea?",
    "Summarise all of that in three sentences for a child.",
]


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[list[Server]]:
    with sim_machines(tmp_path, 4, "--token-delay-ms", "20") as started:
        yield started


@pytest.fixture
async def fleet(
    nats_url: str, migrated_database: str, nc: Client, tmp_path: Path, machines: list[Server]
) -> AsyncIterator[tuple[System, openai.AsyncOpenAI]]:
    """A gateway in the test, two proxy worker processes, four registered machines."""
    env = gpuproxy_env(tmp_path, NATS_URL=nats_url)
    async with running_system(nats_url, migrated_database, kinds=()) as system:
        with (
            gpuproxy(["worker", "proxy"], env, tmp_path / "proxy-a.log"),
            gpuproxy(["worker", "proxy"], env, tmp_path / "proxy-b.log"),
        ):
            for machine, price in zip(machines, PRICES, strict=True):
                await register(nc, machine, owner=system.admin_id, price_micros=price)
            async with openai.AsyncOpenAI(
                base_url=f"{system.http_base}/v1", api_key=system.api_key, max_retries=0
            ) as client:
                await served(client, DEFAULT_MODEL, count=4)
                await asyncio.sleep(1.5)  # both replicas have asked every machine
                yield system, client


async def choose(system: System, strategy: str) -> None:
    async with httpx.AsyncClient(base_url=system.http_base, timeout=10) as http:
        answer = await http.put(
            "/api/v1/loadbalancer/strategy",
            json={"strategy": strategy},
            headers={"x-api-key": system.api_key},
        )
    assert answer.status_code == 200, answer.text
    await asyncio.sleep(0.3)  # the other replica's watch


async def served_counts(machines: list[Server]) -> list[int]:
    async with httpx.AsyncClient(timeout=5) as http:
        return [(await http.get(f"{m.url}/sim/stats")).json()["requests"] for m in machines]


async def test_a_conversation_stays_on_one_machine_across_both_replicas(
    fleet: tuple[System, openai.AsyncOpenAI], machines: list[Server]
) -> None:
    system, client = fleet
    for number, strategy in enumerate(("session_affinity", "cache_aware")):
        await choose(system, strategy)
        before = await served_counts(machines)
        messages: list[dict[str, str]] = [{"role": "system", "content": f"conversation {number}"}]
        for turn in TURNS * 2:
            messages.append({"role": "user", "content": turn})
            answer = await client.chat.completions.create(
                model=DEFAULT_MODEL, messages=messages, max_tokens=3, user=f"conversation-{number}"
            )
            content = answer.choices[0].message.content or ""
            messages.append({"role": "assistant", "content": content})
        after = await served_counts(machines)
        shares = [b - a for a, b in zip(before, after, strict=True)]
        assert sorted(shares) == [0, 0, 0, len(TURNS) * 2], (strategy, shares)


async def test_least_connections_keeps_in_flight_even_under_steady_load(
    fleet: tuple[System, openai.AsyncOpenAI], machines: list[Server]
) -> None:
    system, client = fleet
    await choose(system, "least_connections")

    async def long_answer() -> None:
        stream = await client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "go on"}],
            max_tokens=100,
            stream=True,
        )
        async for _ in stream:
            pass

    running = []
    for _ in range(8):
        running.append(asyncio.create_task(long_answer()))
        await asyncio.sleep(0.15)  # steady arrivals, each routed knowing the others
    async with httpx.AsyncClient(timeout=5) as http:
        in_flight = [(await http.get(f"{m.url}/sim/stats")).json()["in_flight"] for m in machines]
    await asyncio.gather(*running)
    assert sum(in_flight) == 8
    assert max(in_flight) - min(in_flight) <= 1, in_flight


async def test_strategy_and_load_are_read_and_set_on_both_doors(
    fleet: tuple[System, openai.AsyncOpenAI],
) -> None:
    system, client = fleet
    await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    headers = {"x-api-key": system.api_key}
    async with (
        httpx.AsyncClient(base_url=system.http_base, timeout=10) as http,
        grpc.aio.insecure_channel(system.grpc_target) as channel,
    ):
        bad = await http.put(
            "/api/v1/loadbalancer/strategy", json={"strategy": "fastest"}, headers=headers
        )
        made_default = await http.put(
            "/api/v1/loadbalancer/strategy",
            json={"strategy": "least_cost", "scope": "default"},
            headers=headers,
        )
        stub = pb_grpc.GPUProxyServiceStub(channel)
        metadata = (("x-api-key", system.api_key),)
        set_over_grpc = await stub.SetLoadBalancerStrategy(
            pb.SetLoadBalancerStrategyRequest(strategy="power_of_two"), metadata=metadata
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SetLoadBalancerStrategy(
                pb.SetLoadBalancerStrategyRequest(strategy="fastest"), metadata=metadata
            )
        mine = (await http.get("/api/v1/loadbalancer/strategy", headers=headers)).json()
        loads = (await http.get("/api/v1/loadbalancer/loads", headers=headers)).json()
        one_id = loads["instances"][0]["instance_id"]
        one = await http.get(
            "/api/v1/loadbalancer/load", params={"instance_id": one_id}, headers=headers
        )
        over_grpc = await stub.GetLoadInfo(pb.GetLoadInfoRequest(type="all"), metadata=metadata)

    assert bad.status_code == 400
    assert bad.json()["error"]["field"] == "strategy"
    assert made_default.json() == {"strategy": "least_cost", "source": "default"}
    assert set_over_grpc.strategy == "power_of_two"
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert mine == {"strategy": "power_of_two", "source": "account"}
    assert len(loads["instances"]) == 4
    assert sum(row["routed"] for row in loads["instances"]) >= 1
    assert loads["providers"][0]["provider"] == "sim"
    assert [row["instance_id"] for row in one.json()["instances"]] == [one_id]
    assert over_grpc.current_strategy == "power_of_two"
    assert len(over_grpc.server_load) == 4


async def ask(client: openai.AsyncOpenAI, times: int) -> None:
    for _ in range(times):
        await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )


async def test_each_strategy_spreads_as_it_promises_over_both_replicas(
    fleet: tuple[System, openai.AsyncOpenAI], machines: list[Server]
) -> None:
    system, client = fleet
    shares: dict[str, list[int]] = {}
    for strategy in (
        "round_robin",
        "weighted_round_robin",
        "equal_weighted",
        "least_cost",
        "random",
        "power_of_two",
        "least_response_time",
    ):
        await choose(system, strategy)
        before = await served_counts(machines)
        await ask(client, 40)
        after = await served_counts(machines)
        shares[strategy] = [b - a for a, b in zip(before, after, strict=True)]
    assert all(sum(s) == 40 for s in shares.values()), shares
    # One rotation over both replicas: each routes knowing what the other routed.
    assert max(shares["round_robin"]) - min(shares["round_robin"]) <= 2
    weighted = shares["weighted_round_robin"]
    assert all(abs(got - want) <= 2 for got, want in zip(weighted, [20, 10, 5, 5], strict=True))
    assert max(shares["equal_weighted"]) - min(shares["equal_weighted"]) <= 2
    assert shares["least_cost"][0] == 40  # the cheapest machine, while it keeps up
    assert min(shares["random"]) >= 1
    assert sum(1 for n in shares["power_of_two"] if n) >= 2
