"""Liveness, readiness and status over real sockets: probes read, they never send a command."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from nats.aio.client import Client

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from schemas import topology
from schemas.commands import Ping
from schemas.errors import DeadlineExceeded
from schemas.subjects import WorkerKind
from tests.bus.harness import running_caller
from tests.e2e.system import running_system, worker_app

Status = dict[str, Any]


async def status_until(
    client: httpx.AsyncClient, wanted: Callable[[Status], bool], timeout: float = 15
) -> Status:
    """`/health` once it shows what is wanted: answers are kept for a moment before re-read."""
    deadline = time.monotonic() + timeout
    while True:
        body: Status = (await client.get("/health")).json()
        if wanted(body) or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.2)


async def send_without_worker(nc: Client, kind: WorkerKind, count: int) -> None:
    """Commands for `kind` through the gateway's own caller, given up on at once."""
    async with running_caller(nc) as caller:
        for _ in range(count):
            command = Ping(command_id=f"waiting-{uuid.uuid4().hex}", message="queued")
            with pytest.raises(DeadlineExceeded):
                await caller.call(kind, command, timeout=0.2)


async def test_a_flood_of_probes_sends_no_command(
    nats_url: str, migrated_database: str, nc: Client
) -> None:
    async with (
        running_system(nats_url, migrated_database, kinds=(), operator=False) as system,
        httpx.AsyncClient(base_url=system.http_base, timeout=30) as client,
        grpc.aio.insecure_channel(system.grpc_target) as channel,
    ):
        js = nc.jetstream()
        before = (await js.stream_info(topology.COMMAND_STREAM)).state
        stub = pb_grpc.GPUProxyServiceStub(channel)
        answers = await asyncio.gather(
            *(client.get("/readyz") for _ in range(100)),
            *(client.get("/health") for _ in range(100)),
            *(stub.HealthCheck(pb.HealthCheckRequest()) for _ in range(50)),
        )
        after = (await js.stream_info(topology.COMMAND_STREAM)).state
    assert (after.messages, after.last_seq) == (before.messages, before.last_seq)
    http_codes = {answer.status_code for answer in answers if isinstance(answer, httpx.Response)}
    assert http_codes == {200}


async def test_readiness_stays_ready_while_no_worker_runs(
    nats_url: str, migrated_database: str
) -> None:
    async with (
        running_system(nats_url, migrated_database, kinds=(), operator=False) as system,
        httpx.AsyncClient(base_url=system.http_base, timeout=10) as client,
        grpc.aio.insecure_channel(system.grpc_target) as channel,
    ):
        ready = await client.get("/readyz")
        status = await client.get("/health")
        by_grpc = await pb_grpc.GPUProxyServiceStub(channel).HealthCheck(pb.HealthCheckRequest())
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "details": {"nats": "ok", "jetstream": "ok", "database": "ok"},
    }
    assert status.status_code == 200
    assert status.json()["status"] == by_grpc.status == "degraded"
    for kind in WorkerKind:
        assert status.json()["details"][f"worker.{kind}"] == "no replica seen"
        assert by_grpc.details[f"worker.{kind}"] == "no replica seen"
        assert by_grpc.details[f"worker.{kind}.replicas"] == ""


async def test_status_names_the_replicas_of_each_kind_and_the_commands_waiting(
    nats_url: str, migrated_database: str, nc: Client
) -> None:
    async with (
        running_system(nats_url, migrated_database, kinds=(WorkerKind.PROXY,)) as system,
        httpx.AsyncClient(base_url=system.http_base, timeout=10) as client,
        grpc.aio.insecure_channel(system.grpc_target) as channel,
    ):
        # No billing replica has ever run: the counts come from the work queue itself.
        await send_without_worker(nc, WorkerKind.BILLING, 3)
        queued = await status_until(client, lambda s: s["workers"]["billing"]["pending"] == 3)
        async with worker_app(WorkerKind.BILLING, nats_url):
            served = await status_until(
                client,
                lambda s: (
                    s["workers"]["billing"]["replicas"] and s["workers"]["billing"]["pending"] == 0
                ),
            )
        # Its consumer exists now: the counts are the consumer's.
        await send_without_worker(nc, WorkerKind.BILLING, 2)
        left = await status_until(
            client,
            lambda s: (
                s["workers"]["billing"]["pending"] == 2 and not s["workers"]["billing"]["replicas"]
            ),
        )
        by_grpc = await pb_grpc.GPUProxyServiceStub(channel).HealthCheck(pb.HealthCheckRequest())
    assert queued["status"] == "degraded"
    assert queued["workers"]["billing"]["replicas"] == []
    proxies = queued["workers"]["proxy"]["replicas"]
    assert [replica["kind"] for replica in proxies] == ["proxy"]
    assert proxies[0]["worker_id"].startswith("proxy-")
    assert proxies[0]["in_flight"] == 0
    assert proxies[0]["seen_at_ms"] >= proxies[0]["started_at_ms"] > 0
    assert queued["details"]["worker.proxy"] == "ok (1 replica)"
    assert queued["details"]["worker.proxy.replicas"] == proxies[0]["worker_id"]
    assert queued["details"]["worker.billing.pending"] == "3"
    [billing] = served["workers"]["billing"]["replicas"]
    assert billing["worker_id"].startswith("billing-")
    assert served["details"]["worker.billing"] == "ok (1 replica)"
    assert left["workers"]["billing"] == {
        "replicas": [],
        "pending": 2,
        "ack_pending": 0,
        "problem": "",
    }
    assert left["details"]["worker.billing"] == "no replica seen"
    assert by_grpc.details["worker.billing.pending"] == "2"
    assert by_grpc.details["worker.billing.ack_pending"] == "0"
    assert by_grpc.details["worker.proxy.replicas"] == proxies[0]["worker_id"]


async def test_status_is_healthy_when_every_kind_has_a_replica(
    nats_url: str, migrated_database: str
) -> None:
    async with (
        running_system(nats_url, migrated_database, operator=False) as system,
        httpx.AsyncClient(base_url=system.http_base, timeout=10) as client,
        grpc.aio.insecure_channel(system.grpc_target) as channel,
    ):
        status = await client.get("/health")
        by_grpc = await pb_grpc.GPUProxyServiceStub(channel).HealthCheck(pb.HealthCheckRequest())
    assert status.status_code == 200
    assert status.json()["status"] == by_grpc.status == "healthy"
    for kind in WorkerKind:
        assert by_grpc.details[f"worker.{kind}"] == "ok (1 replica)"
        assert by_grpc.details[f"worker.{kind}.replicas"].startswith(f"{kind}-")
