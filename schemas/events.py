"""Events: facts in past tense, published on `gpuproxy.evt.<tag>` into the replayable log."""

from __future__ import annotations

import msgspec

from schemas import SCHEMA_VERSION, subjects
from schemas.errors import ErrorInfo
from schemas.inference import Api, Usage


class EventBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    event_id: str
    """Unique; also the `Nats-Msg-Id`, so a republished event is stored once."""
    occurred_at_ms: int
    actor: str = ""
    schema_version: int = SCHEMA_VERSION


class WorkerStarted(EventBase, frozen=True, kw_only=True, tag="worker.started"):
    worker_kind: str
    worker_id: str
    host: str
    pid: int


class WorkerStopped(EventBase, frozen=True, kw_only=True, tag="worker.stopped"):
    worker_kind: str
    worker_id: str
    in_flight_abandoned: int
    """Commands still running at stop; JetStream delivers them again to another replica."""


class CommandDeadLettered(EventBase, frozen=True, kw_only=True, tag="command.dead_lettered"):
    """A command was given up on: rejected by its handler or out of delivery attempts."""

    command_id: str
    subject: str
    deliveries: int
    error: ErrorInfo


class UserRegistered(EventBase, frozen=True, kw_only=True, tag="user.registered"):
    user_id: str
    role: str


class SessionStarted(EventBase, frozen=True, kw_only=True, tag="session.started"):
    """A user logged in. Carries who, never a credential."""

    user_id: str


class SessionEnded(EventBase, frozen=True, kw_only=True, tag="session.ended"):
    user_id: str
    reason: str
    """`logout`, or `reuse` when a rotated refresh token came back and the chain was revoked."""


class ApiKeyCreated(EventBase, frozen=True, kw_only=True, tag="apikey.created"):
    """A key was minted. Carries its public id and scopes, never its secret or digest."""

    user_id: str
    key_id: str
    name: str
    scopes: tuple[str, ...]
    expires_at_ms: int | None = None


class ApiKeyRevoked(EventBase, frozen=True, kw_only=True, tag="apikey.revoked"):
    user_id: str
    key_id: str


class UserUpdated(EventBase, frozen=True, kw_only=True, tag="user.updated"):
    """An admin changed a user's role, status or limit; `changed` names the fields."""

    user_id: str
    changed: tuple[str, ...]
    role: str
    disabled: bool
    rate_limit_per_minute: int


class IpAccessChanged(EventBase, frozen=True, kw_only=True, tag="ipaccess.changed"):
    """A user's address lists or their mode changed."""

    user_id: str
    change: str
    """`config`, `allowlist.added`, `allowlist.removed`, `denylist.added`, `denylist.removed`."""
    mode: str
    entry_id: str = ""
    cidr: str = ""


class InstanceTransitioned(EventBase, frozen=True, kw_only=True, tag="instance.transitioned"):
    """An instance entered `to_state`; states are never re-entered, so the event id
    `instance-<id>-<state>` is unique and a republish is stored once."""

    instance_id: str
    owner: str
    provider: str
    from_state: str
    to_state: str
    reason: str = ""
    provider_id: str = ""
    reservation_id: str = ""
    price_per_hour_micros: int = 0


class ReservationTransitioned(EventBase, frozen=True, kw_only=True, tag="reservation.transitioned"):
    """A reservation entered `to_state` (once each: the id is `reservation-<id>-<state>`).
    `degraded` and `failed` after `active` mean some or all of its instances ended; `reason`
    names them and why."""

    reservation_id: str
    owner: str
    from_state: str
    to_state: str
    reason: str = ""
    instance_ids: tuple[str, ...] = ()
    lease_expires_at_ms: int = 0


class ReservationRenewed(EventBase, frozen=True, kw_only=True, tag="reservation.renewed"):
    reservation_id: str
    owner: str
    lease_expires_at_ms: int


class GpuTimeUsed(EventBase, frozen=True, kw_only=True, tag="usage.gpu_time"):
    """GPU time an instance was billable for, `[start_ms, end_ms)`, at its hourly price.

    Slices are whole minutes from when the provider accepted the create, except the last,
    which ends exactly when the instance stopped being billable (`final`). The amounts are
    differences of one running total rounded down, so the slices of an instance add up to
    exactly its price times its billable time. The event id `gputime-<instance>-<start_ms>`
    makes a repeat harmless.
    """

    instance_id: str
    owner: str
    provider: str
    reservation_id: str = ""
    start_ms: int
    end_ms: int
    price_per_hour_micros: int
    amount_micros: int
    final: bool = False


class InferenceUsed(EventBase, frozen=True, kw_only=True, tag="usage.inference"):
    """The tokens one inference request produced and delivered, priced: one event per
    request whatever its end, with the id `inference-<command id>`, so a repeat is
    harmless."""

    command_id: str
    owner: str
    model: str
    instance_id: str
    provider: str
    api: Api
    usage: Usage
    price_input_micros: int
    """The prices in force, micro-units per million tokens."""
    price_cached_input_micros: int
    price_output_micros: int
    cost_micros: int
    outcome: str
    """`completed`, `failed` or `cancelled` (the client left)."""
    streamed: bool


class InstanceCircuitChanged(EventBase, frozen=True, kw_only=True, tag="instance.circuit_changed"):
    """The proxy's circuit breaker for a machine changed state. Every proxy replica derives the
    breaker from the same load messages and publishes the change with the id
    `circuit-<instance>-<opened at ms>-<state>`, so the log keeps one; `occurred_at_ms` is the
    time the messages give the change, not when a replica noticed it."""

    instance_id: str
    provider: str
    state: str
    """`open` (no request until `until_ms`), `half_open` (one probe request is let through) or
    `closed` (requests flow)."""
    reason: str
    """`consecutive_failures` or `error_rate` (it tripped), `probe_failed` or
    `probe_timed_out` (it opened again), `open_elapsed` (half-open), `probe_succeeded`
    (closed)."""
    failures: int
    """The failures that opened it, plus each failed probe since; 0 once closed."""
    until_ms: int = 0
    """For `open`, when it turns half-open; 0 otherwise."""


Event = (
    WorkerStarted
    | WorkerStopped
    | CommandDeadLettered
    | UserRegistered
    | SessionStarted
    | SessionEnded
    | ApiKeyCreated
    | ApiKeyRevoked
    | UserUpdated
    | IpAccessChanged
    | InstanceTransitioned
    | ReservationTransitioned
    | ReservationRenewed
    | GpuTimeUsed
    | InferenceUsed
    | InstanceCircuitChanged
)


def subject_of(event: EventBase) -> str:
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return f"{subjects.EVENTS}.{tag}"
