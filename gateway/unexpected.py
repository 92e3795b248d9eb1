"""What a client gets when the gateway fails in a way no one planned for.

A fixed message and an error id: gRPC INTERNAL (the id also in the `error-id` trailing
metadata), HTTP 500 with `{"error": {"code": "internal", "message", "error_id"}}`. The
exception's text never reaches the client: left alone, grpc.aio sends `Unexpected <type>:
<text>`, which for a database error is the SQL statement. The traceback goes to the log
under the same id, so an operator can find what a user reports.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import grpc_status, internal_answer, internal_status
from gateway.grpc_handlers import WrappingInterceptor, rebuilt
from gateway.http_io import json_response
from schemas.errors import GpuproxyError

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]

log = logging.getLogger("gpuproxy.gateway.unexpected")

ERROR_ID = "error-id"
"""The trailing metadata key that carries the error id of an INTERNAL answer."""


def logged(exc: BaseException, where: str) -> str:
    """Log an unplanned failure with its traceback; returns the id the client is told."""
    error_id = uuid.uuid4().hex
    log.error("unexpected failure in %s (error id %s)", where, error_id, exc_info=exc)
    return error_id


async def _answer(context: Context, exc: Exception, method: str) -> None:
    if isinstance(exc, GpuproxyError):
        # Ours on purpose, raised where no `answers_errors` stood (a streaming method).
        code, message = grpc_status(exc)
        trailing = tuple((k.lower(), v) for k, v in exc.headers().items())
        await context.abort(code, message, trailing_metadata=trailing)
    error_id = logged(exc, method)
    code, message = internal_status(error_id)
    await context.abort(code, message, trailing_metadata=((ERROR_ID, error_id),))


def _guarded(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    # The wrapper must be the kind of callable grpc.aio was given: an async generator
    # streams replies, a coroutine returns one (or answers through `context`).
    if inspect.isasyncgenfunction(behaviour):

        async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for reply in behaviour(request, context):
                    yield reply
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _answer(context, exc, method)

        return generator
    if not inspect.iscoroutinefunction(behaviour):
        return behaviour  # grpc.aio runs a plain function in a thread and answers itself

    async def coroutine(request: Any, context: Context) -> Any:
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _answer(context, exc, method)

    return coroutine


class UnexpectedErrors(WrappingInterceptor):
    """The outermost gRPC interceptor: every method, unary or streaming, of every service."""

    def wrap(self, method: str, handler: Handler) -> Handler:
        return rebuilt(handler, lambda behaviour, _: _guarded(behaviour, method))


class UnexpectedHttpErrors:
    """ASGI middleware inside Starlette's own error middleware, which would answer a bare
    text 500 and hand the exception on to uvicorn's log without an id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            error_id = logged(exc, f"{scope['method']} {scope['path']}")
            if started:
                # Too late for an answer: the server closes the connection, so the client
                # sees a cut-off body rather than a complete-looking one.
                return
            status, body = internal_answer(error_id)
            await json_response(status, body)(scope, receive, send)
