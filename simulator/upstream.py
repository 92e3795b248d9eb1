"""An OpenAI-compatible inference server with deterministic tokens, set latency and failures.

What a rented `sim` machine runs (`gpuproxy sim-upstream`), and what tests and benchmarks
call directly. It answers like OpenAI (and vLLM) do:

- `GET /v1/models`, `GET /health`;
- `POST /v1/chat/completions` and `POST /v1/completions`, whole or streamed as server-sent
  events (`"stream": true`), with a usage chunk when `stream_options.include_usage` is set;
- 400 with an OpenAI error body naming the field for a bad request; 404 `model_not_found`
  for a model other than the one it serves, as OpenAI answers (a missing `model` means the
  served one, as vLLM allows). One choice per request: `n`, `stop`, `logprobs`,
  `temperature` and the like are accepted and ignored.

Latency and failures are server options, and per request the headers `x-sim-ttft-ms`,
`x-sim-token-delay-ms` and `x-sim-fail` (a mode, or `none` to spare this request from the
server's mode) override them. Failure modes (`FailMode`) apply to inference calls only:
`/v1/models` and `/health` always answer, so a failing machine still looks ready, which is
exactly the machine a proxy must survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, NoReturn

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from simulator import tokens
from simulator.market import process_alive

DEFAULT_MODEL = "sim-llama-3-8b"
DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_CAP = 4096
"""Larger `max_tokens` is refused (400), as a real server refuses more than its context."""

EXIT_DIED = 3
"""Exit status of a machine that died on purpose (`FailMode.DIE`)."""

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class FailMode(enum.StrEnum):
    REFUSE = "refuse"
    """Answer 503 with an OpenAI error body."""
    SLOW = "slow"
    """Wait `slow_ms` more before answering (a stuck or overloaded machine)."""
    CUT = "cut"
    """Send `fail_after` tokens, then drop the connection: no final chunk, no `[DONE]`."""
    DIE = "die"
    """Send `fail_after` tokens, then the whole process exits at once: the machine died."""


class UpstreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    host: str = "127.0.0.1"
    model: str = DEFAULT_MODEL
    ttft_ms: NonNegative = 0
    """Delay before the first token."""
    token_delay_ms: NonNegative = 0
    """Delay between two tokens."""
    fail: FailMode | None = None
    fail_rate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0
    """Fraction of inference requests that `fail` applies to, spread evenly and
    deterministically: at 0.2, the 5th, 10th, 15th... request fails."""
    slow_ms: NonNegative = 30_000
    fail_after: NonNegative = 2
    """Tokens sent before `cut` or `die` strikes."""
    boot_delay_ms: NonNegative = 0
    """Wait this long before listening: a slow boot."""
    boot_fail: bool = False
    """Exit at once with status 1: a failed boot."""
    owner_pid: int = 0
    """Exit when this process has ended (checked every second); 0: never."""


class Behaviour(msgspec.Struct, frozen=True):
    """How one request is answered, after the headers have had their say."""

    ttft: float
    token_delay: float
    fail: FailMode | None


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One inference request, checked."""

    kind: Literal["chat", "text"]
    prompt: str
    max_tokens: int
    seed: int | None
    stream: bool
    include_usage: bool


class ApiError(Exception):
    """Answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }
        headers = {"retry-after": "1"} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class ConnectionCut(Exception):
    """Raised mid-answer: the server closes the connection without finishing it."""


def _is_cut(exc: BaseException | None) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_cut(inner) for inner in exc.exceptions)
    return isinstance(exc, ConnectionCut)


class _QuietCuts(logging.Filter):
    """A cut is on purpose: keep uvicorn from logging it as a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_cut(record.exc_info[1]))


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def _die() -> NoReturn:
    sys.stderr.write("sim-upstream: died on purpose (fail mode 'die')\n")
    sys.stderr.flush()
    os._exit(EXIT_DIED)


async def _break(fail: FailMode) -> None:
    """End the answer the way `fail` says; called after the tokens it lets through."""
    # A moment for the event loop to hand what was sent to the kernel.
    await asyncio.sleep(0.05)
    if fail is FailMode.DIE:
        _die()
    raise ConnectionCut


