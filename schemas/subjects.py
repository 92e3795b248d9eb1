"""Subject names on the bus.

Commands: `gpuproxy.cmd.<worker kind>.<command>` (JetStream, durable per worker kind).
Events: `gpuproxy.evt.<aggregate>.<fact in past tense>` (JetStream, replayable log).
Replies: `gpuproxy.reply.<gateway id>.<call token>` (core NATS, one subscription per gateway).
Control: `gpuproxy.ctl.cancel.<worker kind>` (core NATS, every replica of the kind listens).
"""

from __future__ import annotations

import enum
import re

PREFIX = "gpuproxy"
COMMANDS = f"{PREFIX}.cmd"
EVENTS = f"{PREFIX}.evt"
REPLIES = f"{PREFIX}.reply"
CONTROL = f"{PREFIX}.ctl"
LOAD = f"{PREFIX}.load.proxy"
"""Core NATS: what every proxy replica routed and what came back, for the shared load book."""


class WorkerKind(enum.StrEnum):
    """The kinds of worker; each consumes `gpuproxy.cmd.<kind>.>` on its own durable consumer."""

    PROVISIONER = "provisioner"
    PROXY = "proxy"
    BILLING = "billing"


TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What may stand in one subject token that a caller chose (ids, names); use `fullmatch`."""


def command(kind: WorkerKind, name: str) -> str:
    return f"{COMMANDS}.{kind}.{name}"


def commands_of(kind: WorkerKind) -> str:
    """The filter of a worker kind's durable consumer."""
    return f"{COMMANDS}.{kind}.>"


def event(aggregate: str, fact: str) -> str:
    return f"{EVENTS}.{aggregate}.{fact}"


def replies_to(gateway_id: str) -> str:
    """The one wildcard subscription a gateway routes every reply through."""
    return f"{REPLIES}.{gateway_id}.*"


def reply(gateway_id: str, token: str) -> str:
    return f"{REPLIES}.{gateway_id}.{token}"


def cancel(kind: WorkerKind) -> str:
    return f"{CONTROL}.cancel.{kind}"


def credit(kind: WorkerKind) -> str:
    """Flow control of streamed answers (`schemas.control.Credit`)."""
    return f"{CONTROL}.credit.{kind}"


_RUN = "="


def message_id(command_id: str, run: int) -> str:
    """The `Nats-Msg-Id` of one run of a command. Run 0 is the command id itself; a command
    whose run was stopped before it had effects is sent again as the next run, which
    JetStream's dedupe window would otherwise drop."""
    return command_id if run == 0 else f"{command_id}{_RUN}{run}"


def parse_message_id(msg_id: str) -> tuple[str, int]:
    """`(command id, run)` of a `Nats-Msg-Id` made by `message_id`."""
    command_id, sep, run = msg_id.rpartition(_RUN)
    if sep and run.isdigit() and command_id:
        return command_id, int(run)
    return msg_id, 0


JS_ACK_PREFIX = "$JS.ACK."
"""Starts the reply subject of every message a JetStream consumer delivers. Replies and
cancels are sent by workers and gateways without one; a message that has one was pushed
onto the subject by a consumer and is not what it seems."""

# Headers a command carries besides `Nats-Msg-Id`.
HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_REPLY = "Gpuproxy-Reply"
HEADER_DEADLINE = "Gpuproxy-Deadline"
"""Unix time in milliseconds after which nobody waits for the answer any more."""
