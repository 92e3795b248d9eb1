"""The OpenAI-compatible HTTP front door: `/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings`, `/v1/responses` and `/v1/models`.

Each request becomes one `Inference` command for the proxy worker. A streamed answer is
written as the server-sent events the worker relays, as they come; an error after the first
event is a final `data: {"error": ...}` event, since the status line has gone. An error before
it is an ordinary HTTP error in OpenAI's format. A client that goes away cancels the command,
and the worker closes the machine's connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bus.caller import CommandCaller
from gateway import validation
from gateway.auth import principal
from gateway.auth.http_guard import HttpGuard
from gateway.auth.policy import INFERENCE
from gateway.config import GatewayConfig
from gateway.errors import openai_error
from gateway.http_io import json_response
from gateway.http_query import only
from gateway.inference import requests
from gateway.inference.service import (
    COST_HEADER,
    SESSION_HEADER,
    InferenceService,
    Pieces,
    whole_body,
)
from gateway.inference.targets import instance_named
from schemas.commands import ListModels
from schemas.errors import GpuproxyError, Internal
from schemas.inference import Api, InferenceDone, ModelList
from schemas.replies import Data
from schemas.subjects import WorkerKind

IDEMPOTENCY_KEY = "Idempotency-Key"
INSTANCE_HEADER = "x-gpuproxy-instance"
"""Names the one machine (of yours) to serve the request, by its instance id."""
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def routes(guard: HttpGuard, caller: CommandCaller, config: GatewayConfig) -> list[Route]:
    service = InferenceService(caller)

    def endpoint(api: Api) -> Callable[[Request], Awaitable[Response]]:
        async def infer(request: Request) -> Response:
            timeout = config.inference_timeout
            checked = requests.check(api, await request.body())
            command = service.command(
                principal.current(),
                api,
                checked,
                idempotency_key=request.headers.get(IDEMPOTENCY_KEY),
                key_field=IDEMPOTENCY_KEY,
                session_key=request.headers.get(SESSION_HEADER, ""),
                instance_id=instance_named(request.headers.get(INSTANCE_HEADER, "")),
            )
            if not checked.stream:
                return _whole(await service.whole(command, timeout=timeout))
            first, rest = await service.stream(command, timeout=timeout)
            if isinstance(first, InferenceDone):
                return _whole(first)
            return StreamingResponse(
                events(first, rest), media_type="text/event-stream", headers=SSE_HEADERS
            )

        infer.__name__ = f"infer_{api}"
        return infer

    async def models(request: Request) -> Response:
        who = principal.current()
        command = ListModels(
            command_id=validation.command_id(None, field=IDEMPOTENCY_KEY, owner=who.user_id),
            actor=who.user_id,
            actor_admin=who.is_admin,
            actor_role=str(who.role),
        )
        listed = await caller.call(WorkerKind.PROXY, command, timeout=config.request_timeout)
        assert isinstance(listed, ModelList)
        data = [
            {
                "id": m.id,
                "object": "model",
                "created": m.created,
                "owned_by": m.owned_by,
                "instances": m.instances,
            }
            for m in listed.models
        ]
        return json_response(200, {"object": "list", "data": data})

    made = [
        guard.route(api.path, only(endpoint(api)), methods=["POST"], requirement=INFERENCE)
        for api in Api
    ]
    made.append(guard.route("/v1/models", only(models), methods=["GET"], requirement=INFERENCE))
    return made


def _whole(done: InferenceDone) -> Response:
    """A whole answer, or the machine's own refusal of the request, passed on as it is."""
    return Response(
        whole_body(done),
        status_code=done.status,
        media_type="application/json",
        headers={COST_HEADER: str(done.cost_micros)},
    )


async def events(first: Data, rest: Pieces) -> AsyncIterator[bytes]:
    """A stream's server-sent events for the client: the first piece, the rest as they
    come, and a final error event if the answer breaks off."""
    try:
        yield first.body
        async for piece in rest:
            if isinstance(piece, Data):
                yield piece.body
    except GpuproxyError as exc:
        yield _error_event(exc)
    except Exception:
        yield _error_event(Internal("the answer broke off"))
    finally:
        await rest.aclose()


def _error_event(error: GpuproxyError) -> bytes:
    return b"data: " + msgspec.json.encode(openai_error(error)) + b"\n\n"
