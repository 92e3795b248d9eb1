"""The bus contract: JSON shapes other-language clients rely on, subjects and topology."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas import SCHEMA_VERSION, subjects, topology
from schemas.commands import MAX_PING_DELAY_MS, Command, Ping, name_of
from schemas.control import Cancel
from schemas.errors import ErrorCode, ErrorInfo
from schemas.events import (
    CommandDeadLettered,
    Event,
    EventBase,
    WorkerStarted,
    WorkerStopped,
    subject_of,
)
from schemas.replies import Chunk, ChunkBase, Data, Failure, Heartbeat, Outcome, Pong, Result
from schemas.subjects import WorkerKind

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
PROJECT_PACKAGES = {"gateway", "workers", "bus", "gpuproxy"}

PONG = Pong(message="hi", worker_kind="provisioner", worker_id="provisioner-a-1-abc", attempt=2)
BOOM = ErrorInfo(code=ErrorCode.NOT_FOUND, message="no such offer", field="offer_id")

CHUNKS: dict[str, ChunkBase] = {
    "data": Data(command_id="c1", attempt=1, seq=0, body=b"\x00tokens\xff"),
    "heartbeat": Heartbeat(command_id="c1", attempt=1, seq=1),
    "result": Result(command_id="c1", attempt=1, seq=2, result=PONG),
    "failure": Failure(command_id="c1", attempt=3, seq=0, error=BOOM),
}
EVENTS: dict[str, EventBase] = {
    "worker.started": WorkerStarted(
        event_id="e1",
        occurred_at_ms=1_700_000_000_000,
        worker_kind="proxy",
        worker_id="proxy-a-1-abc",
        host="a",
        pid=1,
    ),
    "worker.stopped": WorkerStopped(
        event_id="e2",
        occurred_at_ms=1_700_000_000_001,
        worker_kind="proxy",
        worker_id="proxy-a-1-abc",
        in_flight_abandoned=3,
    ),
    "command.dead_lettered": CommandDeadLettered(
        event_id="e3",
        occurred_at_ms=1_700_000_000_002,
        actor="user-1",
        command_id="c1",
        subject="gpuproxy.cmd.provisioner.ping",
        deliveries=5,
        error=BOOM,
    ),
}


def wire(message: msgspec.Struct) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(message))
    return decoded


def matches(filter_subject: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a trailing `>` is one or more."""
    wanted, given = filter_subject.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(given) > i
        if i >= len(given) or token not in ("*", given[i]):
            return False
    return len(given) == len(wanted)


def test_a_ping_survives_a_json_round_trip() -> None:
    ping = Ping(command_id="c1", actor="user-1", issued_at_ms=5, message="hello", delay_ms=250)

    raw = msgspec.json.encode(ping)

    assert msgspec.json.decode(raw, type=Ping) == ping
    assert msgspec.json.decode(raw, type=Command) == ping


def test_a_command_names_its_type_and_schema_version_on_the_wire() -> None:
    body = wire(Ping(command_id="c1"))

    assert body["type"] == "ping"
    assert body["schema_version"] == SCHEMA_VERSION
    assert body["command_id"] == "c1"


def test_a_ping_from_another_language_decodes_with_defaults() -> None:
    ping = msgspec.json.decode(b'{"type": "ping", "command_id": "c9"}', type=Ping)

    assert ping == Ping(command_id="c9", message="", delay_ms=0)
    assert name_of(ping) == "ping"


@pytest.mark.parametrize("tag", CHUNKS)
def test_every_chunk_survives_a_round_trip_through_the_chunk_union(tag: str) -> None:
    chunk = CHUNKS[tag]

    decoded = msgspec.json.decode(msgspec.json.encode(chunk), type=Chunk)

    assert type(decoded) is type(chunk)
    assert decoded == chunk


@pytest.mark.parametrize("tag", CHUNKS)
def test_a_chunk_names_its_kind_in_the_t_field(tag: str) -> None:
    body = wire(CHUNKS[tag])

    assert body["t"] == tag
    assert {"command_id", "attempt", "seq"} <= body.keys()


def test_a_result_chunk_carries_the_reply_with_its_own_type() -> None:
    body = wire(CHUNKS["result"])

    assert body["result"]["type"] == "pong"
    assert body["result"]["worker_kind"] == "provisioner"


def test_a_failure_chunk_carries_the_error_code_as_a_string() -> None:
    body = wire(CHUNKS["failure"])

    assert body["error"] == {
        "code": "not_found",
        "message": "no such offer",
        "field": "offer_id",
        "retriable": False,
    }


def test_a_chunk_of_an_unknown_kind_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"t": "progress", "command_id": "c", "attempt": 1, "seq": 0}', type=Chunk
        )


@pytest.mark.parametrize("tag", EVENTS)
def test_every_event_survives_a_round_trip_through_the_event_union(tag: str) -> None:
    event = EVENTS[tag]

    decoded = msgspec.json.decode(msgspec.json.encode(event), type=Event)

    assert type(decoded) is type(event)
    assert decoded == event


