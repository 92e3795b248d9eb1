"""A 3-node nats-server cluster on loopback, for what only a cluster shows.

On one server every stream, bucket and consumer has the same leader; on a cluster they have
different ones, and an answer that takes one path can overtake or outlive a message on
another. Nodes can be killed one at a time; leaders are moved with JetStream's step-down API.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client

from bus.connection import connect
from gpuproxy.natsd import find_binary
from tests.conftest import free_port


@dataclass
class Node:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def kill(self, name: str) -> None:
        node = self.node(name)
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(10)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.process.wait(10)
            except subprocess.TimeoutExpired:
                node.process.kill()


async def leader(nc: Client, api: str) -> str:
    """The server name leading a stream (`STREAM.INFO.<s>`) or consumer
    (`CONSUMER.INFO.<s>.<c>`)."""
    answer = json.loads((await nc.request(f"$JS.API.{api}", b"", timeout=5)).data)
    return str(answer.get("cluster", {}).get("leader", ""))


async def move_leader(
    nc: Client, what: str, *, onto: str = "", off: str = "", deadline: float = 60
) -> str:
    """Step the leader of `what` down until it sits `onto` a node, or `off` one; returns
    the leader. `what` has %s where the API verb goes: `STREAM.%s.GPUPROXY_CMD` becomes
    `STREAM.INFO.GPUPROXY_CMD` and `STREAM.LEADER.STEPDOWN.GPUPROXY_CMD`."""
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        try:
            now = await leader(nc, what % "INFO")
            if now and (now == onto if onto else now != off):
                return now
            if now:
                await nc.request(f"$JS.API.{what % 'LEADER.STEPDOWN'}", b"", timeout=5)
        except Exception:  # a leaderless moment: ask again
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"could not move the leader of {what}")


@asynccontextmanager
async def running_cluster(folder: Path, size: int = 3) -> AsyncIterator[Cluster]:
    cluster = Cluster()
    client_ports = [free_port() for _ in range(size)]
    route_ports = [free_port() for _ in range(size)]
    routes = ", ".join(f"nats://127.0.0.1:{p}" for p in route_ports)
    try:
        for index in range(size):
            name = f"n{index + 1}"
            config = folder / f"{name}.conf"
            config.write_text(
                f"""
server_name: {name}
listen: 127.0.0.1:{client_ports[index]}
jetstream {{ store_dir: "{folder / name}" }}
cluster {{
  name: gpuproxy-test
  listen: 127.0.0.1:{route_ports[index]}
  routes: [{routes}]
}}
"""
            )
            log = (folder / f"{name}.log").open("wb")
            process = subprocess.Popen(  # noqa: ASYNC220 - a fork, not a wait
                [find_binary(), "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ},
            )
            cluster.nodes.append(Node(name, client_ports[index], process))
        await _until_jetstream_ready(cluster.nodes[0].url)
        yield cluster
    finally:
        cluster.stop()


async def _until_jetstream_ready(url: str, timeout: float = 30) -> None:
    give_up = time.monotonic() + timeout
    while True:
        try:
            nc = await connect(url, name="cluster-probe", connect_timeout=1)
        except Exception:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.2)
            continue
        try:
            while True:
                try:
                    # Every peer takes part in a replicated stream only once the cluster
                    # has formed; before that its creation times out.
                    js = nc.jetstream()
                    await js.add_stream(name="CLUSTER_READY", subjects=["ready"], num_replicas=3)
                    await js.delete_stream("CLUSTER_READY")
                    return
                except Exception:
                    if time.monotonic() > give_up:
                        raise
                    await asyncio.sleep(0.3)
        finally:
            await nc.close()
