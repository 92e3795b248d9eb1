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
from tests.bus.cluster import Cluster, move_leader, running_cluster
from workers.common.ping import answer_ping

CONSUMER = f"CONSUMER.%s.{topology.COMMAND_STREAM}.provisioner"
COMMANDS = f"STREAM.%s.{topology.COMMAND_STREAM}"
RESULTS = f"STREAM.%s.KV_{topology.RESULTS_BUCKET}"


async def _settled(nc: Client, timeout: float = 60) -> None:
    """Wait until the provisioner consumer holds nothing: the command was acked."""
    give_up = time.monotonic() + timeout
    js = nc.jetstream()
    while time.monotonic() < give_up:
        try:
            info = await js.consumer_info(topology.COMMAND_STREAM, "provisioner", timeout=2)
            if info.num_ack_pending == 0 and info.num_pending == 0:
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


async def _place_leaders(cluster: Cluster, nc: Client) -> None:
    """Results bucket led by n3; command stream and consumer led elsewhere, so killing n3
    takes the results leader and nothing that the command or its ack needs."""
    await move_leader(nc, RESULTS, onto="n3")
    await move_leader(nc, COMMANDS, off="n3")
    await move_leader(nc, CONSUMER, off="n3")


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
        await _place_leaders(cluster, caller_nc)

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
