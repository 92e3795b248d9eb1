"""Soak: sustained traffic while worker processes are killed and restarted (`just test-soak`)."""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from tests.e2e.processes import gpuproxy, keyed_channel, parts_env, provisioned, wait_serving
from tests.e2e.test_worker_crash import first_answer

pytestmark = pytest.mark.soak

SOAK_SECONDS = float(os.environ.get("GPUPROXY_SOAK_SECONDS", "120"))


def test_every_call_is_answered_once_while_workers_keep_dying(
    nats_url: str, tmp_path: Path
) -> None:
    env, target = parts_env(
        tmp_path,
        nats_url,
        GPUPROXY_ACK_WAIT="1",
        GPUPROXY_MAX_DELIVER="100",
        LOG_LEVEL="warning",
    )
    chaos = random.Random(7)
    with (
        gpuproxy(["gateway"], env, tmp_path / "gateway.log") as gateway,
        gpuproxy(["worker", "provisioner"], env, tmp_path / "steady.log"),
        keyed_channel(target, provisioned(env)) as channel,
        ThreadPoolExecutor(8) as pool,
    ):
        wait_serving(target, gateway, tmp_path / "gateway.log")
        stub = pb_grpc.GPUProxyServiceStub(channel)
        first_answer(stub)
        sent = 0
        calls = []
        deadline = time.monotonic() + SOAK_SECONDS
        generation = 0
        while time.monotonic() < deadline:
            generation += 1
            log = tmp_path / f"victim-{generation}.log"
            with gpuproxy(["worker", "provisioner"], env, log) as victim:
                until = time.monotonic() + chaos.uniform(1.0, 4.0)
                while time.monotonic() < until:
                    key = (("idempotency-key", f"soak-{sent}"),)
                    request = pb.PingRequest(message=str(sent), delay_ms=chaos.randint(0, 300))
                    calls.append(pool.submit(stub.Ping, request, metadata=key, timeout=120))
                    sent += 1
                    time.sleep(0.01)
                victim.kill()
        answers = [call.result() for call in calls]
    assert sorted(int(a.message) for a in answers) == list(range(sent))
    assert any(a.attempt > 1 for a in answers), "no command was ever redelivered"
