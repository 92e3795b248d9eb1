"""The original inference routes, kept for clients built against them: `POST /api/v1/gpu/proxy`
and the WebSocket `/ws`. Both send the same `Inference` command as `/v1/*` and gRPC.

A request is the gRPC `ProxyRequestMessage` as JSON; only `target_url` and `body` are needed:

    {"protocol": "http",                     http, https or openinference; all speak OpenAI's API
     "target_url": "model://sim-llama-3-8b/v1/chat/completions",   or instance://<id>[/<path>]
     "method": "POST",
     "headers": {"x-session-id": "chat-7"},  only x-session-id is read (session affinity)
     "body": {"messages": [...]},            the OpenAI request: a JSON object or a string of one
     "timeout": 30,                          seconds, at most the gateway's; 0 or absent: its own
     "stream": true}                         sets the body's `stream`; absent: the body decides

`target_url` names a model or a machine, never a host: `http://...` is refused before anything
is published. Other headers are not forwarded; the machine's credentials are the proxy's.

`POST /api/v1/gpu/proxy` answers a whole request with HTTP 200 and the envelope the original
answered with, `{"status_code", "headers", "body"}`: the machine's status inside (a machine's
400 is its answer to relay, not a failure of the route, and a client of the original reads
`status_code`), its JSON `body` as it came. A streamed one is the machine's server-sent events,
relayed as `/v1/chat/completions` relays them. What the gateway refuses or cannot do is an HTTP
error in our format, `{"error": {"code", "message", "field"}}`. `Idempotency-Key` works as on
`/v1/*`.

`/ws` carries JSON frames. `{"type": "ping"}` is answered `{"type": "pong"}`.
`{"type": "proxy", "request_id": "r1", ...the fields above}` starts a request, which runs beside
the others on the socket; its answer is `{"type": "chunk", "request_id", "data"}` frames (`data`:
the server-sent event text) as they come, then `{"type": "done", "request_id", "status_code",
"cost_micros"}` (with `body` when the answer came whole) or `{"type": "error", "request_id",
"error": {"code", "message", "field"}}`. A client that closes the socket stops what it started.

The handshake carries the credential as HTTP does (`Authorization: Bearer`, `X-API-Key`); a
browser, which cannot set headers there, offers the subprotocols `gpuproxy, bearer.<credential>`
and gets `gpuproxy` back. Never the query string: URLs are written to logs (uvicorn's, and every
proxy's on the way), so `/ws?...` is refused, its query blanked before this gateway logs the
path. The handshake is admitted like an HTTP request (401, 403 or 429 with our error body), and
so is each `proxy` frame: rate limits count requests, and a key revoked meanwhile stops working.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Annotated, Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from bus.caller import CommandCaller
from bus.tasks import cancel_and_wait
from gateway.auth import principal
from gateway.auth.gatekeeper import Gatekeeper, Presented
from gateway.auth.http_guard import REQUIREMENT, HttpGuard
from gateway.auth.policy import INFERENCE
from gateway.auth.principal import Principal
from gateway.config import GatewayConfig
from gateway.errors import http_answer, internal_answer
from gateway.http_io import body, field_of, json_response, too_large
from gateway.http_query import only
from gateway.inference.http import IDEMPOTENCY_KEY, SSE_HEADERS, events
from gateway.inference.service import COST_HEADER, InferenceService, bounded_timeout, whole_body
from gateway.unexpected import logged
from schemas.commands import Inference
from schemas.errors import (
    GpuproxyError,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from schemas.inference import InferenceDone
from schemas.replies import Data

T = TypeVar("T")

PATH = "/api/v1/gpu/proxy"
SOCKET_PATH = "/ws"
SOCKET_ENDPOINT = f"WEBSOCKET {SOCKET_PATH}"
SUBPROTOCOL = "gpuproxy"
BEARER = "bearer."
"""A subprotocol `bearer.<credential>` carries the credential of a browser's handshake."""
MAX_RUNNING = 64
"""Requests running at once on one socket: more is a client gone wrong, not a workload."""
MAX_REQUEST_ID = 128
POLICY_VIOLATION = 1008


class ProxyCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    protocol: str = "http"
    target_url: str
    method: str = "POST"
    headers: dict[str, str] = {}
    body: msgspec.Raw
    """The OpenAI request: a JSON object, or a string holding one."""
    timeout: Annotated[float, msgspec.Meta(ge=0)] = 0
    stream: bool | None = None


class ProxyFrame(ProxyCall, kw_only=True, forbid_unknown_fields=True):
    type: str
    request_id: str


class _Envelope(msgspec.Struct):
    """What every frame is read for first, so that even a bad one is answered by its id."""

    type: str = ""
    request_id: str = ""


