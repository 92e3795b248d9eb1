"""`python -m bench.upstream_client`: httpx against aiohttp as the proxy's upstream client.

The proxy worker forwards every inference request over a pooled keep-alive client; which
library it uses was chosen with this script. It starts one `gpuproxy sim-upstream` in a child
process and, for each library, posts chat completions over one pool of keep-alive
connections: whole answers and streamed ones (server-sent events read as they arrive), at
concurrency 1 and 32, 16 tokens each. Rounds alternate the libraries so a noisy neighbour
hurts both alike; the report gives the median requests per second and the client's own CPU
time per request (what the proxy worker pays; the server's share is the same for both).

The figures that chose aiohttp (2 CPUs shared with the server, 3 rounds of 3 s):

    mode     conc  library     req/s  client CPU us/req  vs httpx
    whole       1  httpx         496               1609   1.00x
    whole       1  aiohttp      1217                345   2.45x
    whole      32  httpx         350               2780   1.00x
    whole      32  aiohttp      1978                262   5.65x
    stream      1  httpx         348               2321   1.00x
    stream      1  aiohttp       564                974   1.62x
    stream     32  httpx         154               6454   1.00x
    stream     32  aiohttp       637                817   4.13x
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import msgspec
import uvloop

from bench.processes import child_env, child_process, free_port, tail

TOKENS = 16
CONCURRENCIES = (1, 32)
READY_SECONDS = 20.0

Call = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Figure:
    library: str
    streamed: bool
    concurrency: int
    requests_per_s: float
    client_cpu_us: float


def body(streamed: bool) -> bytes:
    return msgspec.json.encode(
        {
            "model": "sim-llama-3-8b",
            "messages": [{"role": "user", "content": "Say something about GPUs."}],
            "max_tokens": TOKENS,
            "stream": streamed,
        }
    )


def check(answer: bytes, streamed: bool) -> None:
    ok = answer.endswith(b"data: [DONE]\n\n") if streamed else answer.startswith(b"{")
    if not ok:
        raise RuntimeError(f"unexpected answer: {answer[:200]!r}")


@contextlib.asynccontextmanager
async def httpx_calls(url: str, streamed: bool) -> AsyncIterator[Call]:
    limits = httpx.Limits(max_connections=max(CONCURRENCIES), max_keepalive_connections=64)
    payload = body(streamed)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:

        async def call() -> None:
            async with client.stream("POST", url, content=payload, headers=headers) as response:
                chunks = [chunk async for chunk in response.aiter_bytes()]
            check(b"".join(chunks), streamed)

        yield call


@contextlib.asynccontextmanager
async def aiohttp_calls(url: str, streamed: bool) -> AsyncIterator[Call]:
    payload = body(streamed)
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=max(CONCURRENCIES), use_dns_cache=False)
    timeout = aiohttp.ClientTimeout(total=30.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def call() -> None:
            async with session.post(url, data=payload, headers=headers) as response:
                chunks = [chunk async for chunk in response.content.iter_any()]
            check(b"".join(chunks), streamed)

        yield call


CLIENTS = {"httpx": httpx_calls, "aiohttp": aiohttp_calls}


async def measure(call: Call, concurrency: int, seconds: float) -> tuple[float, float]:
    """Requests per second and client CPU microseconds per request over `seconds`."""
    for _ in range(concurrency * 4):  # warm the pool: every connection opened and reused
        await asyncio.gather(*(call() for _ in range(concurrency)))
    done = 0
    stop_at = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    return done / elapsed, cpu / done * 1e6


async def run(port: int, libraries: list[str], rounds: int, seconds: float) -> list[Figure]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    samples: dict[tuple[str, bool, int], list[tuple[float, float]]] = {}
    for index in range(rounds):
        # Alternate which library goes first so drift in the machine's load hurts both alike.
        order = libraries if index % 2 == 0 else list(reversed(libraries))
        for streamed in (False, True):
            for concurrency in CONCURRENCIES:
                for library in order:
                    async with CLIENTS[library](url, streamed) as call:
                        figure = await measure(call, concurrency, seconds)
                    samples.setdefault((library, streamed, concurrency), []).append(figure)
                    print(
                        f"round {index + 1}: {library:8} {'stream' if streamed else 'whole':6} "
                        f"c={concurrency:<3} {figure[0]:8.0f} req/s {figure[1]:6.0f} us CPU/req",
                        file=sys.stderr,
                    )
    return [
        Figure(
            library=library,
            streamed=streamed,
            concurrency=concurrency,
            requests_per_s=statistics.median(rps for rps, _ in values),
            client_cpu_us=statistics.median(cpu for _, cpu in values),
        )
        for (library, streamed, concurrency), values in samples.items()
    ]


async def wait_ready(port: int) -> None:
    deadline = time.monotonic() + READY_SECONDS
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)


def render(figures: list[Figure]) -> str:
    lines = [
        f"{'mode':8} {'conc':>4}  {'library':8} {'req/s':>8} {'client CPU us/req':>18}  vs httpx"
    ]
    base = {(f.streamed, f.concurrency): f for f in figures if f.library == "httpx"}
    for f in sorted(figures, key=lambda f: (f.streamed, f.concurrency, f.library != "httpx")):
        ref = base.get((f.streamed, f.concurrency))
        versus = f"{f.requests_per_s / ref.requests_per_s:5.2f}x" if ref else "-"
        lines.append(
            f"{'stream' if f.streamed else 'whole':8} {f.concurrency:>4}  {f.library:8} "
            f"{f.requests_per_s:8.0f} {f.client_cpu_us:18.0f}  {versus}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream_client", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    libraries = list(CLIENTS)
    port = free_port()
    command = [sys.executable, "-m", "gpuproxy", "sim-upstream", "--port", str(port)]
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "sim-upstream.log"
        with child_process(command, env=child_env(), log_path=log):
            try:
                uvloop.run(wait_ready(port))
                figures = uvloop.run(run(port, libraries, args.rounds, args.seconds))
            except Exception:
                print(tail(log), file=sys.stderr)
                raise
    print(render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