class PartialResponse(Response):
    """A whole answer announced by its Content-Length, of which only the first half is sent
    before `fail` strikes."""

    def __init__(self, content: bytes, fail: FailMode) -> None:
        super().__init__(content, media_type="application/json")
        self.fail = fail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        half = self.body[: len(self.body) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        await _break(self.fail)


def _int_field(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"Invalid type for '{name}': expected an integer.", param=name)
    return value


def _text_of(content: Any, where: str) -> str:
    """The text of a message's content: a string, or a list of parts of which the `text`
    ones count (images and audio add nothing to a simulated answer)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise ApiError(400, f"Invalid type for '{where}': expected a string or an array.", param=where)


def _prompt_of(kind: Literal["chat", "text"], body: dict[str, Any]) -> str:
    field = "messages" if kind == "chat" else "prompt"
    if body.get(field) is None:
        raise ApiError(
            400,
            f"Missing required parameter: '{field}'.",
            param=field,
            code="missing_required_parameter",
        )
    value = body[field]
    if kind == "text":
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise ApiError(
                400, "Invalid 'prompt': expected a string (one prompt per request).", param=field
            )
        return value
    if not isinstance(value, list) or not value:
        raise ApiError(400, "Invalid 'messages': expected a non-empty array.", param=field)
    texts = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"Invalid '{where}': expected an object with a role.", param=where)
        texts.append(_text_of(message.get("content"), f"{where}.content"))
    return "\n".join(texts)


def _job_of(kind: Literal["chat", "text"], body: dict[str, Any]) -> Job:
    prompt = _prompt_of(kind, body)
    # Chat's newer name wins over the older one, as at OpenAI.
    newer = kind == "chat" and body.get("max_completion_tokens") is not None
    limit = "max_completion_tokens" if newer else "max_tokens"
    max_tokens = _int_field(body, limit, DEFAULT_MAX_TOKENS)
    assert max_tokens is not None
    if not 1 <= max_tokens <= MAX_TOKENS_CAP:
        raise ApiError(
            400,
            f"Invalid '{limit}': {max_tokens}; this model answers 1 to {MAX_TOKENS_CAP} tokens.",
            param=limit,
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "Invalid type for 'stream': expected a boolean.", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise ApiError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ApiError(
            400, "Invalid type for 'stream_options': expected an object.", param="stream_options"
        )
    return Job(
        kind=kind,
        prompt=prompt,
        max_tokens=max_tokens,
        seed=_int_field(body, "seed", None),
        stream=stream,
        include_usage=bool((stream_options or {}).get("include_usage")),
    )


class Upstream:
    """The endpoints of one server, with the state its fail rate counts on."""

    def __init__(self, options: UpstreamOptions) -> None:
        self.options = options
        self.started = int(time.time())
        self._counted = 0

    def app(self) -> Starlette:
        async def api_error(_: Request, exc: Exception) -> Response:
            assert isinstance(exc, ApiError)
            return exc.response()

        return Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.text, methods=["POST"]),
            ],
            exception_handlers={ApiError: api_error},
        )

    async def health(self, _: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.options.model})

    async def models(self, _: Request) -> Response:
        model = {
            "id": self.options.model,
            "object": "model",
            "created": self.started,
            "owned_by": "gpuproxy-sim",
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def chat(self, request: Request) -> Response:
        return await self._answer("chat", request)

    async def text(self, request: Request) -> Response:
        return await self._answer("text", request)

    async def _answer(self, kind: Literal["chat", "text"], request: Request) -> Response:
        body = await self._body(request)
        job = _job_of(kind, body)
        behaviour = self._behaviour(request)
        if behaviour.fail is FailMode.REFUSE:
            raise ApiError(
                503,
                "The server is overloaded (simulated); retry later or elsewhere.",
                code="service_unavailable",
            )
        if behaviour.fail is FailMode.SLOW:
            await asyncio.sleep(self.options.slow_ms / 1000)
        answer = tokens.generate(self.options.model, job.prompt, job.max_tokens, job.seed)
        finish = "length" if len(answer) == job.max_tokens else "stop"
        usage = {
            "prompt_tokens": tokens.count_prompt_tokens(job.prompt),
            "completion_tokens": len(answer),
            "total_tokens": tokens.count_prompt_tokens(job.prompt) + len(answer),
        }
        reply = Reply(kind=kind, model=self.options.model, usage=usage, finish=finish)
        if job.stream:
            return StreamingResponse(
                self._stream(reply, answer, behaviour, job.include_usage),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        await asyncio.sleep(behaviour.ttft + behaviour.token_delay * (len(answer) - 1))
        whole = msgspec.json.encode(reply.whole("".join(answer)))
        if behaviour.fail in (FailMode.CUT, FailMode.DIE):
            return PartialResponse(whole, behaviour.fail)
        return Response(whole, media_type="application/json")

    async def _stream(
        self, reply: Reply, answer: list[str], behaviour: Behaviour, include_usage: bool
    ) -> AsyncIterator[bytes]:
        await asyncio.sleep(behaviour.ttft)
        if reply.kind == "chat":
            yield _sse(reply.chunk({"role": "assistant", "content": ""}, None, include_usage))
        for index, piece in enumerate(answer):
            if behaviour.fail in (FailMode.CUT, FailMode.DIE) and index == self.options.fail_after:
                break
            if index:
                await asyncio.sleep(behaviour.token_delay)
            yield _sse(reply.chunk(piece, None, include_usage))
        if behaviour.fail in (FailMode.CUT, FailMode.DIE):
            await _break(behaviour.fail)
        empty: dict[str, str] | str = {} if reply.kind == "chat" else ""
        yield _sse(reply.chunk(empty, reply.finish, include_usage))
        if include_usage:
            yield _sse(reply.usage_chunk())
        yield b"data: [DONE]\n\n"

    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            body = msgspec.json.decode(await request.body())
        except msgspec.DecodeError:
            body = None
        if not isinstance(body, dict):
            raise ApiError(
                400,
                "We could not parse the JSON body of your request: it must be a JSON object.",
                code="invalid_json",
            )
        model = body.get("model", self.options.model)
        if not isinstance(model, str):
            raise ApiError(400, "Invalid type for 'model': expected a string.", param="model")
        if model != self.options.model:
            raise ApiError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.options.model}`.",
                param="model",
                code="model_not_found",
            )
        return body

    def _behaviour(self, request: Request) -> Behaviour:
        ttft = self._header_ms(request, "x-sim-ttft-ms", self.options.ttft_ms)
        delay = self._header_ms(request, "x-sim-token-delay-ms", self.options.token_delay_ms)
        asked = request.headers.get("x-sim-fail")
        fail: FailMode | None
        if asked is None:
            fail = self.options.fail if self._strikes() else None
        elif asked == "none":
            fail = None
        else:
            try:
                fail = FailMode(asked)
            except ValueError:
                modes = ", ".join(["none", *FailMode])
                raise ApiError(
                    400, f"Invalid 'x-sim-fail': {asked!r}; one of {modes}.", param="x-sim-fail"
                ) from None
        return Behaviour(ttft / 1000, delay / 1000, fail)

    def _strikes(self) -> bool:
        """Whether the server's fail mode hits this request; counts requests it could hit."""
        if self.options.fail is None:
            return False
        self._counted += 1
        rate = self.options.fail_rate
        return math.floor(self._counted * rate) > math.floor((self._counted - 1) * rate)

    @staticmethod
    def _header_ms(request: Request, name: str, default: int) -> int:
        raw = request.headers.get(name)
        if raw is None:
            return default
        if not raw.strip().isdigit():
            raise ApiError(
                400, f"Invalid '{name}': {raw!r}; expected milliseconds (>= 0).", param=name
            )
        return int(raw)


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """The parts every body of one answer shares, and the bodies built from them."""

    kind: Literal["chat", "text"]
    model: str
    usage: dict[str, int]
    finish: str
    id: str = msgspec.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = msgspec.field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            kind = "chat.completion.chunk" if chunk else "chat.completion"
            return {"id": f"chatcmpl-{self.id}", "object": kind}
        return {"id": f"cmpl-{self.id}", "object": "text_completion"}

    def whole(self, text: str) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=self.finish)
        return {
            **self._head(chunk=False),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage,
        }

    def chunk(
        self, piece: dict[str, str] | str, finish: str | None, include_usage: bool
    ) -> dict[str, Any]:
        """One streamed chunk: `piece` is a chat delta (a string means its content) or a
        completion's text."""
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["delta"] = {"content": piece} if isinstance(piece, str) else piece
        else:
            choice["text"] = piece
        choice.update(logprobs=None, finish_reason=finish)
        chunk = {
            **self._head(chunk=True),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if include_usage:
            # OpenAI marks every chunk but the last with "usage": null when usage is asked.
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        return {
            **self._head(chunk=True),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage,
        }


async def _watch_owner(pid: int, server: uvicorn.Server, gone: asyncio.Event) -> None:
    # No event tells a process another one ended; polling once a second is cheap.
    while process_alive(pid):  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    sys.stderr.write(f"sim-upstream: owner process {pid} has ended; stopping\n")
    server.should_exit = True
    gone.set()


async def _main(options: UpstreamOptions) -> None:
    config = uvicorn.Config(
        Upstream(options).app(),
        host=options.host,
        port=options.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        # A destroy or an ended owner must not wait for slow streams to finish.
        timeout_graceful_shutdown=1,
    )
    logging.getLogger("uvicorn.error").addFilter(_QuietCuts())
    server = uvicorn.Server(config)
    owner_gone = asyncio.Event()
    watcher = (
        asyncio.create_task(_watch_owner(options.owner_pid, server, owner_gone))
        if options.owner_pid
        else None
    )
    try:
        if options.boot_delay_ms:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(owner_gone.wait(), options.boot_delay_ms / 1000)
        if not owner_gone.is_set():
            sys.stderr.write(
                f"sim-upstream: serving {options.model} on http://{options.host}:{options.port}"
                f" (pid {os.getpid()})\n"
            )
            await server.serve()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def serve(options: UpstreamOptions) -> int:
    """Run the server until it is stopped (SIGTERM, Ctrl-C, its owner's end); the exit
    status to leave with."""
    if options.boot_fail:
        sys.stderr.write("sim-upstream: boot failed on purpose (SIM_BOOT_FAIL / --boot-fail)\n")
        return 1
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(options))
    else:
        uvloop.run(_main(options))
    return 0
