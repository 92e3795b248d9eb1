"""`python -m bench.reservations [--rounds N]`: how long a reservation on `sim` takes.

Baseline, measured in the same run: one sim machine started by hand (`gpuproxy sim-upstream`)
until its `/v1/models` answers, the least any reservation can cost. Then reservations of 1
and 4 instances through the provisioner (its real service, command runtime and the bus on a
fresh nats-server), each released before the next. Prints medians and ratios to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bus.caller import CommandCaller
from bus.connection import connect
from bus.runtime import CommandRuntime
from gpuproxy.natsd import NatsServer
from schemas.commands import ReleaseReservation, Reserve
from schemas.replies import ReservationView
from schemas.subjects import WorkerKind
from simulator.market import Market
from workers.common.config import WorkerConfig
from workers.provisioner.app import ProvisionerService
from workers.provisioner.config import ProvisionerConfig


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def boot_one() -> float:
    """Seconds from starting a sim machine to its first answer."""
    port = _free_port()
    start = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpuproxy",
        "sim-upstream",
        "--port",
        str(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                try:
                    answer = await client.get(f"http://127.0.0.1:{port}/v1/models")
                    if answer.status_code == 200:
                        return time.perf_counter() - start
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.01)
    finally:
        process.kill()
        await process.wait()


async def measure(rounds: int) -> dict[str, list[float]]:
    folder = Path(tempfile.mkdtemp(prefix="gpuproxy-bench-"))
    server = NatsServer(folder / "jetstream", log_line=lambda line: None)
    url = server.start()
    found: dict[str, list[float]] = {"boot": [], "reserve 1": [], "reserve 4": []}
    nc = await connect(url, name="bench-reservations")
    worker = WorkerConfig(nats_url=url, worker_id=f"provisioner-{uuid.uuid4().hex[:6]}")
    config = ProvisionerConfig(sim_dir=folder / "sim", sim_owner_pid=os.getpid())
    service = ProvisionerService(worker, config, {})
    runtime = CommandRuntime(
        nc,
        kind=WorkerKind.PROVISIONER,
        handlers=await service.start(nc),
        worker_id=worker.worker_id,
    )
    await runtime.start()
    caller = CommandCaller(nc, gateway_id="bench")
    await caller.start()
    try:
        for _ in range(rounds):
            found["boot"].append(await boot_one())
            for count in (1, 4):
                start = time.perf_counter()
                reply = await caller.call(
                    WorkerKind.PROVISIONER,
                    Reserve(command_id=uuid.uuid4().hex, actor="bench", count=count),
                    timeout=120,
                )
                found[f"reserve {count}"].append(time.perf_counter() - start)
                assert isinstance(reply, ReservationView)
                await caller.call(
                    WorkerKind.PROVISIONER,
                    ReleaseReservation(
                        command_id=uuid.uuid4().hex,
                        actor="bench",
                        reservation_id=reply.reservation.id,
                    ),
                    timeout=60,
                )
    finally:
        await caller.stop()
        await runtime.stop(drain_timeout=5)
        await service.stop()
        await nc.close()
        market = Market(folder / "sim")
        for machine in market.machines():
            market.destroy(machine.id)
        server.stop()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reservations")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    found = asyncio.run(measure(args.rounds))
    baseline = statistics.median(found["boot"])
    for name, samples in found.items():
        median = statistics.median(samples)
        ms = ", ".join(f"{s * 1000:.0f}" for s in samples)
        print(f"{name:<10} median {median * 1000:6.0f} ms  {median / baseline:5.2f}x  [{ms}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
