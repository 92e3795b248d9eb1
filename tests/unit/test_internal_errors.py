"""The gateway's outermost gRPC interceptor on a real grpc.aio server: an unplanned
exception in a method of any kind (unary, server or client streaming) reaches the client as
INTERNAL with an error id, never as its text; an error of ours keeps its own status."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from gateway.errors import INTERNAL_MESSAGE
from gateway.unexpected import ERROR_ID, UnexpectedErrors
from schemas.errors import NotFound
from tests.conftest import free_port

SECRET = "postgresql://app:hunter2@db/gpuproxy"
"""Stands for whatever an exception's text might carry."""


async def unary(request: bytes, context: Any) -> bytes:
    raise RuntimeError(f"cannot reach {SECRET}")


async def server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"first"
    raise KeyError(SECRET)


async def client_stream(requests: AsyncIterator[bytes], context: Any) -> bytes:
    async for _ in requests:
        raise ValueError(SECRET)
    return b""


async def both_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request
        raise NotFound("no such reservation", field="reservation_id")


def _handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "test.Failing",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "BothStream": grpc.stream_stream_rpc_method_handler(both_stream),
        },
    )


@asynccontextmanager
async def failing_server() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[UnexpectedErrors()])
    server.add_generic_rpc_handlers((_handlers(),))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def _one() -> AsyncIterator[bytes]:
    yield b"hello"


Call = Callable[[grpc.aio.Channel, list[bytes]], Awaitable[None]]
"""Makes one call, keeping each reply that arrives in the list."""


async def _call_unary(channel: grpc.aio.Channel, got: list[bytes]) -> None:
    got.append(await channel.unary_unary("/test.Failing/Unary")(b"x", timeout=5))


async def _call_server_stream(channel: grpc.aio.Channel, got: list[bytes]) -> None:
    async for reply in channel.unary_stream("/test.Failing/ServerStream")(b"x", timeout=5):
        got.append(reply)


async def _call_client_stream(channel: grpc.aio.Channel, got: list[bytes]) -> None:
    got.append(await channel.stream_unary("/test.Failing/ClientStream")(_one(), timeout=5))


async def _call_both_stream(channel: grpc.aio.Channel, got: list[bytes]) -> None:
    async for reply in channel.stream_stream("/test.Failing/BothStream")(_one(), timeout=5):
        got.append(reply)


@pytest.mark.parametrize(
    "call", [_call_unary, _call_server_stream, _call_client_stream], ids=lambda c: c.__name__
)
async def test_an_unplanned_exception_in_any_kind_of_method_is_internal_with_an_error_id(
    call: Call, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[bytes] = []
    async with failing_server() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(channel, got)

    error = failed.value
    error_id = dict(error.trailing_metadata() or ())[ERROR_ID]
    assert error.code() is grpc.StatusCode.INTERNAL
    assert error.details() == f"{INTERNAL_MESSAGE} (error id {error_id})"
    assert SECRET not in str(error.details()) + str(error.debug_error_string())
    assert f"error id {error_id}" in caplog.text
    assert [r.levelno for r in caplog.records if error_id in r.getMessage()] == [logging.ERROR]
    if call is _call_server_stream:
        assert got == [b"first"]  # what was sent before the failure still arrived


async def test_an_error_of_ours_raised_in_a_stream_keeps_its_own_status() -> None:
    async with failing_server() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await _call_both_stream(channel, [])

    assert failed.value.code() is grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == "reservation_id: no such reservation"
