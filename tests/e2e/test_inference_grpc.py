"""Inference over gRPC: `ProxyRequest` whole and streamed, and `StreamProxyRequest` with
several requests on one stream, told apart by `request_id` or answered in the order sent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import openai
import pytest
from nats.aio.client import Client

from gateway.pb import gpuproxy_pb2 as pb
from gateway.pb import gpuproxy_pb2_grpc as pb_grpc
from schemas.subjects import WorkerKind
from simulator.upstream import DEFAULT_MODEL
from tests.e2e.machines import register, served, sim_machine
from tests.e2e.system import System, running_system

MODEL = f"model://{DEFAULT_MODEL}"


@pytest.fixture
async def stub(
    nats_url: str, migrated_database: str, nc: Client, tmp_path: Path
) -> AsyncIterator[tuple[pb_grpc.GPUProxyServiceStub, tuple[tuple[str, str], ...], str]]:
    async with running_system(nats_url, migrated_database, kinds=(WorkerKind.PROXY,)) as system:
        with sim_machine(tmp_path, "--token-delay-ms", "5") as machine:
            instance_id = await register(nc, machine, owner=system.admin_id)
            async with openai.AsyncOpenAI(
                base_url=f"{system.http_base}/v1", api_key=system.api_key
            ) as client:
                await served(client, DEFAULT_MODEL)
            async with grpc.aio.insecure_channel(system.grpc_target) as channel:
                yield pb_grpc.GPUProxyServiceStub(channel), key(system), instance_id


def key(system: System) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", system.api_key),)


def chat(words: int, *, stream: bool = False, **more: object) -> bytes:
    body = {
        "messages": [{"role": "user", "content": "tell me about rivers"}],
        "max_tokens": words,
        "stream": stream,
        **more,
    }
    return json.dumps(body).encode()


def contents(body: bytes) -> str:
    """The text of a streamed chat answer's server-sent events."""
    text = []
    for line in body.decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text.append(choice["delta"].get("content") or "")
    return "".join(text)


async def test_proxy_request_answers_whole_and_streamed_alike(
    stub: tuple[pb_grpc.GPUProxyServiceStub, tuple[tuple[str, str], ...], str],
) -> None:
    service, metadata, instance_id = stub
    whole = await service.ProxyRequest(
        pb.ProxyRequestMessage(target_url=MODEL, body=chat(6, seed=3)), metadata=metadata
    )
    streamed = await service.ProxyRequest(
        pb.ProxyRequestMessage(
            target_url=f"instance://{instance_id}/v1/chat/completions",
            body=chat(6, stream=True, seed=3),
        ),
        metadata=metadata,
    )
    assert whole.status_code == 200
    assert whole.done
    assert int(whole.headers["x-gpuproxy-cost-micros"]) > 0
    answer = json.loads(whole.body)["choices"][0]["message"]["content"]
    assert answer == contents(streamed.body)
    assert streamed.body.rstrip().endswith(b"data: [DONE]")


async def test_a_target_that_names_a_host_is_refused_before_anything_is_sent(
    stub: tuple[pb_grpc.GPUProxyServiceStub, tuple[tuple[str, str], ...], str],
) -> None:
    service, metadata, _ = stub
    for target in ("http://169.254.169.254/latest", "https://example.com/v1/chat/completions"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await service.ProxyRequest(
                pb.ProxyRequestMessage(target_url=target, body=chat(2)), metadata=metadata
            )
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "target_url" in (raised.value.details() or "")


async def test_named_requests_on_one_stream_are_answered_each_under_its_name(
    stub: tuple[pb_grpc.GPUProxyServiceStub, tuple[tuple[str, str], ...], str],
) -> None:
    service, metadata, _ = stub

    async def requests() -> AsyncIterator[pb.ProxyRequestMessage]:
        for name, words in (("long", 30), ("short", 2), ("bad", 0)):
            yield pb.ProxyRequestMessage(
                target_url=MODEL, body=chat(words, stream=True), request_id=name
            )

    bodies: dict[str, bytes] = {"long": b"", "short": b"", "bad": b""}
    finished: list[str] = []
    errors: dict[str, str] = {}
    async for message in service.StreamProxyRequest(requests(), metadata=metadata):
        bodies[message.request_id] += message.body
        if message.error:
            errors[message.request_id] = message.error
        if message.done:
            finished.append(message.request_id)

    assert sorted(finished) == ["bad", "long", "short"]
    assert finished.index("short") < finished.index("long")  # not held behind the long one
    assert "max_tokens" in errors["bad"]
    assert len(contents(bodies["short"]).split()) <= 2 < len(contents(bodies["long"]).split())


async def test_unnamed_requests_on_one_stream_are_answered_in_the_order_sent(
    stub: tuple[pb_grpc.GPUProxyServiceStub, tuple[tuple[str, str], ...], str],
) -> None:
    service, metadata, _ = stub

    async def requests() -> AsyncIterator[pb.ProxyRequestMessage]:
        for words in (20, 1, 5):
            yield pb.ProxyRequestMessage(target_url=MODEL, body=chat(words, stream=True))

    answers: list[bytes] = [b""]
    async for message in service.StreamProxyRequest(requests(), metadata=metadata):
        answers[-1] += message.body
        if message.done:
            answers.append(b"")
    answers.pop()
    assert [len(contents(a).split()) for a in answers] == [20, 1, 5]
