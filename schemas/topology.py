"""Streams, consumers and KV buckets, declared as data.

The bus plumbing turns these into JetStream calls at start; they are idempotent, so every
process declares what it needs and the first one to start creates it.
"""

from __future__ import annotations

import msgspec

from schemas import subjects
from schemas.subjects import WorkerKind


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    subjects: tuple[str, ...]
    retention: str
    """`workqueue` (a message is gone once a consumer acks it) or `limits` (kept by age)."""
    max_age_seconds: float
    duplicate_window_seconds: float
    replicas: int = 1


class ConsumerSpec(msgspec.Struct, frozen=True, kw_only=True):
    stream: str
    durable: str
    filter_subject: str
    ack_wait_seconds: float
    max_deliver: int
    max_ack_pending: int


class KeyValueSpec(msgspec.Struct, frozen=True, kw_only=True):
    bucket: str
    ttl_seconds: float
    history: int = 1
    replicas: int = 1


COMMAND_STREAM = "GPUPROXY_CMD"
EVENT_STREAM = "GPUPROXY_EVT"
RESULTS_BUCKET = "gpuproxy-results"
"""Terminal answers by command id: a redelivered or repeated command is answered from here
instead of being carried out twice."""

KEYS_BUCKET = "gpuproxy-idempotency"
"""What each idempotency key was first used for (a digest of method and request) by command
id: the same key with another request is refused instead of answered with the first's answer."""
DRAINS_BUCKET = "gpuproxy-drains"
"""How many times a stopping worker handed a command back, by message id: those deliveries
do not count against the command's delivery budget."""

ACCESS_BUCKET = "gpuproxy-access"
"""Who may do what (`schemas.access`): users and API keys, watched by every gateway."""
ENDED_SESSIONS_BUCKET = "gpuproxy-ended-sessions"
"""Sessions ended by logout or reuse; their access tokens are refused until they expire."""
RATE_BUCKET = "gpuproxy-rate"
"""Requests taken per credential per minute, shared by all gateway replicas."""
STATIC_CLAIMS_BUCKET = "gpuproxy-static-claims"
BALANCING_BUCKET = "gpuproxy-balancing"
"""Load-balancing strategies: `default` (set by an admin) and `user.<id>` per account."""
"""Which bring-your-own endpoints are rented, by endpoint name: a claim is one instance."""

INSTANCES_BUCKET = "gpuproxy-instances"
"""The instance registry (`schemas.gpus.Instance` by id), changed only by revision-checked
updates: the shared, honest picture of every rented machine."""
RESERVATIONS_BUCKET = "gpuproxy-reservations"
"""Reservations (`schemas.gpus.Reservation` by id), revision-checked like the registry."""
LEASES_BUCKET = "gpuproxy-leases"
"""Short leases that elect one replica for a singleton job (the provisioner's reconciler);
a holder that dies stops renewing and its lease ages out."""
LEASE_TTL_SECONDS = 10.0
WORKERS_BUCKET = "gpuproxy-workers"
"""Worker replicas' heartbeats (`schemas.heartbeat.WorkerHeartbeat`) by `<kind>.<worker id>`:
which replicas take commands, read by the gateways' status without sending any command."""
HEARTBEAT_SECONDS = 5.0
"""How often a worker replica puts its heartbeat."""

MAX_ACCESS_TTL_SECONDS = 24 * 3600
"""The longest an access token may live; ended sessions are remembered a little longer."""

DEDUPE_WINDOW_SECONDS = 600.0
"""How long the same command id (idempotency key) is recognised as a repeat."""


def command_stream(replicas: int = 1) -> StreamSpec:
    return StreamSpec(
        name=COMMAND_STREAM,
        subjects=(f"{subjects.COMMANDS}.>",),
        retention="workqueue",
        max_age_seconds=COMMAND_MAX_AGE_SECONDS,
        duplicate_window_seconds=DEDUPE_WINDOW_SECONDS,
        replicas=replicas,
    )


