"""Sending commands and receiving their replies: the gateway's side of the bus.

One wildcard subscription per gateway carries every reply; each call has its own inbox. A
command whose id JetStream reports as a duplicate was sent before (a client retry with the
same idempotency key): its answer is read from the results bucket instead of waiting on a
reply that will never come to this call.

This is the gateway's hottest path, so it avoids a task per wait: an inbox is a deque and at
most one future, woken by the reply subscription and expired by one timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
from collections.abc import AsyncGenerator
from typing import TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from bus.acks import pub_ack
from bus.codec import Decoder, encode
from bus.frames import is_data_frame, read_data_frame
from bus.inbox import Inbox, within
from bus.tasks import cancel_and_wait
from bus.topology import declare_bucket, declare_stream
from schemas import subjects, topology
from schemas.commands import CommandBase, Departure, is_keyed, name_of
from schemas.control import CREDIT_EVERY, Cancel, Credit
from schemas.errors import (
    Cancelled,
    DeadlineExceeded,
    IdempotencyKeyReused,
    Internal,
    PayloadTooLarge,
    Unavailable,
    error_from_info,
)
from schemas.replies import Chunk, Data, Failure, Outcome, Reply, Result

T = TypeVar("T")


_ACK = "a"
"""Reply-token prefix that marks JetStream's publish acknowledgements on the reply subject."""

PUBLISH_ATTEMPT = 1.0
"""Seconds to wait for JetStream to confirm one publish before sending it again."""

NO_STREAM_PATIENCE = 5.0
"""Seconds a publish answered "no responders" is sent again before the stream counts as gone."""


def _not_taken() -> Exception:
    return TimeoutError("JetStream has not confirmed the publish yet")


