"""What the inference scenarios run: `sim` machines, and gpuproxy in front of them.

`sim_machines` starts `gpuproxy sim-upstream` processes, each on its own port. `gateway_in_front`
runs the rest as a deployment does, one process per part: nats-server, `gpuproxy gateway`
and one `gpuproxy worker proxy`; it makes the first admin and an API key over HTTP as an
operator would, and records the machines as the admin's running `sim` instances in the
registry, as the provisioner does once a machine boots (no provisioner runs: its reconciler
would rightly fail machines its marketplace never made). It is ready once `/v1/models` lists
the model on every machine, that is once the proxy has asked each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from bench.processes import child_env, child_process, free_port, nats_server, tail
from bus.connection import connect
from bus.topology import declare_bucket
from gpuproxy import first_admin, migrate
from schemas import topology
from schemas.gpus import Instance, InstanceState, ProviderName
from simulator.upstream import DEFAULT_MODEL

STARTUP_SECONDS = 60.0
"""Python processes importing gpuproxy on a busy two-core machine can take a while."""
PROFILE_VARIABLE = "GPUPROXY_BENCH_PROFILE"
"""A folder: the gateway and the proxy worker then run under cProfile and leave their
`gateway.prof` and `proxy.prof` there when they stop (`python -m pstats` reads them)."""
_PROFILED = """
import cProfile, runpy, sys, time
out = sys.argv.pop(1)
# CPU time, not wall time: on a shared two-core machine a process's wall time includes every
# moment another process held the CPU, which a wall-clock profile blames on whatever call was
# running (typically the socket write that woke the next process on the path).
profiler = cProfile.Profile(time.process_time)
try:
    profiler.runcall(runpy.run_module, "gpuproxy", run_name="__main__", alter_sys=True)
finally:
    profiler.dump_stats(out)
"""


class NotReady(RuntimeError):
    pass


@dataclass(frozen=True)
class Machine:
    """One `gpuproxy sim-upstream` process."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def sim_machines(workdir: Path, count: int, options: Sequence[str]) -> Iterator[list[Machine]]:
    """`count` sim machines started with `options`; they stop with the block (or with us)."""
    with contextlib.ExitStack() as stack:
        machines = []
        for index in range(count):
            port = free_port()
            log = workdir / f"sim-{index}.log"
            command = [
                *[sys.executable, "-m", "gpuproxy", "sim-upstream", "--port", str(port)],
                *["--owner-pid", str(os.getpid()), *options],
            ]
            process = stack.enter_context(child_process(command, env=child_env(), log_path=log))
            machines.append(Machine(port, process, log))
        yield machines


