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
import collections
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from bus.acks import AckedPublisher
from bus.codec import Decoder, encode
from bus.consumer import PullConsumer
from bus.drains import Drains
from bus.events import EventPublisher
from bus.job import Context as Context
from bus.job import Job, heartbeat
from bus.tasks import cancel_and_wait
from bus.topology import declare_bucket, declare_consumer, declare_stream
from schemas import subjects, topology
from schemas.commands import Command, CommandBase
from schemas.control import Cancel, Credit
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
from schemas.replies import Failure, Outcome, Reply, Result

log = logging.getLogger("gpuproxy.worker")

Handler = Callable[[Any, "Context"], Awaitable[Reply]]


PULSE_SECONDS = 1.0
"""Between two heartbeats to the caller of a running command: a gateway streaming an answer
takes a few of them missing for a dead worker (`Inbox.next`'s `silence`)."""


def _drained(job: Job) -> list[Awaitable[None]]:
    """The job's after-answer effects, handed over once."""
    effects, job.effects = job.effects, []
    return effects


class _StoreFailed(Exception):
    """JetStream did not confirm an outcome in time: the message must not be acked."""


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
        store_timeout: float = 30.0,
        pulse: float = PULSE_SECONDS,
    ) -> None:
        self._nc = nc
        self._pulse = pulse
        self._js = nc.jetstream()
        self.kind = kind
        self.worker_id = worker_id
        self._handlers = dict(handlers)
        self._ack_wait = ack_wait
        self._max_deliver = max_deliver
        self._window = window
        self._replicas = stream_replicas
        self._store_timeout = store_timeout
        self._decoder: Decoder[Command] = Decoder(Command)
        self._jobs: dict[str, Job] = {}
        self._cancelled: collections.OrderedDict[str, float] = collections.OrderedDict()
        """Cancels by message id, oldest first, for commands that may not have arrived yet."""
        self._results: KeyValue | None = None
        self._drains: Drains | None = None
        self._results_prefix = ""
        self._consumer: PullConsumer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._cancel_sub: Subscription | None = None
        self._credit_sub: Subscription | None = None
        self._credit_decoder: Decoder[Credit] = Decoder(Credit)
        self._cancel_decoder: Decoder[Cancel] = Decoder(Cancel)
        self._stores = AckedPublisher(nc)
        self.events = EventPublisher(self._js)

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    @property
    def ack_wait(self) -> float:
        """The consumer's ack wait in force (read back from JetStream at start)."""
        return self._ack_wait

    async def start(self) -> None:
        await declare_stream(self._js, topology.command_stream(self._replicas))
        await declare_stream(self._js, topology.event_stream(self._replicas))
        config = await declare_consumer(
            self._nc, topology.command_consumer(self.kind, ack_wait_seconds=self._ack_wait)
        )
        if config.ack_wait is not None and config.ack_wait != self._ack_wait:
            log.info(
                "%s: the consumer's ack wait is %.1f s (set by the replica that created it);"
                " keep-alives follow it",
                self.kind,
                config.ack_wait,
            )
            self._ack_wait = config.ack_wait
        self._results = await declare_bucket(self._js, topology.results_bucket(self._replicas))
        self._drains = Drains(
            await declare_bucket(self._js, topology.drains_bucket(self._replicas))
        )
        self._results_prefix = f"$KV.{topology.RESULTS_BUCKET}."
        await self._stores.start()
        self._consumer = PullConsumer(
            self._nc,
            stream=topology.COMMAND_STREAM,
            durable=str(self.kind),
            window=self._window,
            deliver=self._dispatch,
        )
        # Every replica hears every cancel: only the one running the command acts on it.
        self._cancel_sub = await self._nc.subscribe(subjects.cancel(self.kind), cb=self._on_cancel)
        self._credit_sub = await self._nc.subscribe(subjects.credit(self.kind), cb=self._on_credit)
        await self._consumer.start()
        self._ticker = asyncio.create_task(self._keep_alive(), name="keep-alive")

    async def stop(self, drain_timeout: float = 20.0) -> int:
        """Take no more work, let running commands finish for up to `drain_timeout`, then
        hand the rest back to JetStream for another replica. Returns how many were handed back.

        A handed-back delivery is noted in the drains bucket first, so it does not count
        against the command's delivery budget.
        """
        if self._consumer is None:
            return 0
        for sub in (self._cancel_sub, self._credit_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        for msg in await self._consumer.stop():
            await self._hand_back(msg)
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=drain_timeout)
        abandoned = [job for job in self._jobs.values() if job.task is not None]
        for job in abandoned:
            job.cancel_reason = None
        # Each abandoned job hands its message back as it is cancelled (see `_settle`).
        await cancel_and_wait([job.task for job in abandoned if job.task is not None])
        if self._ticker is not None:
            await cancel_and_wait([self._ticker])
        await self._stores.stop()
        return len(abandoned)

    def cancel(self, command_id: str, reason: str, run: int = 0) -> bool:
        """Stop that run of the command if this replica runs it; remember it if it has not
        arrived yet."""
        key = subjects.message_id(command_id, run)
        now = time.monotonic()
        self._cancelled[key] = now
        self._cancelled.move_to_end(key)
        # Forget cancels older than the dedupe window: their commands can no longer arrive.
        horizon = now - topology.DEDUPE_WINDOW_SECONDS
        while self._cancelled:
            oldest, at = next(iter(self._cancelled.items()))
            if at > horizon:
                break
            del self._cancelled[oldest]
        job = self._jobs.get(key)
        if job is None or job.task is None:
            return False
        job.cancel_reason = reason
        job.task.cancel()
        return True

    async def _on_cancel(self, msg: Msg) -> None:
        if msg.reply.startswith(subjects.JS_ACK_PREFIX):
            # Delivered by a JetStream consumer someone pointed here, not sent by a gateway:
            # an event with a `command_id` would otherwise read as a cancel.
            return
        try:
            cancel = self._cancel_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        self.cancel(cancel.command_id, cancel.reason, cancel.run)

    async def _on_credit(self, msg: Msg) -> None:
        if msg.reply.startswith(subjects.JS_ACK_PREFIX):
            return  # see `_on_cancel`
        try:
            credit = self._credit_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        job = self._jobs.get(subjects.message_id(credit.command_id, credit.run))
        if job is not None and job.attempt == credit.attempt:
            job.credit(credit.consumed)

    def _dispatch(self, msg: Msg) -> None:
        headers = msg.headers or {}
        key = headers.get(subjects.HEADER_MSG_ID) or uuid.uuid4().hex
        assert self._consumer is not None
        if key in self._jobs:
            # Redelivered while still running here (a keep-alive came late): the running
            # copy acks or naks this stream sequence; a second run would do the work twice.
            self._consumer.release()
            return
        command_id, run = subjects.parse_message_id(key)
        job = Job(
            nc=self._nc,
            msg=msg,
            key=key,
            command_id=command_id,
            run=run,
            attempt=msg.metadata.num_delivered,
            reply_to=headers.get(subjects.HEADER_REPLY),
        )
        self._jobs[key] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job, headers))

    async def _run(self, job: Job, headers: Mapping[str, str]) -> None:
        try:
            await self._settle(job, headers)
        except _StoreFailed:
            # The answer is not safe in JetStream: let the command come back rather than ack
            # a command whose retry would find nothing.
            log.warning("command %s: its outcome could not be stored; handed back", job.key)
            with contextlib.suppress(Exception):
                await job.msg.nak(delay=1.0)
        except NatsError as exc:
            # The connection went while settling: unacked, the command comes back to a
            # replica after the ack wait, and is answered or run again from the records.
            log.warning("command %s: not settled (%s); JetStream redelivers", job.key, exc)
        finally:
            self._jobs.pop(job.key, None)
            leftover = _drained(job)  # a path that ended without them (a rejection)
            if leftover:
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.gather(*leftover))
            assert self._consumer is not None
            self._consumer.release()

    async def _settle(self, job: Job, headers: Mapping[str, str]) -> None:
        msg = job.msg
        if job.attempt > 1 and await self._answered_before(job):
            return
        if job.key in self._cancelled:
            await self._withdraw(job, Cancelled("cancelled by the caller"))
            return
        deadline = headers.get(subjects.HEADER_DEADLINE)
        if deadline is not None and deadline.isdigit() and int(deadline) < time.time() * 1000:
            # Nobody waits for this answer any more; doing the work now would only surprise.
            await self._withdraw(
                job, DeadlineExceeded("the request expired before a worker could take it")
            )
            return
        try:
            command = self._decoder.decode(msg.data)
            handler = self._handlers.get(type(command))
            if handler is None:
                raise Reject(
                    InvalidArgument(f"{self.kind} does not handle {type(command).__name__}")
                )
            reply = await handler(
                command, Context(job, worker_id=self.worker_id, worker_kind=str(self.kind))
            )
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
                await asyncio.shield(asyncio.gather(self._hand_back(msg), *_drained(job)))
                raise
            # The caller left: this run had no effects (or undid them), so it is no answer.
            await self._withdraw(job, Cancelled(job.cancel_reason))
        except Exception as exc:
            # Log the type only: an unexpected exception's text may quote request content.
            log.exception("command %s failed unexpectedly (%s)", job.key, type(exc).__name__)
            await asyncio.gather(*_drained(job))
            await self._retry(
                job, min(2.0**job.attempt, 30.0), Internal("internal error").to_info()
            )
        else:
            await self._finish(job, Outcome(result=reply))
            await msg.ack()

    async def _answered_before(self, job: Job) -> bool:
        """Settle a redelivery from what is known: a finished command keeps its answer (its
        ack was lost), a stopped run stays stopped, and a command past its delivery budget
        ends here, wherever its earlier deliveries ran (a worker that died mid-command
        leaves nobody else to end it)."""
        known = await self._known_outcome(job.command_id)
        if known is not None and known.finished:
            await self._reply_terminal(job, known)
            await job.msg.ack()
            return True
        if known is not None and known.stopped_run is not None and known.stopped_run >= job.run:
            await self._reply_terminal(job, known)
            await job.msg.term()
            return True
        tries = await self._tries(job, past=self._max_deliver)
        if tries > self._max_deliver:
            spent = Internal(
                f"the command was delivered {tries - 1} times without finishing; gave up"
            )
            await self._dead_letter(job, spent.to_info(), deliveries=tries - 1)
            return True
        return False

    async def _withdraw(self, job: Job, error: GpuproxyError) -> None:
        """End a run that is no answer: a retry with the same key runs the command again."""
        await self._finish(job, Outcome(error=error.to_info(), stopped_run=job.run))
        await job.msg.term()

    async def _retry(self, job: Job, delay: float, error: ErrorInfo) -> None:
        if await self._tries(job, past=self._max_deliver - 1) >= self._max_deliver:
            await self._dead_letter(job, error)
            return
        await job.msg.nak(delay=delay)

    async def _dead_letter(
        self, job: Job, error: ErrorInfo, *, deliveries: int | None = None
    ) -> None:
        await self._finish(job, Outcome(error=error))
        await job.msg.term()
        await self.events.publish(
            CommandDeadLettered(
                event_id=f"dead-{job.key}",
                occurred_at_ms=int(time.time() * 1000),
                command_id=job.command_id,
                subject=job.msg.subject,
                deliveries=job.attempt if deliveries is None else deliveries,
                error=error,
            )
        )

    async def _finish(self, job: Job, outcome: Outcome) -> None:
        """Give the caller its answer, then make it durable; both before the message is acked.

        The caller hears first, so storing costs it no latency. The outcome is stored with a
        JetStream publish whose acknowledgement is awaited: on a cluster the results bucket
        and the command consumer have different leaders, and only the acknowledgement says
        the answer is there for a retry before the command leaves the stream.
        """
        await self._reply_terminal(job, outcome)
        store = self._stores.publish(
            f"{self._results_prefix}{job.command_id}", encode(outcome), self._store_timeout
        )
        stored, *_ = await asyncio.gather(store, *_drained(job))
        if not stored:
            raise _StoreFailed

    async def _hand_back(self, msg: Msg) -> None:
        """Give a delivery back to JetStream for another replica, without spending budget."""
        key = (msg.headers or {}).get(subjects.HEADER_MSG_ID)
        if key is not None and self._drains is not None:
            await self._drains.note(key)
        with contextlib.suppress(Exception):
            await msg.nak()

    async def _tries(self, job: Job, *, past: int) -> int:
        """The deliveries that count against the budget: all of them but those handed back
        by stopping workers. The drains are read only when the deliveries alone are `past`
        the given count, so a first delivery's failure costs no read."""
        if job.attempt <= past or self._drains is None:
            return job.attempt
        return job.attempt - await self._drains.count(job.key)

    async def _known_outcome(self, command_id: str) -> Outcome | None:
        assert self._results is not None
        try:
            entry = await self._results.get(command_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return msgspec.json.decode(entry.value, type=Outcome)

    async def _reply_terminal(self, job: Job, outcome: Outcome) -> None:
        if outcome.result is not None:
            result = outcome.result
            await job.reply(lambda seq: Result(**job.head(seq), result=result))
        else:
            error = outcome.error or Internal("no outcome").to_info()
            await job.reply(lambda seq: Failure(**job.head(seq), error=error))

    async def _keep_alive(self) -> None:
        # One ticker for all running commands: JetStream must not redeliver work that is alive,
        # and the caller wants to know the worker has not gone away.
        while True:
            progress = max(self._ack_wait / 3, 0.1)
            period = min(self._pulse, progress)
            await asyncio.sleep(period)
            now = time.monotonic()
            for job in list(self._jobs.values()):
                if now - job.started < period:
                    continue
                with contextlib.suppress(Exception):
                    if now - job.progressed >= progress - period / 2:
                        job.progressed = now
                        await job.msg.in_progress()
                    await job.reply(functools.partial(heartbeat, job))
