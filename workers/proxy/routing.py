"""Which machine serves a request, decided from a load book every proxy replica shares.

Each replica tells every other what it routed and what came back (`schemas.balancing`) on
one core NATS subject, and applies what it hears, its own messages included. So the
in-flight counts, the response times and the prefix index are the fleet's, not one
process's: two replicas routing one conversation send it to one machine. Every second a
replica also publishes what it has in flight, which heals what a lost message left wrong and
lets the others forget a replica that died.

The first machine of a ranking is the strategy's pick; the rest, least loaded first, are the
fallbacks for a request the pick could not take.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.events import EventPublisher
from bus.tasks import cancel_and_wait
from schemas import subjects
from schemas.balancing import Finished, LoadMessage, Routed, Strategy
from schemas.commands import Inference
from workers.proxy.balancing import Candidate, RoutingRequest, choose
from workers.proxy.breaker import CircuitBreakers
from workers.proxy.directory import Route
from workers.proxy.loadbook import LoadBook

log = logging.getLogger("gpuproxy.proxy.routing")

SNAPSHOT_SECONDS = 1.0

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(LoadMessage)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Balancer:
    def __init__(
        self,
        nc: Client,
        *,
        replica: str,
        events: EventPublisher | None = None,
        request_timeout: float = 300.0,
    ) -> None:
        self._nc = nc
        self._replica = replica
        self._events = events
        self.book = LoadBook(replica)
        # A probe that never answers counts as failed once no request could still be running.
        self.breakers = CircuitBreakers(probe_timeout_ms=int((request_timeout + 30) * 1000))
        self._rng = random.Random()  # noqa: S311 - spreading load, not secrecy
        self._sub: Subscription | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(subjects.LOAD, cb=self._hear)
        self._ticker = asyncio.create_task(self._tick(), name="proxy-load-snapshots")

    async def stop(self) -> None:
        if self._ticker is not None:
            await cancel_and_wait([self._ticker])
        if self._sub is not None:
            await self._sub.unsubscribe()

    def rank(
        self, routes: list[Route], command: Inference, blocks: list[int], strategy: Strategy
    ) -> list[Route]:
        usable = set(self.breakers.usable([r.instance_id for r in routes], now_ms=_now_ms()))
        routes = [r for r in routes if r.instance_id in usable]
        by_id = {r.instance_id: r for r in routes}
        candidates = [
            Candidate(
                instance_id=r.instance_id,
                provider=r.provider,
                price_per_hour_micros=r.price_per_hour_micros,
                vram_gb=r.vram_gb,
            )
            for r in routes
        ]
        request = RoutingRequest(
            request_id=command.command_id,
            session_key=command.session_key,
            user_key=command.actor,
            prefix_blocks=blocks,
        )
        picked = choose(strategy, candidates, self.book, request, rng=self._rng)
        rest = sorted(
            (r for r in routes if r.instance_id != picked.instance_id),
            key=lambda r: (self.book.in_flight(r.instance_id), r.instance_id),
        )
        return [by_id[picked.instance_id], *rest]

    async def routed(self, route: Route, command: Inference, blocks: list[int]) -> None:
        await self._tell(
            Routed(
                replica=self._replica,
                at_ms=_now_ms(),
                request_id=command.command_id,
                instance_id=route.instance_id,
                prefix_blocks=blocks,
                session_key=command.session_key,
                provider=route.provider,
            )
        )

    async def finished(
        self, route: Route, command: Inference, *, ok: bool, latency_ms: int, ttft_ms: int | None
    ) -> None:
        await self._tell(
            Finished(
                replica=self._replica,
                at_ms=_now_ms(),
                request_id=command.command_id,
                instance_id=route.instance_id,
                ok=ok,
                latency_ms=latency_ms,
                ttft_ms=ttft_ms,
            )
        )

    def forget(self, instance_id: str) -> None:
        self.book.forget(instance_id)
        self.breakers.forget(instance_id)

    def allowed(self, route: Route) -> bool:
        """Whether the machine's breaker lets a request through now (checked again before
        each fallback: the probe of a half-open machine is taken by the first request)."""
        return self.breakers.allowed(route.instance_id, now_ms=_now_ms())

    async def _tell(self, message: LoadMessage) -> None:
        self.book.apply(message, now_ms=message.at_ms)
        self.breakers.apply(message, now_ms=message.at_ms)
        try:
            await self._nc.publish(subjects.LOAD, _encoder.encode(message))
        except Exception as exc:
            # The others miss one message; the next snapshot heals their counts.
            log.warning("load message not sent: %s", type(exc).__name__)

    async def _hear(self, msg: Msg) -> None:
        try:
            message = _decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if message.replica != self._replica:
            now = _now_ms()
            self.book.apply(message, now_ms=now)
            self.breakers.apply(message, now_ms=now)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_SECONDS)
            now = _now_ms()
            self.book.prune(now)
            self.breakers.tick(now)
            await self._tell(self.book.snapshot(now_ms=now))
            await self._announce()

    async def _announce(self) -> None:
        """Publish the breakers' changes. Every replica sees the same ones and publishes
        them under the same ids, so the event log keeps each once."""
        for change in self.breakers.changes():
            if self._events is None:
                continue
            try:
                await self._events.publish(change)
            except Exception as exc:
                log.warning("circuit change not published: %s", type(exc).__name__)
