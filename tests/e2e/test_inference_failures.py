"""Inference when machines fail or clients leave: a stream cut or a machine dying mid-answer
ends in an error event, never a quiet success, and still records what was delivered; a
machine that refuses before answering is passed over; a client that leaves closes the
machine's connection at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest
from nats.aio.client import Client

from schemas.events import InstanceCircuitChanged
from schemas.subjects import WorkerKind
from simulator.upstream import DEFAULT_MODEL
from tests.e2e.machines import (
    ask_repeatedly,
    events_of,
    register,
    sdk,
    served,
    sim_machine,
    usage_events,
)
from tests.e2e.system import System, running_system
from tests.providers.test_sim_upstream import Server
from workers.proxy.usage import estimate_tokens

PROMPT = [{"role": "user", "content": "tell me about rivers"}]


@pytest.fixture
async def proxied(nats_url: str, migrated_database: str) -> AsyncIterator[System]:
    async with running_system(nats_url, migrated_database, kinds=(WorkerKind.PROXY,)) as system:
        yield system


@asynccontextmanager
async def beside_a_healthy_one(
    proxied: System, nc: Client, tmp_path: Path, mode: str
) -> AsyncIterator[tuple[Server, str, openai.AsyncOpenAI]]:
    """A machine failing in `mode` and a healthy one, both serving; the failing one, its
    instance id, and an SDK client."""
    with (
        sim_machine(tmp_path, "--fail", mode) as failing,
        sim_machine(tmp_path) as healthy,
    ):
        failing_id = await register(nc, failing, owner=proxied.admin_id)
        await register(nc, healthy, owner=proxied.admin_id)
        async with sdk(proxied) as client:
            await served(client, DEFAULT_MODEL, count=2)
            yield failing, failing_id, client


async def requests_seen(machine: Server) -> int:
    async with httpx.AsyncClient(timeout=5) as http:
        return int((await http.get(f"{machine.url}/sim/stats")).json()["requests"])


@pytest.mark.parametrize("mode", ["cut", "die"])
async def test_a_machine_failing_mid_stream_ends_in_an_error_event_and_bills_what_was_sent(
    proxied: System, nc: Client, tmp_path: Path, mode: str
) -> None:
    with sim_machine(tmp_path, "--fail", mode, "--fail-after", "3") as machine:
        await register(nc, machine, owner=proxied.admin_id)
        async with sdk(proxied) as client:
            await served(client, DEFAULT_MODEL)
            stream = await client.chat.completions.create(
                model=DEFAULT_MODEL, messages=PROMPT, max_tokens=10, stream=True
            )
            pieces: list[str] = []

            async def read_all() -> None:
                async for chunk in stream:
                    pieces.extend(c.delta.content or "" for c in chunk.choices)

            with pytest.raises(openai.APIError) as raised:
                await read_all()

    assert "incomplete" in raised.value.message
    assert len([p for p in pieces if p]) == 3
    recorded = await usage_events(nc)
    assert [e.outcome for e in recorded] == ["failed"]
    # Counted by the proxy's rule, from exactly the three pieces the client received.
    assert recorded[0].usage.output_tokens == sum(estimate_tokens(p) for p in pieces if p)
    assert recorded[0].usage.estimated


async def test_a_machine_that_refuses_is_passed_over_before_anything_is_sent(
    proxied: System, nc: Client, tmp_path: Path
) -> None:
    async with beside_a_healthy_one(proxied, nc, tmp_path, "refuse") as (_, _, client):
        answers = await ask_repeatedly(client, 4)
    assert all(a.choices[0].message.content for a in answers)


async def test_a_client_that_leaves_closes_the_machines_connection_at_once(
    proxied: System, nc: Client, tmp_path: Path
) -> None:
    with sim_machine(tmp_path, "--token-delay-ms", "2000") as machine:
        await register(nc, machine, owner=proxied.admin_id)
        async with sdk(proxied) as client:
            await served(client, DEFAULT_MODEL)
        async with (
            httpx.AsyncClient(base_url=proxied.http_base, timeout=10) as http,
            http.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": DEFAULT_MODEL, "messages": PROMPT, "max_tokens": 5, "stream": True},
                headers={"authorization": f"Bearer {proxied.api_key}"},
            ) as response,
        ):
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if '"content"' in line and '"content":""' not in line:
                    break
        left_at = time.time()
        async with httpx.AsyncClient(base_url=machine.url, timeout=5) as direct:
            for _ in range(100):
                stats = (await direct.get("/sim/stats")).json()
                if stats["disconnected"]:
                    break
                await asyncio.sleep(0.02)
    assert stats["disconnected"] == 1
    noticed = stats["last_disconnect_at"] - left_at
    print(f"the machine saw the client leave {noticed * 1000:.1f} ms after it left")
    # The promise is 100 ms; the bound is loose for a loaded test machine, and still far
    # below what a leak costs (the answer's remaining 8 s).
    assert noticed < 1.0
    recorded = await usage_events(nc)
    assert [e.outcome for e in recorded] == ["cancelled"]


async def test_a_machine_that_says_too_many_requests_is_left_alone_as_long_as_it_asked(
    proxied: System, nc: Client, tmp_path: Path
) -> None:
    async with beside_a_healthy_one(proxied, nc, tmp_path, "throttle") as (throttled, _, client):
        answers = await ask_repeatedly(client, 6)
        asked = await requests_seen(throttled)
    assert all(a.choices[0].message.content for a in answers)
    assert asked == 1  # it said Retry-After: 30; round robin alone would have asked it thrice


async def test_a_machine_that_keeps_failing_is_taken_out_and_the_change_is_an_event(
    proxied: System, nc: Client, tmp_path: Path
) -> None:
    async with beside_a_healthy_one(proxied, nc, tmp_path, "refuse") as (
        failing,
        failing_id,
        client,
    ):
        await ask_repeatedly(client, 14)
        asked = await requests_seen(failing)
        changes = await circuit_events(nc)
    assert asked == 5  # five failures in a row open its breaker: no sixth request
    assert [(c.instance_id, c.state) for c in changes] == [(failing_id, "open")]


async def circuit_events(nc: Client) -> list[InstanceCircuitChanged]:
    await asyncio.sleep(1.5)  # the replicas' next tick publishes the change
    return await events_of(nc, "instance", "circuit_changed", InstanceCircuitChanged)


async def test_requests_a_machine_refuses_as_malformed_do_not_count_against_it(
    proxied: System, nc: Client, tmp_path: Path
) -> None:
    with sim_machine(tmp_path) as machine:
        await register(nc, machine, owner=proxied.admin_id)
        async with sdk(proxied) as client:
            await served(client, DEFAULT_MODEL)
            for _ in range(6):  # the machine answers 400: no messages
                with pytest.raises(openai.BadRequestError):
                    await client.chat.completions.create(model=DEFAULT_MODEL, messages=[])
        changes = await circuit_events(nc)
    assert changes == []  # six of the client's mistakes open nothing
