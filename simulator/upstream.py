"""An OpenAI-compatible inference server with deterministic tokens, set latency and failures.

What a rented `sim` machine runs (`gpuproxy sim-upstream`), and what tests and benchmarks
call directly. It answers like OpenAI (and vLLM) do:

- `GET /v1/models`, `GET /health`;
- `POST /v1/chat/completions` and `POST /v1/completions`, whole or streamed as server-sent
  events (`"stream": true`), with a usage chunk when `stream_options.include_usage` is set;
- `POST /v1/responses`, the Responses API without storage (`simulator.response`);
- `POST /v1/embeddings`, deterministic unit vectors (`simulator.embedding`);
- 400 with an OpenAI error body naming the field for a bad request; 404 `model_not_found`
  for a model other than the one it serves, as OpenAI answers (a missing `model` means the
  served one, as vLLM allows). One choice per request: `n`, `stop`, `logprobs`,
  `temperature` and the like are accepted and ignored.

With `api_key` set, `/v1/*` wants `Authorization: Bearer <key>` (`simulator.api_key`).
`GET /sim/stats` is the simulator's own window on what it has seen (`simulator.stats`).

Latency and failures are server options, and per request the headers `x-sim-ttft-ms`,
`x-sim-token-delay-ms` and `x-sim-fail` (a mode, or `none` to spare this request from the
server's mode) override them. Failure modes (`FailMode`) apply to inference calls only:
`/v1/models` and `/health` always answer, so a failing machine still looks ready, which is
exactly the machine a proxy must survive. Embeddings have no tokens to stream, so `cut` and
`die` treat them as whole answers: half the body, then the cut or the death.

Time to first token is `ttft_ms`, plus `prefill_us_per_token` for each prompt token the KV
cache (`simulator.cache`) does not hold, plus any wait for a batch slot (`max_batch`).
An embeddings request is a prefill without cache: `ttft_ms` plus every token's prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from simulator import embedding, tokens
from simulator.api_key import ApiKeyGate
from simulator.cache import PrefixCache
from simulator.errors import ApiError, overloaded, throttled
from simulator.failure import EXIT_DIED as EXIT_DIED
from simulator.failure import FailMode, PartialResponse, QuietCuts, break_off
from simulator.job import Job, Kind, embedding_job_of, job_of
from simulator.market import process_alive
from simulator.reply import Reply, Shape, Usage
from simulator.response import ResponseReply
from simulator.stats import Outcome, Stats, Visit
from simulator.stream import Emit, EventStream, watching

DEFAULT_MODEL = "sim-llama-3-8b"

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


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
    api_key: str = ""
    """The key `/v1/*` asks for as `Authorization: Bearer <key>`; empty: none asked."""
    prefill_us_per_token: NonNegative = 0
    """Microseconds of prefill for each prompt token the KV cache does not hold."""
    cache_blocks: NonNegative = 0
    """Blocks the KV cache holds (least recently used go first); 0: no cache."""
    block_tokens: Annotated[int, msgspec.Meta(ge=1)] = 16
    """Tokens in a KV-cache block."""
    max_batch: NonNegative = 0
    """Inference requests generating at once; more wait their turn in order. 0: no limit."""

    def __repr__(self) -> str:
        # The key must not reach a log through a printed options object.
        fields = {name: getattr(self, name) for name in self.__struct_fields__}
        if self.api_key:
            fields["api_key"] = "***"
        return "UpstreamOptions(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


class Behaviour(msgspec.Struct, frozen=True):
    """How one request is answered, after the headers have had their say."""

    ttft: float
    token_delay: float
    fail: FailMode | None


class Upstream:
    """The endpoints of one server, with the state its fail rate, KV cache, batch limit and
    stats count on."""

    def __init__(self, options: UpstreamOptions) -> None:
        self.options = options
        self.started = int(time.time())
        self.stats = Stats()
        self.cache = PrefixCache(options.cache_blocks, options.block_tokens)
        # FIFO: asyncio's semaphore wakes its waiters in the order they came.
        self._batch = asyncio.Semaphore(options.max_batch) if options.max_batch else None
        self._counted = 0

    def app(self) -> Starlette:
        async def api_error(_: Request, exc: Exception) -> Response:
            assert isinstance(exc, ApiError)
            return exc.response()

        return Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/sim/stats", self.sim_stats, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.text, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            ],
            middleware=[Middleware(ApiKeyGate, key=self.options.api_key)],
            exception_handlers={ApiError: api_error},
        )

    async def health(self, _: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.options.model})

    async def sim_stats(self, _: Request) -> Response:
        return JSONResponse(self.stats.snapshot())

    async def models(self, _: Request) -> Response:
        model = {
            "id": self.options.model,
            "object": "model",
            "created": self.started,
            "owned_by": "gpuproxy-sim",
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def chat(self, request: Request) -> Response:
        return await self._generate("chat", request)

    async def text(self, request: Request) -> Response:
        return await self._generate("text", request)

    async def responses(self, request: Request) -> Response:
        return await self._generate("response", request)

    async def embeddings(self, request: Request) -> Response:
        visit = self.stats.arrive()
        try:
            job = embedding_job_of(await self._body(request))
            behaviour = self._behaviour(request)
            if not await self._strike(request, behaviour):
                return self._gone(visit)
            used = embedding.prompt_tokens(job)
            async with watching(request.receive) as watch, self._slot():
                self.stats.prefilled(used, 0)
                await asyncio.sleep(behaviour.ttft + self._prefill_seconds(used))
            if watch.gone:
                return self._gone(visit)
            return self._whole(embedding.body(job, self.options.model), behaviour, visit)
        except BaseException:
            visit.end(Outcome.FAILED)
            raise

    async def _generate(self, kind: Kind, request: Request) -> Response:
        visit = self.stats.arrive()
        try:
            job = job_of(kind, await self._body(request))
            behaviour = self._behaviour(request)
            if not await self._strike(request, behaviour):
                return self._gone(visit)
            answer = tokens.generate(
                self.options.model, job.prompt, job.max_tokens, job.seed, ignore_eos=job.ignore_eos
            )
            shape = self._shape(job, finish="length" if len(answer) == job.max_tokens else "stop")
            if job.stream:

                async def produce(emit: Emit) -> None:
                    await self._stream(emit, job, answer, shape, behaviour)

                # The stream ends the visit, when it ends.
                return EventStream(produce, visit)
            prompt_tokens = tokens.count_prompt_tokens(job.prompt)
            async with watching(request.receive) as watch, self._prefill(job) as cached:
                first = behaviour.ttft + self._prefill_seconds(prompt_tokens - cached)
                await asyncio.sleep(first + behaviour.token_delay * (len(answer) - 1))
            if watch.gone:
                return self._gone(visit)
            usage = Usage(prompt_tokens, len(answer), cached)
            return self._whole(shape.whole("".join(answer), usage), behaviour, visit)
        except BaseException:
            visit.end(Outcome.FAILED)
            raise

    def _shape(self, job: Job, finish: str) -> Shape:
        if job.kind == "response":
            return ResponseReply(
                model=self.options.model,
                finish=finish,
                max_output_tokens=job.max_tokens,
                instructions=job.instructions,
            )
        return Reply(
            kind=job.kind,
            model=self.options.model,
            finish=finish,
            include_usage=job.include_usage,
            report_cached=self.options.cache_blocks > 0,
        )

    async def _stream(
        self, emit: Emit, job: Job, answer: list[str], shape: Shape, behaviour: Behaviour
    ) -> None:
        for frame in shape.preamble():
            await emit(frame)
        prompt_tokens = tokens.count_prompt_tokens(job.prompt)
        async with self._prefill(job) as cached:
            await asyncio.sleep(behaviour.ttft + self._prefill_seconds(prompt_tokens - cached))
            for frame in shape.opening():
                await emit(frame)
            for index, piece in enumerate(answer):
                if behaviour.fail and behaviour.fail.breaks and index == self.options.fail_after:
                    break
                if index:
                    await asyncio.sleep(behaviour.token_delay)
                await emit(shape.piece(piece))
            if behaviour.fail and behaviour.fail.breaks:
                await break_off(behaviour.fail)
            usage = Usage(prompt_tokens, len(answer), cached)
            for frame in shape.closing("".join(answer), usage):
                await emit(frame)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Hold one of `max_batch` places while generating; wait in line for it."""
        if self._batch is None:
            yield
            return
        async with self._batch:
            yield

    @contextlib.asynccontextmanager
    async def _prefill(self, job: Job) -> AsyncIterator[int]:
        """A batch slot for the whole generation, and the prompt tokens the KV cache holds
        when it starts; the prompt's blocks are cached when it ends, however it ends."""
        async with self._slot():
            words = tokens.split_prompt(job.prompt)
            cached = self.cache.cached_tokens(words)
            self.stats.prefilled(tokens.count_prompt_tokens(job.prompt), cached)
            try:
                yield cached
            finally:
                self.cache.store(words)

    def _prefill_seconds(self, uncached_tokens: int) -> float:
        return self.options.prefill_us_per_token * uncached_tokens / 1_000_000

    @staticmethod
    def _whole(payload: dict[str, Any], behaviour: Behaviour, visit: Visit) -> Response:
        body = msgspec.json.encode(payload)
        if behaviour.fail and behaviour.fail.breaks:
            visit.end(Outcome.FAILED)
            return PartialResponse(body, behaviour.fail)
        visit.end(Outcome.COMPLETED)
        return Response(body, media_type="application/json")

    @staticmethod
    def _gone(visit: Visit) -> Response:
        visit.end(Outcome.DISCONNECTED)
        # Nobody is left to read it.
        return Response(status_code=499)

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

    async def _strike(self, request: Request, behaviour: Behaviour) -> bool:
        """Refuse the request, or wait out `slow`, as its fail mode says; whether the client
        is still there to answer."""
        if behaviour.fail is FailMode.REFUSE:
            raise overloaded()
        if behaviour.fail is FailMode.THROTTLE:
            raise throttled()
        if behaviour.fail is not FailMode.SLOW:
            return True
        async with watching(request.receive) as watch:
            await asyncio.sleep(self.options.slow_ms / 1000)
        return not watch.gone

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
    logging.getLogger("uvicorn.error").addFilter(QuietCuts())
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
