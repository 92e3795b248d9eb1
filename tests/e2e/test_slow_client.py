"""A slow client of a long stream holds back the worker and the machine, not the memory: the
gateway and proxy processes stay flat while a client takes a piece a quarter second from an
answer the machine could send in one burst."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client

from gpuproxy import migrate
from simulator.upstream import DEFAULT_MODEL
from tests.e2e.machines import register, sim_machine
from tests.e2e.processes import gpuproxy, parts_env, wait_serving
from tests.e2e.system import operator_key

pytestmark = pytest.mark.slow

TOKENS = 400_000
"""About 60 MB of server-sent events: more than every buffer on the way (the kernel's socket
buffers alone hold several MB on loopback) could take, so the machine can only be held back."""
READ_SECONDS = 12.0


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_a_slow_reader_keeps_gateway_and_worker_memory_flat(
    nats_url: str, nc: Client, tmp_path: Path
) -> None:
    env, target = parts_env(tmp_path, nats_url)
    await asyncio.to_thread(migrate.upgrade, env["DATABASE_URL"])
    admin_id, key, _ = await operator_key(nats_url, env["DATABASE_URL"])
    with (
        sim_machine(tmp_path) as machine,
        gpuproxy(["gateway"], env, tmp_path / "gateway.log") as gateway,
        gpuproxy(["worker", "proxy"], env, tmp_path / "proxy.log") as worker,
    ):
        await asyncio.to_thread(wait_serving, target, gateway, tmp_path / "gateway.log")
        await register(nc, machine, owner=admin_id)
        base = f"http://127.0.0.1:{env['SERVER_PORT']}"
        headers = {"authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            for _ in range(200):
                listed = (await http.get("/v1/models", headers=headers)).json()
                if listed.get("data"):
                    break
                await asyncio.sleep(0.1)
            body = {
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "go on and on"}],
                "max_tokens": TOKENS,
                "ignore_eos": True,
                "stream": True,
            }
            # One short stream first: code paths and pools warm, so what grows later is the
            # answer being held.
            warm = {**body, "max_tokens": 50}
            async with http.stream("POST", "/v1/chat/completions", json=warm, headers=headers) as r:
                async for _ in r.aiter_raw():
                    pass
            await asyncio.sleep(1)
            before = (resident_mb(gateway.pid), resident_mb(worker.pid))
            samples: list[tuple[float, float]] = []
            taken = 0
            async with http.stream(
                "POST", "/v1/chat/completions", json=body, headers=headers
            ) as response:
                assert response.status_code == 200
                pieces = response.aiter_raw(1024)
                loop = asyncio.get_running_loop()
                started = loop.time()
                while loop.time() - started < READ_SECONDS:
                    taken += len(await anext(pieces))
                    samples.append((resident_mb(gateway.pid), resident_mb(worker.pid)))
                    await asyncio.sleep(0.25)
                async with httpx.AsyncClient(timeout=5) as direct:
                    held = (await direct.get(f"{machine.url}/sim/stats")).json()["in_flight"]
    gateway_growth = max(g for g, _ in samples) - before[0]
    worker_growth = max(w for _, w in samples) - before[1]
    print(
        f"read {taken} bytes; growth: gateway {gateway_growth:.1f} MB, "
        f"worker {worker_growth:.1f} MB"
    )
    assert held == 1  # the machine is held back too: its answer is not done after seconds
    assert gateway_growth < 4.0
    assert worker_growth < 4.0
