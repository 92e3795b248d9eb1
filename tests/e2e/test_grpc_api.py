"""The gRPC front door over a real socket, with real workers behind JetStream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from nats.aio.client import Client

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from schemas import topology
from schemas.subjects import WorkerKind
from tests.e2e.system import System, keyed_channel, running_system

SERVED = {
    "HealthCheck",
    "Ping",
    "Login",
    "CreateAPIKey",
    "ListGPUInstances",
    "CreateGPUInstance",
    "DestroyGPUInstance",
    "GetGPUInstance",
    "ReserveGPUs",
    "BatchCreateGPUInstances",
    "ListOwnedGPUInstances",
    "GetReservation",
    "ListReservations",
    "RenewReservation",
    "ReleaseReservation",
    "ProxyRequest",
    "StreamProxyRequest",
    "SetLoadBalancerStrategy",
    "GetLoadInfo",
}
SERVICE = pb.DESCRIPTOR.services_by_name["GPUProxyService"]


@pytest.fixture
async def channel(system: System) -> AsyncIterator[grpc.aio.Channel]:
    async with keyed_channel(system.grpc_target, system.api_key) as open_channel:
        yield open_channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.GPUProxyServiceStub:
    return pb_grpc.GPUProxyServiceStub(channel)


async def test_standard_health_service_reports_serving_for_the_server_and_our_service(
    channel: grpc.aio.Channel,
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE.full_name):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_check_reports_nats_jetstream_database_and_each_worker_kind(
    stub: pb_grpc.GPUProxyServiceStub,
) -> None:
    answer = await stub.HealthCheck(pb.HealthCheckRequest())
    assert answer.status == "healthy"
    assert answer.timestamp > 0
    for part in ("nats", "jetstream", "database"):
        assert answer.details[part] == "ok"
    for kind in WorkerKind:
        assert answer.details[f"worker.{kind}"] == "ok (1 replica)"


async def test_health_check_says_degraded_and_names_the_worker_kind_with_no_replica(
    nats_url: str, migrated_database: str
) -> None:
    async with (
        running_system(nats_url, migrated_database, kinds=(WorkerKind.PROXY,)) as running,
        grpc.aio.insecure_channel(running.grpc_target) as channel,
    ):
        answer = await pb_grpc.GPUProxyServiceStub(channel).HealthCheck(pb.HealthCheckRequest())
    assert answer.status == "degraded"
    assert answer.details["worker.proxy"] == "ok (1 replica)"
    assert answer.details["worker.billing"] == "no replica seen"


@pytest.mark.parametrize("kind", [k.value for k in WorkerKind])
async def test_ping_is_answered_by_a_worker_of_the_requested_kind(
    stub: pb_grpc.GPUProxyServiceStub, kind: str
) -> None:
    answer = await stub.Ping(pb.PingRequest(message="hello", worker_kind=kind), timeout=10)
    assert (answer.message, answer.worker_kind, answer.attempt) == ("hello", kind, 1)
    assert answer.worker_id.startswith(kind)


async def test_same_idempotency_key_returns_the_first_answer(
    stub: pb_grpc.GPUProxyServiceStub,
) -> None:
    metadata = (("idempotency-key", "ping-0001"),)
    first = await stub.Ping(pb.PingRequest(message="one"), metadata=metadata, timeout=10)
    again = await stub.Ping(pb.PingRequest(message="one"), metadata=metadata, timeout=10)
    assert again == first
    assert again.message == "one"


async def test_an_idempotency_key_reused_for_another_request_is_a_failed_precondition(
    stub: pb_grpc.GPUProxyServiceStub,
) -> None:
    metadata = (("idempotency-key", "ping-0002"),)
    await stub.Ping(pb.PingRequest(message="one"), metadata=metadata, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Ping(pb.PingRequest(message="two"), metadata=metadata, timeout=10)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (raised.value.details() or "").startswith("idempotency-key: ")


@pytest.mark.parametrize(
    ("request_", "metadata", "field"),
    [
        (pb.PingRequest(worker_kind="gpu"), (), "worker_kind"),
        (pb.PingRequest(delay_ms=60_001), (), "delay_ms"),
        (pb.PingRequest(delay_ms=-1), (), "delay_ms"),
        (pb.PingRequest(message="x" * 1025), (), "message"),
        (pb.PingRequest(), (("idempotency-key", "has.dots"),), "idempotency-key"),
    ],
)
async def test_bad_input_is_refused_with_invalid_argument_naming_the_field(
    stub: pb_grpc.GPUProxyServiceStub,
    request_: pb.PingRequest,
    metadata: tuple[tuple[str, str], ...],
    field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Ping(request_, metadata=metadata, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"{field}: ")


async def test_a_client_deadline_shorter_than_the_work_ends_in_deadline_exceeded(
    stub: pb_grpc.GPUProxyServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Ping(pb.PingRequest(delay_ms=5_000), timeout=0.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_client_that_gives_up_stops_the_work_at_the_worker(
    stub: pb_grpc.GPUProxyServiceStub, nc: Client
) -> None:
    js = nc.jetstream()
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Ping(pb.PingRequest(delay_ms=20_000), timeout=0.5)
    # Cancelled and termed at once, not held for the 20 s the work would take.
    deadline = asyncio.get_running_loop().time() + 3
    while (await js.consumer_info(topology.COMMAND_STREAM, "provisioner")).num_ack_pending:
        assert asyncio.get_running_loop().time() < deadline, "the worker kept the command"
        await asyncio.sleep(0.05)


async def test_methods_not_served_yet_answer_unimplemented_naming_what_is_missing(
    channel: grpc.aio.Channel,
) -> None:
    pending = [m for m in SERVICE.methods if m.name not in SERVED]
    assert pending, "every method is served: drop this test"
    for method in pending:
        path = f"/{SERVICE.full_name}/{method.name}"
        request = pb.DESCRIPTOR.message_types_by_name[method.input_type.name]
        empty = GetMessageClass(request)().SerializeToString()

        async def call(
            path: str = path, empty: bytes = empty, streaming: bool = method.client_streaming
        ) -> None:
            if streaming:
                async for _ in channel.stream_stream(path)(iter(()), timeout=5):  # grpc/grpc#36066
                    pass
            else:
                await channel.unary_unary(path)(empty, timeout=5)

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call()
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED, method.name
        details = raised.value.details() or ""
        assert details.startswith(f"{method.name} needs "), details


async def test_reflection_lists_the_service_and_serves_its_descriptor(
    channel: grpc.aio.Channel,
) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(
        request: reflection_pb2.ServerReflectionRequest,
    ) -> reflection_pb2.ServerReflectionResponse:
        async for answer in reflection.ServerReflectionInfo(iter([request])):
            return answer
        raise AssertionError("no answer")

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE.full_name, "grpc.health.v1.Health"} <= names
    found = await ask(
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE.full_name)
    )
    [raw] = found.file_descriptor_response.file_descriptor_proto
    file = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert file.package == "gpuproxy"
    assert "Ping" in {m.name for m in file.service[0].method}


async def test_many_concurrent_pings_all_get_their_own_answer(
    stub: pb_grpc.GPUProxyServiceStub,
) -> None:
    answers = await asyncio.gather(
        *(stub.Ping(pb.PingRequest(message=f"m{i}"), timeout=10) for i in range(100))
    )
    assert [a.message for a in answers] == [f"m{i}" for i in range(100)]
