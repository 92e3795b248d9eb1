"""Running commands in a worker: the loop every worker kind shares.

A handler gets the decoded command and a `Context`, and returns the reply. It steers the
message by raising, never by touching it: a `GpuproxyError` is the caller's answer (acked),
`RetryLater` puts the command back for later, `Reject` gives up on it (termed and recorded as
dead-lettered). An unexpected exception is retried with backoff until the delivery budget is
spent, then dead-lettered. While a handler works, the runtime tells JetStream it is in
progress and the caller that it is alive. A repeat of a finished command is answered from the
results bucket instead of running again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from bus.codec import Decoder, encode
from bus.consumer import PullConsumer
from bus.events import EventPublisher
from bus.topology import declare_bucket, declare_consumer, declare_stream
from schemas import subjects, topology
from schemas.commands import Command, CommandBase
from schemas.control import Cancel
from schemas.errors import (
    Cancelled,
    DeadlineExceeded,
    ErrorInfo,
    GpuproxyError,
    Internal,
    InvalidArgument,
    Reject,
    RetryLater,
)
from schemas.events import CommandDeadLettered
from schemas.replies import Data, Failure, Heartbeat, Outcome, Reply, Result

log = logging.getLogger("gpuproxy.worker")

Handler = Callable[[Any, "Context"], Awaitable[Reply]]


class Context:
    """What a handler may know and do besides returning its reply."""

    def __init__(self, runtime: CommandRuntime, job: _Job) -> None:
        self._runtime = runtime
        self._job = job

    @property
    def attempt(self) -> int:
        return self._job.attempt

    @property
    def worker_id(self) -> str:
        return self._runtime.worker_id

    @property
    def worker_kind(self) -> str:
        return str(self._runtime.kind)

    async def send(self, body: bytes) -> None:
        """Stream a piece of the answer to the caller now."""
        await self._runtime._send(self._job, lambda seq: Data(**self._job.head(seq), body=body))


@dataclass(eq=False)
class _Job:
    msg: Msg
    command_id: str
    attempt: int
    reply_to: str | None
    started: float = field(default_factory=time.monotonic)
    seq: int = 0
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None

    def head(self, seq: int) -> dict[str, Any]:
        return {"command_id": self.command_id, "attempt": self.attempt, "seq": seq}


def _heartbeat(job: _Job, seq: int) -> Heartbeat:
    return Heartbeat(**job.head(seq))


class CommandRuntime:
    def __init__(
        self,
        nc: Client,
        *,
        kind: subjects.WorkerKind,
        handlers: Mapping[type[CommandBase], Handler],
        worker_id: str,
        ack_wait: float = 30.0,
        max_deliver: int = 5,
        window: int = 64,
        stream_replicas: int = 1,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.kind = kind
        self.worker_id = worker_id
        self._handlers = dict(handlers)
        self._ack_wait = ack_wait
        self._max_deliver = max_deliver
        self._window = window
        self._replicas = stream_replicas
        self._decoder: Decoder[Command] = Decoder(Command)
        self._jobs: dict[str, _Job] = {}
        self._cancelled: dict[str, float] = {}
        self._results: KeyValue | None = None
        self._results_prefix = ""
        self._consumer: PullConsumer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._cancel_sub: Subscription | None = None
        self._cancel_decoder: Decoder[Cancel] = Decoder(Cancel)
        self.events = EventPublisher(self._js)

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    async def start(self) -> None:
        await declare_stream(self._js, topology.command_stream(self._replicas))
        await declare_stream(self._js, topology.event_stream(self._replicas))
        await declare_consumer(
            self._js,
            topology.command_consumer(
                self.kind, ack_wait_seconds=self._ack_wait, max_deliver=self._max_deliver
            ),
        )
        self._results = await declare_bucket(self._js, topology.results_bucket(self._replicas))
        self._results_prefix = f"$KV.{topology.RESULTS_BUCKET}."
        self._consumer = PullConsumer(
            self._nc,
            stream=topology.COMMAND_STREAM,
            durable=str(self.kind),
            window=self._window,
            deliver=self._dispatch,
        )
        # Every replica hears every cancel: only the one running the command acts on it.
        self._cancel_sub = await self._nc.subscribe(subjects.cancel(self.kind), cb=self._on_cancel)
        await self._consumer.start()
        self._ticker = asyncio.create_task(self._keep_alive(), name="keep-alive")

    async def stop(self, drain_timeout: float = 20.0) -> int:
        """Take no more work, let running commands finish for up to `drain_timeout`, then
        hand the rest back to JetStream for another replica. Returns how many were handed back.
        """
        if self._consumer is None:
            return 0
        if self._cancel_sub is not None:
            with contextlib.suppress(Exception):
                await self._cancel_sub.unsubscribe()
        for msg in await self._consumer.stop():
            with contextlib.suppress(Exception):
                await msg.nak()
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=drain_timeout)
        abandoned = [job for job in self._jobs.values() if job.task is not None]
        for job in abandoned:
            job.cancel_reason = None
            assert job.task is not None
            job.task.cancel()
        if abandoned:
            await asyncio.wait([job.task for job in abandoned if job.task is not None])
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        return len(abandoned)

    def cancel(self, command_id: str, reason: str) -> bool:
        """Stop the command if this replica runs it; remember it if it has not arrived yet."""
        now = time.monotonic()
        self._cancelled[command_id] = now
        # Forget cancels older than the dedupe window: their commands can no longer arrive.
        horizon = now - topology.DEDUPE_WINDOW_SECONDS
        if len(self._cancelled) > 1024:
            self._cancelled = {k: t for k, t in self._cancelled.items() if t > horizon}
        job = self._jobs.get(command_id)
        if job is None or job.task is None:
            return False
        job.cancel_reason = reason
        job.task.cancel()
        return True

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = self._cancel_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        self.cancel(cancel.command_id, cancel.reason)

    def _dispatch(self, msg: Msg) -> None:
        headers = msg.headers or {}
        command_id = headers.get(subjects.HEADER_MSG_ID) or uuid.uuid4().hex
        assert self._consumer is not None
        if command_id in self._jobs:
            # Redelivered while still running here (a keep-alive came late): the running
            # copy acks or naks this stream sequence; a second run would do the work twice.
            self._consumer.release()
            return
        job = _Job(
            msg=msg,
            command_id=command_id,
            attempt=msg.metadata.num_delivered,
            reply_to=headers.get(subjects.HEADER_REPLY),
        )
        self._jobs[command_id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job, headers))

    async def _run(self, job: _Job, headers: Mapping[str, str]) -> None:
        try:
            await self._settle(job, headers)
        finally:
            self._jobs.pop(job.command_id, None)
            assert self._consumer is not None
            self._consumer.release()

    async def _settle(self, job: _Job, headers: Mapping[str, str]) -> None:
        msg = job.msg
        # First: a command that finished before (its ack was lost) keeps its answer, whatever
        # happened since; the checks below would otherwise overwrite it.
        if job.attempt > 1 and (known := await self._known_outcome(job.command_id)) is not None:
            await self._reply_terminal(job, known)
            await msg.ack()
            return
        if job.command_id in self._cancelled:
            await self._finish(job, Outcome(error=Cancelled("cancelled by the caller").to_info()))
            await msg.term()
            return
        deadline = headers.get(subjects.HEADER_DEADLINE)
        if deadline is not None and deadline.isdigit() and int(deadline) < time.time() * 1000:
            # Nobody waits for this answer any more; doing the work now would only surprise.
            expired = DeadlineExceeded("the request expired before a worker could take it")
            await self._finish(job, Outcome(error=expired.to_info()))
            await msg.term()
            return
        try:
            command = self._decoder.decode(msg.data)
            handler = self._handlers.get(type(command))
            if handler is None:
                raise Reject(
                    InvalidArgument(f"{self.kind} does not handle {type(command).__name__}")
                )
            reply = await handler(command, Context(self, job))
        except msgspec.DecodeError as exc:
            # Not JSON, or not a command we know: no delivery will ever read it differently.
            await self._dead_letter(job, InvalidArgument(f"malformed command: {exc}").to_info())
        except Reject as exc:
            await self._dead_letter(job, exc.error.to_info())
        except RetryLater as exc:
            await self._retry(job, exc.delay, exc.to_info())
        except GpuproxyError as exc:
            await self._finish(job, Outcome(error=exc.to_info()))
            await msg.ack()
        except asyncio.CancelledError:
            if job.cancel_reason is None:
                # Shutdown: hand the command to another replica straight away.
                with contextlib.suppress(Exception):
                    await msg.nak()
                raise
            await self._finish(job, Outcome(error=Cancelled(job.cancel_reason).to_info()))
            await msg.term()
        except Exception as exc:
            # Log the type only: an unexpected exception's text may quote request content.
            log.exception("command %s failed unexpectedly (%s)", job.command_id, type(exc).__name__)
            await self._retry(
                job, min(2.0**job.attempt, 30.0), Internal("internal error").to_info()
            )
        else:
            await self._finish(job, Outcome(result=reply))
            await msg.ack()

    async def _retry(self, job: _Job, delay: float, error: ErrorInfo) -> None:
        if job.attempt >= self._max_deliver:
            await self._dead_letter(job, error)
            return
        await job.msg.nak(delay=delay)

    async def _dead_letter(self, job: _Job, error: ErrorInfo) -> None:
        await self._finish(job, Outcome(error=error))
        await job.msg.term()
        await self.events.publish(
            CommandDeadLettered(
                event_id=f"dead-{job.command_id}",
                occurred_at_ms=int(time.time() * 1000),
                command_id=job.command_id,
                subject=job.msg.subject,
                deliveries=job.attempt,
                error=error,
            )
        )

    async def _finish(self, job: _Job, outcome: Outcome) -> None:
        """Remember the answer, then give it to the caller; both before the message is acked.

        The outcome goes to the results bucket's subject as a plain publish: it travels the
        same connection ahead of the ack, so JetStream receives it first, and the worker does
        not wait a round trip for a store acknowledgement on every command.
        """
        await self._nc.publish(f"{self._results_prefix}{job.command_id}", encode(outcome))
        await self._reply_terminal(job, outcome)

    async def _known_outcome(self, command_id: str) -> Outcome | None:
        assert self._results is not None
        try:
            entry = await self._results.get(command_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return msgspec.json.decode(entry.value, type=Outcome)

    async def _reply_terminal(self, job: _Job, outcome: Outcome) -> None:
        if outcome.result is not None:
            result = outcome.result
            await self._send(job, lambda seq: Result(**job.head(seq), result=result))
        else:
            error = outcome.error or Internal("no outcome").to_info()
            await self._send(job, lambda seq: Failure(**job.head(seq), error=error))

    async def _send(self, job: _Job, make: Callable[[int], msgspec.Struct]) -> None:
        if job.reply_to is None:
            return
        seq = job.seq
        job.seq += 1
        await self._nc.publish(job.reply_to, encode(make(seq)))

    async def _keep_alive(self) -> None:
        # One ticker for all running commands: JetStream must not redeliver work that is alive,
        # and the caller wants to know the worker has not gone away.
        period = max(self._ack_wait / 3, 0.1)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for job in list(self._jobs.values()):
                if now - job.started < period:
                    continue
                with contextlib.suppress(Exception):
                    await job.msg.in_progress()
                    await self._send(job, functools.partial(_heartbeat, job))