def event_stream(replicas: int = 1) -> StreamSpec:
    return StreamSpec(
        name=EVENT_STREAM,
        subjects=(f"{subjects.EVENTS}.>",),
        retention="limits",
        max_age_seconds=365 * 24 * 3600.0,
        duplicate_window_seconds=DEDUPE_WINDOW_SECONDS,
        replicas=replicas,
    )


COMMAND_MAX_AGE_SECONDS = 24 * 3600.0


def command_consumer(kind: WorkerKind, *, ack_wait_seconds: float = 30.0) -> ConsumerSpec:
    # JetStream cannot tell a delivery handed back by a draining worker from one that failed,
    # so it redelivers without limit and the workers keep the budget (`DRAINS_BUCKET`).
    return ConsumerSpec(
        stream=COMMAND_STREAM,
        durable=str(kind),
        filter_subject=subjects.commands_of(kind),
        ack_wait_seconds=ack_wait_seconds,
        max_deliver=-1,
        max_ack_pending=4096,
    )


def results_bucket(replicas: int = 1) -> KeyValueSpec:
    # Kept at least as long as the dedupe window, so a repeat that JetStream drops as a
    # duplicate still finds its answer.
    return KeyValueSpec(
        bucket=RESULTS_BUCKET, ttl_seconds=DEDUPE_WINDOW_SECONDS * 2, replicas=replicas
    )


def keys_bucket(replicas: int = 1) -> KeyValueSpec:
    # As long as JetStream recognises a repeat: past that, a key starts afresh.
    return KeyValueSpec(bucket=KEYS_BUCKET, ttl_seconds=DEDUPE_WINDOW_SECONDS, replicas=replicas)


def drains_bucket(replicas: int = 1) -> KeyValueSpec:
    # A handed-back command may wait in the stream as long as the stream keeps it.
    return KeyValueSpec(
        bucket=DRAINS_BUCKET, ttl_seconds=COMMAND_MAX_AGE_SECONDS, replicas=replicas
    )


def access_bucket(replicas: int = 1) -> KeyValueSpec:
    return KeyValueSpec(bucket=ACCESS_BUCKET, ttl_seconds=0.0, replicas=replicas)


def ended_sessions_bucket(replicas: int = 1) -> KeyValueSpec:
    return KeyValueSpec(
        bucket=ENDED_SESSIONS_BUCKET,
        ttl_seconds=MAX_ACCESS_TTL_SECONDS + 3600.0,
        replicas=replicas,
    )


def rate_bucket(replicas: int = 1) -> KeyValueSpec:
    # A window's counter is read for one minute; two more cover clocks that disagree a little.
    return KeyValueSpec(bucket=RATE_BUCKET, ttl_seconds=180.0, replicas=replicas)


def instances_bucket(replicas: int = 1) -> KeyValueSpec:
    return KeyValueSpec(bucket=INSTANCES_BUCKET, ttl_seconds=0.0, replicas=replicas)


def reservations_bucket(replicas: int = 1) -> KeyValueSpec:
    return KeyValueSpec(bucket=RESERVATIONS_BUCKET, ttl_seconds=0.0, replicas=replicas)


def leases_bucket(replicas: int = 1, ttl_seconds: float = LEASE_TTL_SECONDS) -> KeyValueSpec:
    return KeyValueSpec(bucket=LEASES_BUCKET, ttl_seconds=ttl_seconds, replicas=replicas)


def workers_bucket(replicas: int = 1, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> KeyValueSpec:
    # Three beats missed before a replica counts as gone: one late put is not a death.
    return KeyValueSpec(bucket=WORKERS_BUCKET, ttl_seconds=heartbeat_seconds * 3, replicas=replicas)


def static_claims_bucket(replicas: int = 1) -> KeyValueSpec:
    # A claim lasts until its instance is destroyed, however long that is.
    return KeyValueSpec(bucket=STATIC_CLAIMS_BUCKET, ttl_seconds=0.0, replicas=replicas)


def balancing_bucket(replicas: int = 1) -> KeyValueSpec:
    return KeyValueSpec(bucket=BALANCING_BUCKET, ttl_seconds=0.0, replicas=replicas)
