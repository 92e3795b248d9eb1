"""Provisioner processes killed in the middle of a reservation, and sharing the work: real
subprocesses, a real nats-server, and the sim marketplace whose machines are real processes."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pytest

from bus.connection import connect
from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from schemas import topology
from schemas.gpus import Instance, instance_of_label
from simulator.market import Market
from tests.e2e.processes import gpuproxy, keyed_channel, parts_env, provisioned, wait_serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CHECKPOINTS = [
    "reserve.before_create",
    "create.before_provider_call",
    "create.after_provider_call",
    "reserve.after_create",
    "reserve.before_active",
    "reserve.before_reply",
]


def provisioner_env(tmp_path: Path, nats_url: str) -> tuple[dict[str, str], str]:
    return parts_env(
        tmp_path,
        nats_url,
        GPUPROXY_ACK_WAIT="2",
        GPUPROXY_PROVIDERS="sim",
        GPUPROXY_SIM_DIR=str(tmp_path / "sim"),
        GPUPROXY_SIM_OWNER_PID=str(os.getpid()),
        GPUPROXY_RECONCILE_INTERVAL="0.5",
        GPUPROXY_METER_INTERVAL="0.5",
        GPUPROXY_LEASE_TTL="2",
        GPUPROXY_START_TIMEOUT="60",
        GPUPROXY_REQUEST_TIMEOUT="60",
    )


def registry(nats_url: str) -> dict[str, Instance]:
    async def read() -> dict[str, Instance]:
        nc = await connect(nats_url, name="test-registry")
        try:
            kv = await nc.jetstream().key_value(topology.INSTANCES_BUCKET)
            found = {}
            for key in await kv.keys():
                entry = await kv.get(key)
                assert entry.value is not None
                found[key] = msgspec.json.decode(entry.value, type=Instance)
            return found
        finally:
            await nc.close()

    return asyncio.run(read())


def machine_labels(market: Market) -> list[str]:
    return sorted(m.label for m in market.machines() if market.running(m))


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_a_reservation_survives_its_provisioner_being_killed(
    nats_url: str, tmp_path: Path, checkpoint: str
) -> None:
    env, target = provisioner_env(tmp_path, nats_url)
    crashing = {
        **env,
        "GPUPROXY_TEST_CRASH_AT": checkpoint,
        "GPUPROXY_TEST_CRASH_MARK": str(tmp_path / "crashed"),
    }
    market = Market(tmp_path / "sim")
    key = (("idempotency-key", f"crash-{checkpoint.replace('.', '-')}"),)
    try:
        with (
            gpuproxy(["gateway"], env, tmp_path / "gateway.log") as gateway,
            keyed_channel(target, provisioned(env)) as channel,
            ThreadPoolExecutor(1) as pool,
        ):
            wait_serving(target, gateway, tmp_path / "gateway.log")
            stub = pb_grpc.GPUProxyServiceStub(channel)
            request = pb.ReserveGPUsRequest(count=2, provider="sim", lease_seconds=600)
            with gpuproxy(["worker", "provisioner"], crashing, tmp_path / "first.log") as first:
                call = pool.submit(stub.ReserveGPUs, request, metadata=key, timeout=180)
                assert first.wait(60) == -9, (tmp_path / "first.log").read_text()
            assert (tmp_path / "crashed").read_text() == checkpoint
            with gpuproxy(["worker", "provisioner"], crashing, tmp_path / "second.log"):
                answer = call.result(timeout=180)
                assert answer.reservation.state == "active"
                assert [i.status for i in answer.reserved_instances] == ["running"] * 2
                ids = sorted(i.id for i in answer.reserved_instances)
                # Give the reconciler rounds to find anything left over; it must find nothing
                # to destroy and nothing more must appear.
                time.sleep(2.5)
                labelled = [instance_of_label(label) for label in machine_labels(market)]
                assert sorted(labelled) == ids  # type: ignore[type-var]
                assert sorted(registry(nats_url)) == ids
                again = stub.ReserveGPUs(request, metadata=key, timeout=60)
                assert again.reservation.id == answer.reservation.id
                released = stub.ReleaseReservation(
                    pb.ReleaseReservationRequest(reservation_id=answer.reservation.id),
                    timeout=60,
                )
                assert released.reservation.state == "released"
                assert machine_labels(market) == []
    finally:
        for machine in market.machines():
            market.destroy(machine.id)


def test_two_provisioners_share_the_work_without_creating_twice(
    nats_url: str, tmp_path: Path
) -> None:
    env, target = provisioner_env(tmp_path, nats_url)
    env["GPUPROXY_WORKER_WINDOW"] = "1"
    market = Market(tmp_path / "sim")
    try:
        with (
            gpuproxy(["gateway"], env, tmp_path / "gateway.log") as gateway,
            gpuproxy(["worker", "provisioner"], env, tmp_path / "a.log"),
            gpuproxy(["worker", "provisioner"], env, tmp_path / "b.log"),
            keyed_channel(target, provisioned(env)) as channel,
            ThreadPoolExecutor(16) as pool,
        ):
            wait_serving(target, gateway, tmp_path / "gateway.log")
            stub = pb_grpc.GPUProxyServiceStub(channel)
            offers = stub.ListGPUInstances(
                pb.ListGPUInstancesRequest(provider="sim", location="US"), timeout=60
            ).instances
            # Each create is sent twice with its key, as a client retrying would.
            calls = [
                pool.submit(
                    stub.CreateGPUInstance,
                    pb.CreateGPUInstanceRequest(provider="sim", instance_id=offers[n % 2].id),
                    metadata=(("idempotency-key", f"share-{n}"),),
                    timeout=120,
                )
                for n in range(8)
                for _ in range(2)
            ]
            made = [call.result(timeout=120) for call in calls]
            ids = {answer.instance_id for answer in made}
            assert len(ids) == 8
            records = registry(nats_url)
            assert set(records) == ids
            assert len({r.created_by for r in records.values()}) == 2
            labelled = [instance_of_label(label) for label in machine_labels(market)]
            assert sorted(labelled) == sorted(ids)  # type: ignore[type-var]
            for instance_id in ids:
                stub.DestroyGPUInstance(
                    pb.DestroyGPUInstanceRequest(provider="sim", instance_id=instance_id),
                    timeout=60,
                )
            assert machine_labels(market) == []
    finally:
        for machine in market.machines():
            market.destroy(machine.id)


def test_the_reconciler_destroys_a_machine_no_record_owns(nats_url: str, tmp_path: Path) -> None:
    env, _ = provisioner_env(tmp_path, nats_url)
    market = Market(tmp_path / "sim", owner_pid=os.getpid())
    try:
        stray = market.rent(market.availability()[0][0].offer_id, label="gpuproxy-i-0000", env={})
        foreign = market.rent(market.availability()[0][0].offer_id, label="someone-else", env={})
        with gpuproxy(["worker", "provisioner"], env, tmp_path / "p.log"):
            deadline = time.monotonic() + 30
            while market.running(stray):
                assert time.monotonic() < deadline, (tmp_path / "p.log").read_text()
                time.sleep(0.2)
            assert market.running(foreign)
    finally:
        for machine in market.machines():
            market.destroy(machine.id)