class CommandCaller:
    def __init__(self, nc: Client, *, gateway_id: str, stream_replicas: int = 1) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._gateway_id = gateway_id
        self._replicas = stream_replicas
        self._calls: dict[str, Inbox] = {}
        self._tokens = itertools.count()
        self._decoder: Decoder[Chunk] = Decoder(Chunk)
        self._sub: Subscription | None = None
        self._results: KeyValue | None = None
        self._keys: KeyValue | None = None
        self._settling: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await declare_stream(self._js, topology.command_stream(self._replicas))
        await declare_stream(self._js, topology.event_stream(self._replicas))
        self._results = await declare_bucket(self._js, topology.results_bucket(self._replicas))
        self._keys = await declare_bucket(self._js, topology.keys_bucket(self._replicas))
        self._sub = await self._nc.subscribe(
            subjects.replies_to(self._gateway_id), cb=self._on_reply
        )

    async def stop(self) -> None:
        await cancel_and_wait(list(self._settling))
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def call(
        self, kind: subjects.WorkerKind, command: CommandBase, *, timeout: float
    ) -> Reply:
        """Send a command and return its result, or raise the error the worker answered."""
        # Not a loop over `stream()`: an async generator per call costs the unary hot path
        # measurable CPU (just bench), and unary calls never relay pieces.
        deadline = time.monotonic() + timeout
        token, inbox = self._open()
        finished = False
        try:
            outcome = await self._send(kind, command, token, deadline)
            if outcome is not None:
                finished = True
                return _result_of(outcome)
            while True:
                chunk = await inbox.next(deadline)
                if isinstance(chunk, Failure):
                    finished = True
                    raise error_from_info(chunk.error)
                if isinstance(chunk, Result):
                    finished = True
                    return chunk.result
                await self._took(kind, command.command_id, inbox, chunk)
        finally:
            await self._close(token, kind, command, finished)

    async def stream(
        self,
        kind: subjects.WorkerKind,
        command: CommandBase,
        *,
        timeout: float,
        silence: float = 0.0,
    ) -> AsyncGenerator[Data | Result, None]:
        """Send a command and yield its streamed pieces, ending with the `Result`.

        A worker's failure is raised as the matching `GpuproxyError`. Leaving the loop before
        the end (the client went away) tells the worker to stop. With `silence`, a worker
        that goes quiet that long after streaming began ends the call (see `Inbox.next`).
        """
        deadline = time.monotonic() + timeout
        token, inbox = self._open()
        finished = False
        try:
            outcome = await self._send(kind, command, token, deadline)
            if outcome is not None:
                finished = True
                yield Result(
                    command_id=command.command_id, attempt=0, seq=0, result=_result_of(outcome)
                )
                return
            while True:
                chunk = await inbox.next(deadline, silence)
                if isinstance(chunk, Failure):
                    finished = True
                    raise error_from_info(chunk.error)
                if isinstance(chunk, Result):
                    finished = True
                    yield chunk
                    return
                yield chunk
                # The consumer asked for the next piece: it has taken this one.
                await self._took(kind, command.command_id, inbox, chunk)
        finally:
            await self._close(token, kind, command, finished)

    async def _took(
        self, kind: subjects.WorkerKind, command_id: str, inbox: Inbox, piece: Data
    ) -> None:
        """Count a piece the consumer has taken; every `CREDIT_EVERY` pieces, tell the worker,
        which sends at most `CREDIT_WINDOW` pieces ahead of what was taken."""
        inbox.taken += 1
        if inbox.taken % CREDIT_EVERY:
            return
        credit = Credit(
            command_id=command_id, run=inbox.run, attempt=piece.attempt, consumed=inbox.taken
        )
        with contextlib.suppress(Exception):
            await self._nc.publish(subjects.credit(kind), encode(credit))

    def _open(self) -> tuple[str, Inbox]:
        token = str(next(self._tokens))
        inbox = self._calls[token] = Inbox()
        return token, inbox

    async def _close(
        self, token: str, kind: subjects.WorkerKind, command: CommandBase, finished: bool
    ) -> None:
        inbox = self._calls.pop(token)
        if finished or not _stops_when_left(command):
            return
        if inbox.sent:
            await self._cancel(kind, command.command_id, inbox.run)
            if inbox.streamed:
                await self._mark_stopped(command.command_id, inbox.run)
        elif inbox.publishing is not None:
            # Left before JetStream confirmed the publish, yet a worker may already run it.
            # An id without a key is this call's alone: stop it. A keyed one may be another
            # call's command, so only JetStream's answer can say whether it is ours to stop.
            if not is_keyed(command.command_id):
                await self._cancel(kind, command.command_id, inbox.publishing)
            else:
                if inbox.ack is None or inbox.ack.cancelled():
                    inbox.ack = asyncio.get_running_loop().create_future()
                self._calls[token] = inbox
                task = asyncio.create_task(self._settle(token, kind, command.command_id))
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)

    async def _mark_stopped(self, command_id: str, run: int) -> None:
        """Part of the answer reached the client, which is gone: the run must never start
        again. A cancel reaches only the replicas alive now; if the one running it died, the
        redelivery would run it afresh on another and produce a second answer nobody reads.
        Marked stopped in the results bucket, the redelivery stays stopped (unless the
        worker stored a real outcome first: create, not put)."""
        assert self._results is not None
        outcome = Outcome(
            error=Cancelled("the caller left after the answer began").to_info(),
            stopped_run=run,
        )
        with contextlib.suppress(Exception):
            await self._results.create(command_id, encode(outcome))

    async def _settle(self, token: str, kind: subjects.WorkerKind, command_id: str) -> None:
        """Stop a departed call's command once JetStream confirms this call's publish took it."""
        inbox = self._calls[token]
        run, ack_future = inbox.publishing, inbox.ack
        assert run is not None
        assert ack_future is not None
        try:
            answer = await within(ack_future, PUBLISH_ATTEMPT, _not_taken)
            ack = pub_ack.decode(answer.data)
        except (TimeoutError, msgspec.DecodeError):
            return  # never confirmed: sent again by nobody, so nothing of ours runs
        finally:
            self._calls.pop(token, None)
        if ack.error is None and not ack.duplicate:
            await self._cancel(kind, command_id, run)

    async def _cancel(self, kind: subjects.WorkerKind, command_id: str, run: int) -> None:
        with contextlib.suppress(Exception):
            cancel = Cancel(command_id=command_id, run=run)
            await self._nc.publish(subjects.cancel(kind), encode(cancel))

    async def _send(
        self, kind: subjects.WorkerKind, command: CommandBase, token: str, deadline: float
    ) -> Outcome | None:
        """Publish the command; returns the earlier outcome when it is a repeat.

        A repeat attaches to the earlier call's command: it waits for its outcome. When that
        run was stopped before it had effects (its caller left), the repeat sends the command
        again as the next run, so a retry is never answered "cancelled" for someone's
        departure.
        """
        if is_keyed(command.command_id):
            await self._bind(command, deadline)
        inbox = self._calls[token]
        run = 0
        while True:
            if await self._publish(kind, command, token, run, deadline):
                inbox.sent, inbox.run = True, run
                return None
            outcome = await self._await_outcome(command.command_id, run, deadline)
            if outcome.stopped_run is None:
                return outcome
            run = outcome.stopped_run + 1

    async def _bind(self, command: CommandBase, deadline: float) -> None:
        """Tie an idempotency key to the request it was first used for."""
        assert self._keys is not None
        request = msgspec.structs.replace(command, issued_at_ms=0)
        digest = hashlib.blake2b(
            name_of(command).encode() + b"\x00" + encode(request), digest_size=16
        ).hexdigest()
        pause = _Pause()
        while time.monotonic() < deadline:
            try:
                await self._keys.create(command.command_id, digest.encode())
                return
            except KeyWrongLastSequenceError:
                pass
            except (NatsError, TimeoutError):
                await pause(deadline)  # a leader being elected: ask again
                continue
            try:
                entry = await self._keys.get(command.command_id)
            except KeyNotFoundError:
                continue  # expired between the two calls: claim it afresh
            except (NatsError, TimeoutError):
                await pause(deadline)
                continue
            if entry.value is not None and entry.value.decode() != digest:
                raise IdempotencyKeyReused(
                    "this key was first used for another request (another method or body);"
                    " use a new key for a new request",
                    field="idempotency-key",
                )
            return
        raise Unavailable("the idempotency key could not be checked before the deadline")

    async def _publish(
        self,
        kind: subjects.WorkerKind,
        command: CommandBase,
        token: str,
        run: int,
        deadline: float,
    ) -> bool:
        """Publish one run of the command; False when JetStream already had it."""
        headers = {
            subjects.HEADER_MSG_ID: subjects.message_id(command.command_id, run),
            subjects.HEADER_REPLY: subjects.reply(self._gateway_id, token),
            subjects.HEADER_DEADLINE: str(int((time.time() + deadline - time.monotonic()) * 1000)),
        }
        subject, payload = subjects.command(kind, name_of(command)), encode(command)
        # As the server counts it: "NATS/1.0\r\n", "key: value\r\n" each, "\r\n", payload.
        size = 12 + sum(len(k) + len(v) + 4 for k, v in headers.items()) + len(payload)
        if size > self._nc.max_payload:
            raise PayloadTooLarge(
                f"the request makes a command of {size} bytes, more than the "
                f"{self._nc.max_payload} bytes the command bus carries (NATS max_payload)"
            )
        inbox = self._calls[token]
        ack_to = subjects.reply(self._gateway_id, f"{_ACK}{token}")
        # "No responders" also answers while a cluster elects the stream's leader; past a
        # few seconds it means there is no stream at all.
        no_stream_until = min(deadline, time.monotonic() + NO_STREAM_PATIENCE)
        pause = _Pause()
        inbox.publishing = run
        while True:
            inbox.ack = asyncio.get_running_loop().create_future()
            await self._nc.publish(subject, payload, reply=ack_to, headers=headers)
            left = deadline - time.monotonic()
            try:
                answer = await within(inbox.ack, min(left, PUBLISH_ATTEMPT), _not_taken)
            except TimeoutError:
                # Lost on a connection that had just died, or JetStream busy electing a
                # leader: the message id makes sending again safe, and a copy that did land
                # comes back as a duplicate, answered from the results bucket.
                if time.monotonic() >= deadline:
                    raise Unavailable("the command bus did not take the command in time") from None
                continue
            if not (answer.headers and answer.headers.get("Status") == "503"):
                break
            if time.monotonic() >= no_stream_until:
                raise Unavailable("no command stream is there to take the command")
            await pause(no_stream_until)
        inbox.publishing = None
        ack = pub_ack.decode(answer.data)
        if ack.error is not None:
            raise Unavailable(
                f"the command bus refused the command: {ack.error.get('description')}"
            )
        return not ack.duplicate

    async def _await_outcome(self, command_id: str, run: int, deadline: float) -> Outcome:
        """The outcome of `run` or a later run of the command, once there is one."""
        assert self._results is not None
        pause = _Pause()
        while time.monotonic() < deadline:
            try:
                entry = await self._results.get(command_id)
            except KeyNotFoundError:
                entry = None
            except (NatsError, TimeoutError):
                entry = None  # the bucket's leader is being elected: the answer is not lost
            if entry is not None and entry.value is not None:
                outcome = msgspec.json.decode(entry.value, type=Outcome)
                if outcome.stopped_run is None or outcome.stopped_run >= run:
                    return outcome
            await pause(deadline)
        raise DeadlineExceeded("the earlier request with this idempotency key has not finished")

    async def _on_reply(self, msg: Msg) -> None:
        if msg.reply.startswith(subjects.JS_ACK_PREFIX):
            return  # a JetStream consumer's delivery pointed here: no worker's reply
        token = msg.subject.rsplit(".", 1)[-1]
        if token.startswith(_ACK):
            inbox = self._calls.get(token[len(_ACK) :])
            if inbox is not None and inbox.ack is not None and not inbox.ack.done():
                inbox.ack.set_result(msg)
            return
        inbox = self._calls.get(token)
        if inbox is None:
            return  # the caller has gone: a late or repeated answer
        if is_data_frame(msg.data):
            inbox.put(read_data_frame(msg.data))
            return
        try:
            inbox.put(self._decoder.decode(msg.data))
        except msgspec.DecodeError:
            return


class _Pause:
    """Waits between polls: 10 ms, doubling to half a second, never past the deadline."""

    def __init__(self) -> None:
        self._delay = 0.01

    async def __call__(self, deadline: float) -> None:
        await asyncio.sleep(min(self._delay, max(deadline - time.monotonic(), 0)))
        self._delay = min(self._delay * 2, 0.5)


def _stops_when_left(command: CommandBase) -> bool:
    match type(command).on_caller_left:
        case Departure.STOP:
            return True
        case Departure.FINISH_IF_KEYED:
            return not is_keyed(command.command_id)
        case Departure.FINISH:
            return False


def _result_of(outcome: Outcome) -> Reply:
    if outcome.error is not None:
        raise error_from_info(outcome.error)
    if outcome.result is None:
        raise Internal("the earlier outcome holds no result")
    return outcome.result
