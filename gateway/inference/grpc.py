"""Inference on gRPC: `ProxyRequest` (unary) and `StreamProxyRequest` (bidirectional).

On the stream, every request runs as soon as it arrives, each its own command. A request that
names itself (`request_id`) has its answer written piece by piece as the pieces come,
interleaved with the others'. Requests without one, as a client built from the original
proto sends them, are answered one after the other in the order sent, so a reader that
cannot tell answers apart still can. The last message of each answer has `done` set; a
failure is a message with `error` for that request alone, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from gateway.auth.principal import Principal
from gateway.errors import grpc_status, http_answer
from gateway.inference.service import (
    COST_HEADER,
    InferenceService,
    bounded_timeout,
    whole_body,
)
from gateway.pb import gpuproxy_pb2 as pb
from schemas.commands import Inference
from schemas.errors import GpuproxyError, Internal
from schemas.inference import InferenceDone
from schemas.replies import Data

IDEMPOTENCY_KEY = "idempotency-key"
SSE = {"content-type": "text/event-stream"}


def command_of(
    service: InferenceService,
    request: pb.ProxyRequestMessage,
    who: Principal,
    *,
    idempotency_key: str | None,
) -> Inference:
    return service.targeted(
        who,
        target_url=request.target_url,
        protocol=request.protocol,
        method=request.method,
        body=request.body,
        headers=request.headers,
        idempotency_key=idempotency_key,
        key_field=IDEMPOTENCY_KEY,
    )


def _done(done: InferenceDone, request_id: str) -> pb.ProxyResponse:
    return pb.ProxyResponse(
        status_code=done.status,
        headers={"content-type": "application/json", COST_HEADER: str(done.cost_micros)},
        body=whole_body(done),
        request_id=request_id,
        done=True,
    )


def _failed(error: GpuproxyError, request_id: str) -> pb.ProxyResponse:
    _, message = grpc_status(error)
    status, _ = http_answer(error)
    return pb.ProxyResponse(status_code=status, error=message, request_id=request_id, done=True)


async def answer(
    service: InferenceService, command: Inference, request_id: str, *, timeout: float
) -> AsyncIterator[pb.ProxyResponse]:
    """One request's answer as ProxyResponse messages, the last with `done`."""
    if not command.stream:
        yield _done(await service.whole(command, timeout=timeout), request_id)
        return
    first, rest = await service.stream(command, timeout=timeout)
    if isinstance(first, InferenceDone):
        yield _done(first, request_id)
        return
    try:
        yield pb.ProxyResponse(status_code=200, headers=SSE, body=first.body, request_id=request_id)
        async for piece in rest:
            if isinstance(piece, Data):
                yield pb.ProxyResponse(status_code=200, body=piece.body, request_id=request_id)
            else:
                assert isinstance(piece.result, InferenceDone)
                yield pb.ProxyResponse(
                    status_code=200,
                    headers={COST_HEADER: str(piece.result.cost_micros)},
                    request_id=request_id,
                    done=True,
                )
    finally:
        await rest.aclose()


class Conversation:
    """One `StreamProxyRequest` stream: reads requests, runs them, writes their answers."""

    def __init__(
        self,
        service: InferenceService,
        who: Principal,
        context: grpc.aio.ServicerContext[pb.ProxyRequestMessage, pb.ProxyResponse],
        *,
        timeout: float,
    ) -> None:
        self._service = service
        self._who = who
        self._context = context
        self._timeout = timeout
        self._writing = asyncio.Lock()
        self._in_order: asyncio.Queue[asyncio.Queue[pb.ProxyResponse | None] | None] = (
            asyncio.Queue()
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, requests_in: AsyncIterator[pb.ProxyRequestMessage]) -> None:
        writer = asyncio.create_task(self._write_in_order())
        try:
            async for request in requests_in:
                if request.request_id:
                    self._spawn(self._answer_named(request))
                else:
                    queue: asyncio.Queue[pb.ProxyResponse | None] = asyncio.Queue()
                    await self._in_order.put(queue)
                    self._spawn(self._answer_into(request, queue))
            await self._in_order.put(None)
            await writer
            if self._tasks:
                await asyncio.gather(*self._tasks)
        finally:
            for task in (writer, *self._tasks):
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(writer, *self._tasks, return_exceptions=True)

    def _spawn(self, work: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _messages(self, request: pb.ProxyRequestMessage) -> AsyncIterator[pb.ProxyResponse]:
        try:
            command = command_of(self._service, request, self._who, idempotency_key=None)
            async for message in answer(
                self._service,
                command,
                request.request_id,
                timeout=bounded_timeout(request.timeout, self._timeout),
            ):
                yield message
        except GpuproxyError as exc:
            yield _failed(exc, request.request_id)
        except Exception:
            yield _failed(Internal("the answer broke off"), request.request_id)

    async def _answer_named(self, request: pb.ProxyRequestMessage) -> None:
        async for message in self._messages(request):
            async with self._writing:
                await self._context.write(message)

    async def _answer_into(
        self, request: pb.ProxyRequestMessage, queue: asyncio.Queue[pb.ProxyResponse | None]
    ) -> None:
        try:
            async for message in self._messages(request):
                await queue.put(message)
        finally:
            await queue.put(None)

    async def _write_in_order(self) -> None:
        while (queue := await self._in_order.get()) is not None:
            while (message := await queue.get()) is not None:
                async with self._writing:
                    await self._context.write(message)
