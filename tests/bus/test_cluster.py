"""The command path on a 3-node cluster with R3 streams and buckets, where leaders differ."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from nats.aio.client import Client

from bus.caller import CommandCaller
from bus.connection import connect
from bus.runtime import CommandRuntime, Context
from schemas import topology
from schemas.commands import Ping
from schemas.replies import Pong
from schemas.subjects import WorkerKind
from tests.bus.cluster import move_leader, running_cluster
from tests.e2e.processes import gpuproxy, parts_env
from workers.common.ping import answer_ping


def consumer(kind: WorkerKind) -> str:
    return f"CONSUMER.%s.{topology.COMMAND_STREAM}.{kind}"


COMMANDS = f"STREAM.%s.{topology.COMMAND_STREAM}"
RESULTS = f"STREAM.%s.KV_{topology.RESULTS_BUCKET}"


async def _pending(nc: Client, kind: WorkerKind) -> tuple[int, int]:
    info = await nc.jetstream().consumer_info(topology.COMMAND_STREAM, kind, timeout=2)
    return int(info.num_pending), int(info.num_ack_pending)


async def _settled(
    nc: Client, kind: WorkerKind = WorkerKind.PROVISIONER, timeout: float = 60
) -> None:
    """Wait until the kind's consumer holds nothing: the command was acked."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        try:
            if await _pending(nc, kind) == (0, 0):
                return
        except Exception:  # leaders being elected
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the command was never acked")


async def _caller(url: str) -> tuple[Client, CommandCaller]:
    nc = await connect(url, name="test-caller")
    caller = CommandCaller(nc, gateway_id=f"gw-{uuid.uuid4().hex[:6]}", stream_replicas=3)
    await caller.start()
    return nc, caller


async def _place_leaders(nc: Client, kind: WorkerKind = WorkerKind.PROVISIONER) -> None:
    """Results bucket led by n3; command stream and consumer led elsewhere, so killing n3
    takes the results leader and nothing that the command or its ack needs."""
    await move_leader(nc, RESULTS, onto="n3")
    await move_leader(nc, COMMANDS, off="n3")
    await move_leader(nc, consumer(kind), off="n3")


async def test_a_finished_command_keeps_its_answer_when_the_results_leader_dies_before_it_is_stored(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        worker_nc = await connect(cluster.node("n1").url, name="test-worker")

        async def kills_the_results_leader(command: Ping, ctx: Context) -> Pong:
            cluster.kill("n3")
            return await answer_ping(command, ctx)

        runtime = CommandRuntime(
            worker_nc,
            kind=WorkerKind.PROVISIONER,
            handlers={Ping: kills_the_results_leader},
            worker_id="w-cluster",
            stream_replicas=3,
            store_timeout=60,
        )
        await runtime.start()
        caller_nc, caller = await _caller(cluster.node("n2").url)
        # The retry comes through another gateway, started before any node is lost.
        retry_nc, retry_caller = await _caller(cluster.node("n2").url)
        await _place_leaders(caller_nc)

        command = Ping(command_id=f"k-{uuid.uuid4().hex}", message="kept")
        first = await caller.call(WorkerKind.PROVISIONER, command, timeout=30)
        await _settled(caller_nc)
        # The worker dies right after its ack: nothing of it can still send the answer.
        await worker_nc.close()
        again = await retry_caller.call(WorkerKind.PROVISIONER, command, timeout=20)
        for nc in (caller_nc, retry_nc):
            await nc.close()
    assert isinstance(first, Pong)
    assert again == first


async def test_a_worker_process_killed_right_after_its_ack_leaves_its_answer_for_the_retry(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        caller_nc, caller = await _caller(cluster.node("n2").url)
        retry_nc, retry_caller = await _caller(cluster.node("n2").url)
        env, _ = parts_env(
            tmp_path, cluster.node("n1").url, GPUPROXY_STREAM_REPLICAS="3", LOG_LEVEL="warning"
        )
        kind = WorkerKind.BILLING
        with gpuproxy(["worker", str(kind)], env, tmp_path / "worker.log") as worker:
            # Answered once the process has joined its consumer.
            await caller.call(kind, Ping(command_id=uuid.uuid4().hex), timeout=60)
            await _place_leaders(caller_nc, kind)
            command = Ping(command_id=f"k-{uuid.uuid4().hex}", message="kept", delay_ms=1500)
            call = asyncio.create_task(caller.call(kind, command, timeout=60))
            for _ in range(1500):  # until the worker holds it
                if (await _pending(caller_nc, kind))[1]:
                    break
                await asyncio.sleep(0.02)
            # The results bucket loses its leader while the worker is at the command.
            cluster.kill("n3")
            first = await call
            await _settled(caller_nc, kind)
            worker.kill()
            worker.wait()
        await move_leader(caller_nc, RESULTS, off="n3")  # a new leader holds what was stored
        again = await retry_caller.call(kind, command, timeout=30)
        for nc in (caller_nc, retry_nc):
            await nc.close()
    assert isinstance(first, Pong)
    assert again == first


async def test_replicas_on_different_nodes_share_one_consumer_and_answer_every_command(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        workers = []
        for name in ("n1", "n3"):
            nc = await connect(cluster.node(name).url, name=f"worker-{name}")
            runtime = CommandRuntime(
                nc,
                kind=WorkerKind.PROVISIONER,
                handlers={Ping: answer_ping},
                worker_id=f"w-{name}",
                stream_replicas=3,
            )
            await runtime.start()
            workers.append((nc, runtime))
        caller_nc, caller = await _caller(cluster.node("n2").url)
        replies = await asyncio.gather(
            *(
                caller.call(WorkerKind.PROVISIONER, Ping(command_id=uuid.uuid4().hex), timeout=20)
                for _ in range(60)
            )
        )
        for nc, runtime in workers:
            await runtime.stop(drain_timeout=1)
            await nc.close()
        await caller_nc.close()
    by_worker = {r.worker_id for r in replies if isinstance(r, Pong)}
    assert len(replies) == 60
    assert by_worker == {"w-n1", "w-n3"}