@pytest.mark.parametrize("tag", EVENTS)
def test_an_event_names_its_type_and_schema_version_on_the_wire(tag: str) -> None:
    body = wire(EVENTS[tag])

    assert body["type"] == tag
    assert body["schema_version"] == SCHEMA_VERSION
    assert {"event_id", "occurred_at_ms"} <= body.keys()


@pytest.mark.parametrize("tag", EVENTS)
def test_an_event_is_published_on_its_tag_under_the_event_stream(tag: str) -> None:
    subject = subject_of(EVENTS[tag])

    assert subject == f"gpuproxy.evt.{tag}"
    assert any(matches(s, subject) for s in topology.event_stream().subjects)
    assert not any(matches(s, subject) for s in topology.command_stream().subjects)


def test_outcome_and_cancel_survive_a_round_trip() -> None:
    for message, type_ in (
        (Outcome(result=PONG), Outcome),
        (Outcome(error=BOOM), Outcome),
        (Cancel(command_id="c1"), Cancel),
    ):
        assert msgspec.json.decode(msgspec.json.encode(message), type=type_) == message


@pytest.mark.parametrize("delay_ms", [-1, MAX_PING_DELAY_MS + 1, 10**9])
def test_a_ping_with_a_delay_out_of_range_is_refused_when_decoded(delay_ms: int) -> None:
    raw = msgspec.json.encode({"type": "ping", "command_id": "c", "delay_ms": delay_ms})

    with pytest.raises(msgspec.ValidationError, match="delay_ms"):
        msgspec.json.decode(raw, type=Ping)


@pytest.mark.parametrize("delay_ms", [0, MAX_PING_DELAY_MS])
def test_a_ping_delay_at_either_end_of_its_range_is_accepted(delay_ms: int) -> None:
    raw = msgspec.json.encode({"type": "ping", "command_id": "c", "delay_ms": delay_ms})

    assert msgspec.json.decode(raw, type=Ping).delay_ms == delay_ms


def test_a_ping_message_over_1024_characters_is_refused_when_decoded() -> None:
    raw = msgspec.json.encode({"type": "ping", "command_id": "c", "message": "x" * 1025})

    with pytest.raises(msgspec.ValidationError, match="message"):
        msgspec.json.decode(raw, type=Ping)


def test_a_ping_message_of_1024_characters_is_accepted() -> None:
    raw = msgspec.json.encode({"type": "ping", "command_id": "c", "message": "é" * 1024})

    assert len(msgspec.json.decode(raw, type=Ping).message) == 1024


def test_command_subjects() -> None:
    assert subjects.command(WorkerKind.PROXY, "ping") == "gpuproxy.cmd.proxy.ping"
    assert subjects.commands_of(WorkerKind.BILLING) == "gpuproxy.cmd.billing.>"
    name = name_of(Ping(command_id="c"))
    assert subjects.command(WorkerKind.PROVISIONER, name) == "gpuproxy.cmd.provisioner.ping"


def test_reply_subjects() -> None:
    assert subjects.reply("gw-1", "tok") == "gpuproxy.reply.gw-1.tok"
    assert subjects.replies_to("gw-1") == "gpuproxy.reply.gw-1.*"
    assert matches(subjects.replies_to("gw-1"), subjects.reply("gw-1", "tok"))
    assert not matches(subjects.replies_to("gw-1"), subjects.reply("gw-2", "tok"))


def test_cancel_and_event_subjects() -> None:
    assert subjects.cancel(WorkerKind.PROVISIONER) == "gpuproxy.ctl.cancel.provisioner"
    assert subjects.event("instance", "started") == "gpuproxy.evt.instance.started"


@pytest.mark.parametrize("kind", list(WorkerKind))
def test_a_kinds_commands_are_in_the_command_stream_and_only_its_consumer(
    kind: WorkerKind,
) -> None:
    subject = subjects.command(kind, "ping")

    assert any(matches(s, subject) for s in topology.command_stream().subjects)
    for other in WorkerKind:
        consumer = topology.command_consumer(other)
        assert matches(consumer.filter_subject, subject) == (other == kind)
        assert consumer.stream == topology.COMMAND_STREAM


def test_the_results_bucket_outlives_the_dedupe_window() -> None:
    ttl = topology.results_bucket().ttl_seconds

    assert ttl >= topology.DEDUPE_WINDOW_SECONDS
    assert ttl >= topology.command_stream().duplicate_window_seconds


def test_the_command_stream_is_a_work_queue_and_the_event_stream_a_log() -> None:
    assert topology.command_stream().retention == "workqueue"
    assert topology.event_stream().retention == "limits"


def test_streams_and_buckets_take_the_replica_count() -> None:
    assert topology.command_stream(3).replicas == 3
    assert topology.event_stream(3).replicas == 3
    assert topology.results_bucket(3).replicas == 3


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it, relative imports resolved."""
    package = path.parent.name
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.add(package)
            if node.module:
                found.add(node.module)
    return found


SCHEMA_FILES = sorted(SCHEMAS_DIR.glob("*.py"))


def test_the_schemas_package_has_modules_to_check() -> None:
    assert len(SCHEMA_FILES) >= 7


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_schemas_import_nothing_else_of_the_project(path: Path) -> None:
    forbidden = {m for m in imports_of(path) if m.split(".")[0] in PROJECT_PACKAGES}

    assert forbidden == set()