async def wait_answering(http: aiohttp.ClientSession, machines: Sequence[Machine]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    for machine in machines:
        while True:
            if machine.process.poll() is not None:
                raise NotReady(f"sim-upstream exited:\n{tail(machine.log)}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{machine.url}/health") as answer:
                    if answer.status == 200:
                        break
            if time.monotonic() > deadline:
                raise NotReady(f"sim-upstream not answering within {STARTUP_SECONDS:.0f} s")
            await asyncio.sleep(0.05)


async def machine_stats(http: aiohttp.ClientSession, machine: Machine) -> dict[str, Any]:
    """The machine's own counters (`GET /sim/stats`): requests, cached and prompt tokens."""
    async with http.get(f"{machine.url}/sim/stats") as answer:
        stats: dict[str, Any] = await answer.json()
        return stats


@dataclass(frozen=True)
class Gateway:
    """gpuproxy running in front of the machines, and the admin's key for it."""

    http_base: str
    api_key: str
    user_id: str
    processes: Mapping[str, int]
    """Name -> pid of gpuproxy's own processes, for CPU accounting."""

    @property
    def openai_base(self) -> str:
        return f"{self.http_base}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}


@contextlib.asynccontextmanager
async def gateway_in_front(
    workdir: Path,
    machines: Sequence[Machine],
    http: aiohttp.ClientSession,
    *,
    proxies: int = 1,
    settings: Mapping[str, str] | None = None,
) -> AsyncIterator[Gateway]:
    """gpuproxy in front of `machines` with `proxies` proxy workers; `settings` are more
    environment variables for gpuproxy's processes (`GPUPROXY_WORKER_WINDOW=...`). A machine
    listed twice is recorded as two instances, each with its own pool in the proxy."""
    http_port = free_port()
    operator = {
        "GPUPROXY_ADMIN_EMAIL": "bench@gpuproxy.local",
        "GPUPROXY_ADMIN_PASSWORD": secrets.token_urlsafe(18),
    }
    with nats_server(workdir) as server:
        env = child_env(
            NATS_URL=server.url,
            DATABASE_URL=f"sqlite+aiosqlite:///{workdir / 'i.db'}",
            GPUPROXY_DATA_DIR=str(workdir),
            GPUPROXY_BIND="127.0.0.1",
            SERVER_PORT=str(http_port),
            GRPC_PORT=str(free_port()),
            LOG_LEVEL="warning",
            JWT_SECRET=secrets.token_urlsafe(48),
            **(settings or {}),
        )
        database_url = env["DATABASE_URL"]
        await asyncio.to_thread(migrate.upgrade, database_url)
        await asyncio.to_thread(first_admin.ensure, database_url, operator)
        workers = [f"proxy-{n}" if n else "proxy" for n in range(proxies)]
        logs = {name: workdir / f"{name}.log" for name in [*workers, "gateway"]}
        # Entered in this order, left in the reverse: the gateway stops before the workers.
        with contextlib.ExitStack() as stack:
            watched = {
                name: stack.enter_context(
                    child_process(_gpuproxy(name, "worker", "proxy"), env=env, log_path=logs[name])
                )
                for name in workers
            }
            watched["gateway"] = stack.enter_context(
                child_process(_gpuproxy("gateway", "gateway"), env=env, log_path=logs["gateway"])
            )
            base = f"http://127.0.0.1:{http_port}"
            pids = {name: p.pid for name, p in watched.items()} | {"nats-server": server.pid}
            try:
                await asyncio.gather(
                    wait_answering(http, machines), _wait_ready(http, base, watched)
                )
                user_id, api_key = await _admin_key(http, base, operator)
                await _register(server.url, machines, owner=user_id)
                ready = Gateway(base, api_key, user_id, pids)
                await _wait_served(http, ready, len(machines), watched)
            except NotReady as exc:
                found = "\n".join(f"--- {name}:\n{tail(path)}" for name, path in logs.items())
                raise NotReady(f"{exc}\n{found}") from None
            yield ready


def _gpuproxy(name: str, *args: str) -> list[str]:
    profile = os.environ.get(PROFILE_VARIABLE, "").strip()
    if not profile:
        return [sys.executable, "-m", "gpuproxy", *args]
    out = Path(profile) / f"{name}.prof"
    return [sys.executable, "-c", _PROFILED, str(out), *args]


def _exited(watched: Mapping[str, subprocess.Popen[bytes]]) -> str | None:
    for name, process in watched.items():
        if process.poll() is not None:
            return f"{name} exited with {process.returncode}"
    return None


async def _wait_ready(
    http: aiohttp.ClientSession, base: str, watched: Mapping[str, subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if gone := _exited(watched):
            raise NotReady(gone)
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{base}/readyz") as answer:
                if answer.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise NotReady(f"the gateway was not ready within {STARTUP_SECONDS:.0f} s")


async def _admin_key(
    http: aiohttp.ClientSession, base: str, operator: Mapping[str, str]
) -> tuple[str, str]:
    """Log in as the first admin and make a key without a rate limit of its own."""
    credentials = {
        "email": operator["GPUPROXY_ADMIN_EMAIL"],
        "password": operator["GPUPROXY_ADMIN_PASSWORD"],
    }
    async with http.post(f"{base}/api/v1/auth/login", json=credentials) as answer:
        grant = await _json(answer, "log in")
    async with http.post(
        f"{base}/api/v1/auth/apikey",
        json={"name": "bench", "rate_limit_per_minute": 0},
        headers={"authorization": f"Bearer {grant['access_token']}"},
    ) as answer:
        made = await _json(answer, "make an API key")
    return str(grant["user_id"]), str(made["api_key"])


async def _json(answer: aiohttp.ClientResponse, what: str) -> dict[str, Any]:
    if answer.status >= 300:
        raise NotReady(f"could not {what}: HTTP {answer.status}: {(await answer.text())[:300]}")
    found: dict[str, Any] = await answer.json()
    return found


async def _register(nats_url: str, machines: Sequence[Machine], *, owner: str) -> None:
    """Record each machine as a running `sim` instance of `owner`."""
    nc = await connect(nats_url, name="bench-registry")
    try:
        kv = await declare_bucket(nc.jetstream(), topology.instances_bucket())
        now = int(time.time() * 1000)
        for machine in machines:
            instance_id = f"i-{uuid.uuid4().hex[:12]}"
            record = Instance(
                id=instance_id,
                owner=owner,
                provider=ProviderName.SIM,
                offer_id="bench",
                state=InstanceState.RUNNING,
                provider_id=f"bench-{machine.port}",
                endpoint=machine.url,
                price_per_hour_micros=1_000_000,
                vram_gb=24,
                created_at_ms=now,
                state_since_ms=now,
            )
            await kv.put(instance_id, msgspec.json.encode(record))
    finally:
        await nc.drain()


async def _wait_served(
    http: aiohttp.ClientSession,
    gateway: Gateway,
    count: int,
    watched: Mapping[str, subprocess.Popen[bytes]],
) -> None:
    """Until `/v1/models` lists the model on `count` machines: the proxy has asked them all."""
    deadline = time.monotonic() + STARTUP_SECONDS
    last = "no answer"
    while time.monotonic() < deadline:
        if gone := _exited(watched):
            raise NotReady(gone)
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{gateway.openai_base}/models", headers=gateway.headers) as got:
                last = f"HTTP {got.status}: {(await got.text())[:200]}"
                if got.status == 200:
                    listed = msgspec.json.decode(await got.read())["data"]
                    if any(m["id"] == DEFAULT_MODEL and m["instances"] >= count for m in listed):
                        return
        await asyncio.sleep(0.1)
    raise NotReady(f"{DEFAULT_MODEL} not served by {count} machines in time (last: {last})")