def routes(guard: HttpGuard, caller: CommandCaller, config: GatewayConfig) -> list[BaseRoute]:
    service = InferenceService(caller)
    gatekeeper = guard.gatekeeper

    async def proxy(request: Request) -> Response:
        call = await body(request, ProxyCall)
        command = command_of(
            service,
            call,
            principal.current(),
            idempotency_key=request.headers.get(IDEMPOTENCY_KEY),
        )
        timeout = bounded_timeout(call.timeout, config.inference_timeout)
        if not command.stream:
            return _enveloped(await service.whole(command, timeout=timeout))
        first, rest = await service.stream(command, timeout=timeout)
        if isinstance(first, InferenceDone):
            return _enveloped(first)
        return StreamingResponse(
            events(first, rest), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def socket(websocket: WebSocket) -> None:
        query = _blank_query(websocket)
        try:
            if query:
                raise InvalidArgument(
                    "this route takes no query parameters: send the credential in a header "
                    f"or as the subprotocol {BEARER}<credential>",
                    field=query,
                )
            presented, offered = presented_by_socket(websocket)
            await gatekeeper.admit(presented, INFERENCE, SOCKET_ENDPOINT)
        except GpuproxyError as exc:
            await _refuse(websocket, *http_answer(exc), exc.headers())
            return
        except Exception as exc:
            # The HTTP middleware that gives a failure an id and a log line sees no sockets.
            await _refuse(websocket, *internal_answer(logged(exc, SOCKET_ENDPOINT)))
            return
        await websocket.accept(subprotocol=SUBPROTOCOL if offered else None)
        conversation = Conversation(
            websocket,
            service,
            gatekeeper,
            presented,
            timeout=config.inference_timeout,
            max_frame=config.max_body_bytes,
        )
        await conversation.run()

    setattr(socket, REQUIREMENT, INFERENCE)
    return [
        guard.route(PATH, only(proxy), methods=["POST"], requirement=INFERENCE),
        WebSocketRoute(SOCKET_PATH, socket),
    ]


def command_of(
    service: InferenceService, call: ProxyCall, who: Principal, *, idempotency_key: str | None
) -> Inference:
    return service.targeted(
        who,
        target_url=call.target_url,
        protocol=call.protocol,
        method=call.method,
        body=body_of(call),
        headers=call.headers,
        idempotency_key=idempotency_key,
        key_field=IDEMPOTENCY_KEY,
    )


def body_of(call: ProxyCall) -> bytes:
    """The OpenAI request to send: the body unwrapped from its string, with `stream` set when
    the call set it. What is wrong with the body is left for `requests.check` to name."""
    raw = bytes(call.body)
    if raw.startswith(b'"'):
        raw = msgspec.json.decode(raw, type=str).encode()
    if call.stream is None:
        return raw
    try:
        decoded = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw
    if not isinstance(decoded, dict):
        return raw
    asked = decoded.get("stream")
    if asked is not None and asked is not call.stream:
        raise InvalidArgument("says otherwise than the body's own `stream`", field="stream")
    decoded["stream"] = call.stream
    return msgspec.json.encode(decoded)


def presented_by_socket(websocket: WebSocket) -> tuple[Presented, bool]:
    """The handshake's credential, and whether the client offered our subprotocol."""
    headers = websocket.headers
    offered: list[str] = websocket.scope.get("subprotocols", [])
    carried = [p.removeprefix(BEARER) for p in offered if p.startswith(BEARER)]
    authorization = headers.get("authorization")
    if carried:
        if len(carried) > 1 or authorization is not None:
            raise Unauthenticated("send one credential, not several")
        authorization = f"Bearer {carried[0]}"
    presented = Presented(
        authorization=authorization,
        api_key=headers.get("x-api-key"),
        peer_host=websocket.client.host if websocket.client else "",
        forwarded_for=headers.get("x-forwarded-for"),
    )
    return presented, SUBPROTOCOL in offered


def _blank_query(websocket: WebSocket) -> str:
    """The name of the first query parameter, if any. The query itself leaves the scope, which
    uvicorn shares and logs the path from, so a credential put there is never written down."""
    raw: bytes = websocket.scope.get("query_string", b"")
    if not raw:
        return ""
    websocket.scope["query_string"] = b""
    pairs = urllib.parse.parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    return (pairs[0][0] if pairs else "query")[:64]


async def _refuse(
    websocket: WebSocket, status: int, answer: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    """A refused handshake answered as HTTP would answer it, where the server can."""
    if "websocket.http.response" not in websocket.scope.get("extensions", {}):
        await websocket.close(POLICY_VIOLATION)
        return
    response = json_response(status, answer)
    response.headers.update(headers or {})
    await websocket.send_denial_response(response)


def _enveloped(done: InferenceDone) -> Response:
    cost = str(done.cost_micros)
    envelope = {
        "status_code": done.status,
        "headers": {"content-type": "application/json", COST_HEADER: cost},
        "body": msgspec.Raw(whole_body(done)),
    }
    response = json_response(200, envelope)
    response.headers[COST_HEADER] = cost
    return response


def _frame(raw: bytes, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as exc:
        message, field = field_of(str(exc))
        raise InvalidArgument(message, field=field) from None
    except msgspec.DecodeError:
        raise InvalidArgument("each frame must be one JSON object") from None


class Conversation:
    """One accepted socket: reads frames, runs each `proxy` frame as its own task, writes the
    answers interleaved as they come."""

    def __init__(
        self,
        websocket: WebSocket,
        service: InferenceService,
        gatekeeper: Gatekeeper,
        presented: Presented,
        *,
        timeout: float,
        max_frame: int,
    ) -> None:
        self._websocket = websocket
        self._service = service
        self._gatekeeper = gatekeeper
        self._presented = presented
        self._timeout = timeout
        self._max_frame = max_frame
        self._writing = asyncio.Lock()
        self._running: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        try:
            while True:
                message = await self._websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                raw = text.encode() if text is not None else message.get("bytes") or b""
                await self._read(raw)
        finally:
            # Closing each command's stream tells the worker, which closes the machine's
            # connection: nobody is left to read the answer.
            await cancel_and_wait(list(self._running.values()))

    async def _read(self, raw: bytes) -> None:
        if len(raw) > self._max_frame:
            await self._failed("", too_large(self._max_frame))
            return
        try:
            envelope = _frame(raw, _Envelope)
        except GpuproxyError as exc:
            await self._failed("", exc)
            return
        request_id = envelope.request_id
        match envelope.type:
            case "ping":
                pong = {"type": "pong"}
                if request_id:
                    pong["request_id"] = request_id
                await self._send(pong)
            case "proxy":
                await self._start(request_id, raw)
            case _:
                await self._failed(request_id, InvalidArgument("ping or proxy", field="type"))

    async def _start(self, request_id: str, raw: bytes) -> None:
        try:
            self._check_room(request_id)
        except GpuproxyError as exc:
            await self._failed(request_id, exc)
            return
        task = asyncio.create_task(self._answer(request_id, raw))
        self._running[request_id] = task
        task.add_done_callback(lambda _: self._running.pop(request_id, None))

    def _check_room(self, request_id: str) -> None:
        if not request_id:
            raise InvalidArgument("name the request: its answer is told by it", field="request_id")
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"at most {MAX_REQUEST_ID} characters", field="request_id")
        if request_id in self._running:
            raise InvalidArgument("a request of this id is still running", field="request_id")
        if len(self._running) >= MAX_RUNNING:
            raise ResourceExhausted(
                f"at most {MAX_RUNNING} requests run at once on one socket", field="request_id"
            )

    async def _answer(self, request_id: str, raw: bytes) -> None:
        try:
            admission = await self._gatekeeper.admit(self._presented, INFERENCE, SOCKET_ENDPOINT)
            assert admission.principal is not None
            call = _frame(raw, ProxyFrame)
            command = command_of(self._service, call, admission.principal, idempotency_key=None)
            await self._relay(request_id, command, bounded_timeout(call.timeout, self._timeout))
        except GpuproxyError as exc:
            await self._failed(request_id, exc)
        except Exception as exc:
            _, answer = internal_answer(logged(exc, SOCKET_ENDPOINT))
            await self._send({"type": "error", "request_id": request_id, **answer})

    async def _relay(self, request_id: str, command: Inference, timeout: float) -> None:
        if not command.stream:
            done = await self._service.whole(command, timeout=timeout)
            await self._done(request_id, done, whole=True)
            return
        first, rest = await self._service.stream(command, timeout=timeout)
        if isinstance(first, InferenceDone):
            await self._done(request_id, first, whole=True)
            return
        try:
            await self._chunk(request_id, first)
            async for piece in rest:
                if isinstance(piece, Data):
                    await self._chunk(request_id, piece)
                else:
                    assert isinstance(piece.result, InferenceDone)
                    await self._done(request_id, piece.result, whole=False)
        finally:
            await rest.aclose()

    async def _chunk(self, request_id: str, piece: Data) -> None:
        data = piece.body.decode("utf-8", "replace")
        await self._send({"type": "chunk", "request_id": request_id, "data": data})

    async def _done(self, request_id: str, done: InferenceDone, *, whole: bool) -> None:
        frame: dict[str, Any] = {
            "type": "done",
            "request_id": request_id,
            "status_code": done.status,
            "cost_micros": done.cost_micros,
        }
        if whole:
            frame["body"] = msgspec.Raw(whole_body(done))
        await self._send(frame)

    async def _failed(self, request_id: str, error: GpuproxyError) -> None:
        _, answer = http_answer(error)
        await self._send({"type": "error", "request_id": request_id, **answer})

    async def _send(self, frame: dict[str, Any]) -> None:
        text = msgspec.json.encode(frame).decode()
        async with self._writing:
            if self._websocket.application_state is not WebSocketState.CONNECTED:
                return
            try:
                await self._websocket.send_text(text)
            except WebSocketDisconnect:
                return
