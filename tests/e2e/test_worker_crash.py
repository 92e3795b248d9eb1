"""Worker processes dying and scaling: real subprocesses on a real nats-server."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from bus.connection import connect
from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from schemas import topology
from tests.e2e.processes import gpuproxy, keyed_channel, parts_env, provisioned, wait_serving

pytestmark = pytest.mark.slow


def first_answer(stub: pb_grpc.GPUProxyServiceStub, timeout: float = 30) -> pb.PingResponse:
    """Ping until a worker answers: a worker process takes a moment to join its consumer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer: pb.PingResponse = stub.Ping(pb.PingRequest(message="warm"), timeout=2)
            return answer
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise


def ack_pending(nats_url: str) -> int:
    async def ask() -> int:
        nc = await connect(nats_url, name="test-probe")
        try:
            info = await nc.jetstream().consumer_info(topology.COMMAND_STREAM, "provisioner")
            return int(info.num_ack_pending)
        finally:
            await nc.close()

    return asyncio.run(ask())


def test_a_command_whose_worker_is_killed_is_redelivered_and_answered_once(
    nats_url: str, tmp_path: Path
) -> None:
    env, target = parts_env(
        tmp_path,
        nats_url,
        GPUPROXY_ACK_WAIT="1",
    )
    key = (("idempotency-key", "survives-a-crash"),)
    with (
        gpuproxy(["gateway"], env, tmp_path / "gateway.log") as gateway,
        keyed_channel(target, provisioned(env)) as channel,
        ThreadPoolExecutor(1) as pool,
    ):
        wait_serving(target, gateway, tmp_path / "gateway.log")
        stub = pb_grpc.GPUProxyServiceStub(channel)
        with gpuproxy(["worker", "provisioner"], env, tmp_path / "first.log") as first:
            killed_id = first_answer(stub).worker_id
            call = pool.submit(
                stub.Ping,
                pb.PingRequest(message="survive", delay_ms=1500),
                metadata=key,
                timeout=60,
            )
            deadline = time.monotonic() + 10
            while ack_pending(nats_url) == 0:
                assert time.monotonic() < deadline, "the worker never took the command"
                time.sleep(0.05)
            first.kill()
            first.wait()
        assert not call.done()
        with gpuproxy(["worker", "provisioner"], env, tmp_path / "second.log"):
            answer = call.result(timeout=60)
            repeat = stub.Ping(
                pb.PingRequest(message="survive", delay_ms=1500), metadata=key, timeout=30
            )
    assert answer.message == "survive"
    assert answer.attempt == 2
    assert answer.worker_id != killed_id
    assert repeat == answer


def test_two_worker_processes_on_one_consumer_share_the_work(nats_url: str, tmp_path: Path) -> None:
    env, target = parts_env(
        tmp_path,
        nats_url,
        GPUPROXY_WORKER_WINDOW="2",
    )
    with (
        gpuproxy(["gateway"], env, tmp_path / "gateway.log") as gateway,
        gpuproxy(["worker", "provisioner"], env, tmp_path / "a.log"),
        gpuproxy(["worker", "provisioner"], env, tmp_path / "b.log"),
        keyed_channel(target, provisioned(env)) as channel,
        ThreadPoolExecutor(16) as pool,
    ):
        wait_serving(target, gateway, tmp_path / "gateway.log")
        stub = pb_grpc.GPUProxyServiceStub(channel)
        first_answer(stub)
        calls = [
            pool.submit(stub.Ping, pb.PingRequest(message=str(i), delay_ms=100), timeout=30)
            for i in range(32)
        ]
        answers = [c.result() for c in calls]
    assert sorted(int(a.message) for a in answers) == list(range(32))
    assert len({a.worker_id for a in answers}) == 2
