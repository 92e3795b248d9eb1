"""One inference request through the proxy worker: pick a machine, call it, stream it back.

The request goes to the machines the caller may use that serve its model, in the order the
balancer ranks them. A machine that cannot be reached, answers 5xx or 429 is passed over for
the next, but only before anything of its answer has been sent on: once the first event is
on its way to the client, a failure ends the request with an error, never a second answer
spliced into the first. Whatever the end (finished, failed, the client gone), one
`usage.inference` event records the tokens produced and delivered, priced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec

from bus.events import EventPublisher
from bus.runtime import Context
from schemas.balancing import Strategy
from schemas.commands import Inference
from schemas.errors import GpuproxyError, InvalidArgument, NotFound, Unavailable
from schemas.events import InferenceUsed
from schemas.inference import Api, InferenceDone, Usage
from schemas.prices import ModelPrice, PriceTable, cost_micros
from workers.proxy.directory import Directory, MachineKeys, Route
from workers.proxy.model_routes import ModelRoutes
from workers.proxy.prefixes import prefix_blocks
from workers.proxy.routing import Balancer
from workers.proxy.sse import DONE, EventReader
from workers.proxy.strategies import Strategies
from workers.proxy.upstream_client import UpstreamPool, UpstreamResponse
from workers.proxy.usage import (
    UsageMeter,
    ask_for_usage,
    client_view,
    is_usage_only_chunk,
    prompt_text,
)

log = logging.getLogger("gpuproxy.proxy.inference")

PASSED_OVER = frozenset({429, 500, 502, 503, 504})
"""Upstream statuses that send the request to the next machine (before anything was sent)."""
RECORD_PATIENCE = 30.0
"""Seconds a usage event is sent again while JetStream does not confirm it."""
MAX_COOLING_SECONDS = 60.0
MAX_TRIES = 3
"""Machines one request is offered to before it fails."""
SETTLE_SECONDS = 3.0
"""How long a request for a model nobody serves yet waits for machines that just started."""
FREE = ModelPrice(input=0, cached_input=0, output=0)
_STREAM_ENDS = {Api.RESPONSES: frozenset({"response.completed", "response.incomplete"})}
"""How a stream that is not ended by `[DONE]` says it is whole."""


class Timing:
    """When a request started and when its first piece went out."""

    __slots__ = ("first", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.first = 0.0

    def first_ms(self) -> int | None:
        return int((self.first - self.started) * 1000) if self.first else None


class UpstreamFailed(Exception):
    """A machine could not take the request; the next one may."""


class InferenceHandler:
    def __init__(
        self,
        directory: Directory,
        pool: UpstreamPool,
        balancer: Balancer,
        prices: PriceTable,
        events: EventPublisher,
        keys: MachineKeys,
        strategies: Strategies,
        *,
        request_timeout: float,
        models: ModelRoutes | None = None,
    ) -> None:
        self._models = models or ModelRoutes()
        self._cooling: dict[str, float] = {}
        """Machines that answered 429, until when they asked to be left alone."""
        self._keys = keys
        self._strategies = strategies
        self._directory = directory
        self._pool = pool
        self._balancer = balancer
        self._prices = prices
        self._events = events
        self._timeout = request_timeout

    async def __call__(self, command: Inference, ctx: Context) -> InferenceDone:
        body = _object_of(command.body)
        try:
            routes, model = self._routes_for(command)
        except NotFound:
            await self._directory.settled(timeout=SETTLE_SECONDS)
            routes, model = self._routes_for(command)
        body["model"] = model
        price = self._prices.get(model) or FREE
        client_asked_usage = True
        if command.stream:
            body["stream"] = True
            if command.api in (Api.CHAT, Api.COMPLETIONS):
                client_asked_usage = ask_for_usage(body)
        payload = msgspec.json.encode(body)
        prompt = prompt_text(command.api, body)
        meter = UsageMeter(prompt_text=prompt)
        strategy, _ = self._strategies.of(command.actor)
        blocks = prefix_blocks(prompt) if strategy is Strategy.CACHE_AWARE else []
        outcome = "failed"
        route: Route | None = None
        """The machine answering, once one took the request."""
        trying: Route | None = None
        """The machine being asked, between its `routed` and its `finished`."""
        answered = False
        timing = Timing(time.monotonic())
        try:
            ranked = self._warm_first(self._balancer.rank(routes, command, blocks, strategy))
            for index, candidate in enumerate(ranked[:MAX_TRIES]):
                if index and not self._balancer.allowed(candidate):
                    continue
                trying = candidate
                await self._balancer.routed(candidate, command, blocks)
                try:
                    response = await self._open(candidate, command, payload)
                except UpstreamFailed:
                    trying = None
                    await self._finished(candidate, command, timing, ok=False)
                    continue
                route = candidate
                try:
                    if command.stream and response.status == 200:
                        await self._relay(
                            command, response, meter, client_asked_usage, price, ctx, timing
                        )
                        outcome = "completed"
                        return self._done(route, model, meter, price, status=200)
                    whole = await response.read()
                finally:
                    await response.aclose()
                if response.status == 200:
                    meter.feed_body(_decoded(whole))
                    outcome = "completed"
                # The machine answered: a refusal of the request (4xx) is the request's
                # fault, not the machine's, and must not count toward its breaker.
                answered = True
                return self._done(route, model, meter, price, status=response.status, body=whole)
            raise Unavailable(f"no machine serving {model} could take the request")
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if trying is not None:
                await self._finished(trying, command, timing, ok=answered or outcome != "failed")
            # Recorded once the client has its answer, before the command is acked.
            ctx.after(self._record(command, route, model, meter, price, outcome))

    async def _finished(
        self, route: Route, command: Inference, timing: Timing, *, ok: bool
    ) -> None:
        await asyncio.shield(
            self._balancer.finished(
                route,
                command,
                ok=ok,
                latency_ms=int((time.monotonic() - timing.started) * 1000),
                ttft_ms=timing.first_ms(),
            )
        )

    def _routes_for(self, command: Inference) -> tuple[list[Route], str]:
        """The machines that may serve the request, and the model they serve it as."""
        reachable = [
            r
            for r in self._directory.routes()
            if r.reachable_by(command.actor, command.actor_admin, command.actor_role)
        ]
        if command.instance_id:
            chosen = [r for r in reachable if r.instance_id == command.instance_id]
            if not chosen:
                raise NotFound(
                    f"no running instance {command.instance_id} of yours serves inference",
                    field="target_url",
                )
            model = self._models.aliases.get(command.model, command.model)
            if model and model not in chosen[0].models:
                raise NotFound(
                    f"instance {command.instance_id} does not serve the model {command.model}",
                    field="model",
                )
            return chosen, model or chosen[0].models[0]
        for model in self._models.chain(command.model):
            serving = [r for r in reachable if model in r.models]
            if serving:
                return serving, model
        raise NotFound(
            f"the model `{command.model}` is not served to you by any running instance",
            field="model",
        )

    async def _open(self, route: Route, command: Inference, payload: bytes) -> UpstreamResponse:
        try:
            response = await self._pool.request(
                route.instance_id,
                route.endpoint + command.api.path,
                method="POST",
                headers={"content-type": "application/json", **self._keys.headers(route)},
                body=payload,
                timeout=self._timeout,
                trusted_loopback=route.trusted_loopback,
            )
        except Exception as exc:
            # Unreachable, silent, or at an address we refuse: the next machine may serve.
            log.warning("instance %s not taken: %s", route.instance_id, exc)
            raise UpstreamFailed from exc
        if 300 <= response.status < 400:
            # Never followed: a machine pointing elsewhere could point anywhere.
            log.warning("instance %s answered a redirect; not followed", route.instance_id)
            await response.aclose()
            raise UpstreamFailed
        if response.status in PASSED_OVER:
            if response.status == 429:
                self._cool(route.instance_id, response.header("retry-after"))
            await response.aclose()
            raise UpstreamFailed
        return response

    def _cool(self, instance_id: str, retry_after: str | None) -> None:
        """A machine that said "too many requests" gets none from this replica for as long
        as it asked (`Retry-After` in seconds; 1 s when it did not say, 60 s at most)."""
        seconds = 1.0
        if retry_after is not None and retry_after.strip().isdigit():
            seconds = min(float(retry_after.strip()), MAX_COOLING_SECONDS)
        self._cooling[instance_id] = time.monotonic() + seconds

    def _warm_first(self, ranked: list[Route]) -> list[Route]:
        """The ranking with machines still cooling down moved to the end, in their order."""
        now = time.monotonic()
        cooling = {i for i, until in self._cooling.items() if until > now}
        if len(cooling) < len(self._cooling):
            self._cooling = {i: u for i, u in self._cooling.items() if i in cooling}
        if not cooling:
            return ranked
        return sorted(ranked, key=lambda r: r.instance_id in cooling)

    async def _relay(
        self,
        command: Inference,
        response: UpstreamResponse,
        meter: UsageMeter,
        client_asked_usage: bool,
        price: ModelPrice,
        ctx: Context,
        timing: Timing,
    ) -> None:
        """Pass the upstream's events on as they come, several to a bus message when they
        arrive together; fail if the stream ends before its last event."""
        reader = EventReader()
        ends = _STREAM_ENDS.get(command.api, frozenset())
        finished = False
        try:
            async for chunk in response.aiter_bytes():
                out = bytearray()
                for event in reader.feed(chunk):
                    if event.data == DONE:
                        finished = True
                        out += event.raw
                        continue
                    if event.name in ends:
                        finished = True
                    decoded = _decoded(event.data)
                    if decoded is None:
                        out += event.raw
                        continue
                    meter.feed_event(decoded)
                    if command.api not in (Api.CHAT, Api.COMPLETIONS):
                        out += event.raw
                    elif is_usage_only_chunk(decoded):
                        if client_asked_usage:
                            decoded["usage"]["cost_micros"] = _cost(price, meter.usage())
                            out += _event(decoded)
                    elif not client_asked_usage and "usage" in decoded:
                        out += _event(client_view(decoded))
                    else:
                        out += event.raw
                if out:
                    if not timing.first:
                        timing.first = time.monotonic()
                    await ctx.send(bytes(out))
        except GpuproxyError as exc:
            raise Unavailable(f"{exc.message}; the answer is incomplete") from None
        except Exception as exc:
            raise Unavailable(
                f"the machine failed mid-answer ({type(exc).__name__}); the answer is incomplete"
            ) from None
        if not finished:
            raise Unavailable("the machine ended the answer before its end; it is incomplete")

    def _done(
        self,
        route: Route,
        model: str,
        meter: UsageMeter,
        price: ModelPrice,
        *,
        status: int,
        body: bytes = b"null",
    ) -> InferenceDone:
        usage = meter.usage()
        return InferenceDone(
            status=status,
            body=msgspec.Raw(body or b"null"),
            model=model,
            instance_id=route.instance_id,
            usage=usage,
            cost_micros=_cost(price, usage),
        )

    async def _record(
        self,
        command: Inference,
        route: Route | None,
        model: str,
        meter: UsageMeter,
        price: ModelPrice,
        outcome: str,
    ) -> None:
        # No machine took it: nothing ran, nothing is owed.
        usage = meter.usage() if route is not None else Usage()
        event = InferenceUsed(
            event_id=f"inference-{command.command_id}",
            occurred_at_ms=int(time.time() * 1000),
            actor=command.actor,
            command_id=command.command_id,
            owner=command.actor,
            model=model,
            instance_id=route.instance_id if route else "",
            provider=route.provider if route else "",
            api=command.api,
            usage=usage,
            price_input_micros=price.input,
            price_cached_input_micros=price.cached_input,
            price_output_micros=price.output,
            cost_micros=_cost(price, usage),
            outcome=outcome,
            streamed=command.stream,
        )
        # Its id makes sending again harmless: a lost acknowledgement costs a repeat, not a
        # second charge. Given up only after half a minute of a bus that takes nothing.
        pause = 0.05
        deadline = time.monotonic() + RECORD_PATIENCE
        while True:
            try:
                await self._events.publish(event)
                return
            except Exception as exc:
                if time.monotonic() >= deadline:
                    log.error(
                        "usage of %s not recorded (%s)", command.command_id, type(exc).__name__
                    )
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)


def _cost(price: ModelPrice, usage: Usage) -> int:
    return cost_micros(
        price,
        input_tokens=usage.input_tokens,
        # A machine's report is not ours to trust blindly: never more cached than read.
        cached_tokens=min(usage.cached_tokens, usage.input_tokens),
        output_tokens=usage.output_tokens,
    )


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def _object_of(raw: msgspec.Raw) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        body = None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object", field="body")
    return body


def _decoded(data: bytes) -> dict[str, Any] | None:
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None
