"""A proxy worker process killed mid-request: before the first token the request completes on
another worker and is billed once; after it the client gets an error within seconds, and the
request is never run a second time (billed at most once, for what was delivered)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from nats.aio.client import Client

from simulator.upstream import DEFAULT_MODEL
from tests.e2e.machines import register, sdk, served, sim_machine, usage_events
from tests.e2e.processes import gpuproxy, gpuproxy_env
from tests.e2e.system import System, running_system
from tests.providers.test_sim_upstream import Server

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "tell me about rivers"}]


@pytest.fixture
async def gateway(nats_url: str, migrated_database: str) -> AsyncIterator[System]:
    async with running_system(nats_url, migrated_database, kinds=()) as system:
        yield system


async def in_flight(machine: Server) -> int:
    async with httpx.AsyncClient(timeout=5) as http:
        return int((await http.get(f"{machine.url}/sim/stats")).json()["in_flight"])


async def until(check: object, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "did not happen in time"
        await asyncio.sleep(0.05)


async def test_a_worker_killed_before_the_first_token_hands_the_request_to_another(
    gateway: System, nc: Client, nats_url: str, tmp_path: Path
) -> None:
    env = gpuproxy_env(tmp_path, NATS_URL=nats_url, GPUPROXY_PROXY_ACK_WAIT="1.5")
    with sim_machine(tmp_path, "--ttft-ms", "2000") as machine:
        await register(nc, machine, owner=gateway.admin_id)
        async with sdk(gateway, timeout=60) as client:
            with gpuproxy(["worker", "proxy"], env, tmp_path / "first.log") as first:
                await served(client, DEFAULT_MODEL)
                call = asyncio.create_task(
                    client.chat.completions.create(
                        model=DEFAULT_MODEL, messages=PROMPT, max_tokens=4, stream=True
                    )
                )
                await until(lambda: _busy(machine))
                first.send_signal(signal.SIGKILL)
                first.wait()
            with gpuproxy(["worker", "proxy"], env, tmp_path / "second.log"):
                stream = await asyncio.wait_for(call, 60)
                text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert len(text.split()) == 4
    recorded = await usage_events(nc)
    assert [e.outcome for e in recorded] == ["completed"]


async def test_a_worker_killed_after_the_first_token_ends_the_stream_and_never_runs_again(
    gateway: System, nc: Client, nats_url: str, tmp_path: Path
) -> None:
    env = gpuproxy_env(tmp_path, NATS_URL=nats_url, GPUPROXY_PROXY_ACK_WAIT="1.5")
    with sim_machine(tmp_path, "--token-delay-ms", "400") as machine:
        await register(nc, machine, owner=gateway.admin_id)
        async with sdk(gateway, timeout=60) as client:
            with gpuproxy(["worker", "proxy"], env, tmp_path / "first.log") as first:
                await served(client, DEFAULT_MODEL)
                stream = await client.chat.completions.create(
                    model=DEFAULT_MODEL, messages=PROMPT, max_tokens=20, stream=True
                )
                pieces = stream.__aiter__()
                await anext(pieces)
                first.send_signal(signal.SIGKILL)
                first.wait()
                killed_at = time.monotonic()

                async def rest() -> None:
                    async for _ in pieces:
                        pass

                with pytest.raises(openai.APIError) as raised:
                    await rest()
                noticed = time.monotonic() - killed_at
            with gpuproxy(["worker", "proxy"], env, tmp_path / "second.log"):
                await asyncio.sleep(5)  # past the ack wait: the redelivery came and went
                async with httpx.AsyncClient(timeout=5) as http:
                    stats = (await http.get(f"{machine.url}/sim/stats")).json()
    assert "incomplete" in raised.value.message
    assert noticed < 10, noticed
    assert stats["in_flight"] == 0
    assert stats["requests"] == 1  # the redelivered command was not run again
    assert [e.outcome for e in await usage_events(nc)] == []  # the killed run recorded nothing


async def _busy(machine: Server) -> bool:
    return await in_flight(machine) == 1
