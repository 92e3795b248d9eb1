"""Sending commands and receiving their replies: the gateway's side of the bus.

One wildcard subscription per gateway carries every reply; each call waits on its own queue.
A command whose id JetStream reports as a duplicate was sent before (a client retry with the
same idempotency key): its answer is read from the results bucket instead of waiting on a
reply that will never come to this call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from bus.codec import Decoder, encode
from bus.topology import declare_bucket, declare_stream
from schemas import subjects, topology
from schemas.commands import CommandBase, name_of
from schemas.control import Cancel
from schemas.errors import DeadlineExceeded, Internal, Unavailable, error_from_info
from schemas.replies import Chunk, Data, Failure, Heartbeat, Outcome, Reply, Result


class CommandCaller:
    def __init__(self, nc: Client, *, gateway_id: str, stream_replicas: int = 1) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._gateway_id = gateway_id
        self._replicas = stream_replicas
        self._calls: dict[str, asyncio.Queue[Chunk]] = {}
        self._tokens = itertools.count()
        self._decoder: Decoder[Chunk] = Decoder(Chunk)
        self._sub: Subscription | None = None
        self._results: KeyValue | None = None

    async def start(self) -> None:
        await declare_stream(self._js, topology.command_stream(self._replicas))
        await declare_stream(self._js, topology.event_stream(self._replicas))
        self._results = await declare_bucket(self._js, topology.results_bucket(self._replicas))
        self._sub = await self._nc.subscribe(
            subjects.replies_to(self._gateway_id), cb=self._on_reply
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    @property
    def waiting(self) -> int:
        return len(self._calls)

    async def call(
        self, kind: subjects.WorkerKind, command: CommandBase, *, timeout: float
    ) -> Reply:
        """Send a command and return its result, or raise the error the worker answered."""
        async for chunk in self.stream(kind, command, timeout=timeout):
            if isinstance(chunk, Result):
                return chunk.result
        raise Internal("the reply ended without a result")

    async def stream(
        self, kind: subjects.WorkerKind, command: CommandBase, *, timeout: float
    ) -> AsyncIterator[Data | Result]:
        """Send a command and yield its streamed pieces, ending with the `Result`.

        A worker's failure is raised as the matching `GpuproxyError`. Leaving the loop before
        the end (the client went away) tells the worker to stop.
        """
        deadline = time.monotonic() + timeout
        token = str(next(self._tokens))
        queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self._calls[token] = queue
        finished = False
        try:
            headers = {
                subjects.HEADER_MSG_ID: command.command_id,
                subjects.HEADER_REPLY: subjects.reply(self._gateway_id, token),
                subjects.HEADER_DEADLINE: str(int((time.time() + timeout) * 1000)),
            }
            try:
                ack = await self._js.publish(
                    subjects.command(kind, name_of(command)),
                    encode(command),
                    timeout=max(deadline - time.monotonic(), 0.001),
                    headers=headers,
                )
            except TimeoutError:
                raise Unavailable("the command bus did not accept the command in time") from None
            if ack.duplicate:
                outcome = await self._await_outcome(command.command_id, deadline)
                finished = True
                if outcome.error is not None:
                    raise error_from_info(outcome.error)
                assert outcome.result is not None
                yield Result(command_id=command.command_id, attempt=0, seq=0, result=outcome.result)
                return
            async for chunk in self._chunks(queue, deadline):
                if isinstance(chunk, Failure):
                    finished = True
                    raise error_from_info(chunk.error)
                if isinstance(chunk, Result):
                    finished = True
                yield chunk
        finally:
            del self._calls[token]
            if not finished:
                await self._cancel(kind, command.command_id)

    async def _chunks(
        self, queue: asyncio.Queue[Chunk], deadline: float
    ) -> AsyncIterator[Data | Result | Failure]:
        attempt, expected, streamed = 0, 0, False
        while True:
            remaining = deadline - time.monotonic()
            try:
                chunk = await asyncio.wait_for(queue.get(), max(remaining, 0))
            except TimeoutError:
                raise DeadlineExceeded("no answer from a worker before the deadline") from None
            if chunk.attempt != attempt:
                if chunk.attempt < attempt:
                    continue  # a late chunk of an attempt already superseded
                if streamed:
                    # Part of the answer is already with the client; a restart would repeat it.
                    raise Unavailable("the worker was lost mid-stream; the answer is incomplete")
                attempt, expected = chunk.attempt, 0
            if chunk.seq < expected:
                continue
            if chunk.seq > expected:
                raise Internal("a reply chunk was lost on the way")
            expected += 1
            if isinstance(chunk, Heartbeat):
                continue
            if isinstance(chunk, Data):
                streamed = True
            yield chunk
            if not isinstance(chunk, Data):
                return

    async def _await_outcome(self, command_id: str, deadline: float) -> Outcome:
        assert self._results is not None
        delay = 0.01
        while time.monotonic() < deadline:
            try:
                entry = await self._results.get(command_id)
            except KeyNotFoundError:
                entry = None
            if entry is not None and entry.value is not None:
                return msgspec.json.decode(entry.value, type=Outcome)
            await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 2, 0.5)
        raise DeadlineExceeded("the earlier request with this idempotency key has not finished")

    async def _cancel(self, kind: subjects.WorkerKind, command_id: str) -> None:
        with contextlib.suppress(Exception):
            await self._nc.publish(subjects.cancel(kind), encode(Cancel(command_id=command_id)))

    async def _on_reply(self, msg: Msg) -> None:
        queue = self._calls.get(msg.subject.rsplit(".", 1)[-1])
        if queue is None:
            return  # the caller has gone: a late or repeated answer
        try:
            queue.put_nowait(self._decoder.decode(msg.data))
        except msgspec.DecodeError:
            return
