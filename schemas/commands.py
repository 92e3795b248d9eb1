"""Commands: what a gateway asks a worker kind to do.

Each command is a tagged msgspec Struct; its tag is the last token of its subject
(`gpuproxy.cmd.<kind>.<tag>`). A command's id is its idempotency key: JetStream drops a repeat
inside the dedupe window and the worker answers a redelivery from the results bucket.
"""

from __future__ import annotations

import enum
from typing import Annotated, ClassVar

import msgspec

from schemas import SCHEMA_VERSION
from schemas.gpus import LaunchSpec, OfferQuery, ProviderName
from schemas.inference import MODEL_NAME, Api

MAX_PING_DELAY_MS = 60_000

KEYED_PREFIX = "k-"
"""Starts the id of a command derived from a client's idempotency key (and only those)."""


def is_keyed(command_id: str) -> bool:
    """The client sent an idempotency key: it may come back for the answer with a retry."""
    return command_id.startswith(KEYED_PREFIX)


class Departure(enum.StrEnum):
    """What happens to a running command when its caller goes away (deadline, disconnect)."""

    STOP = "stop"
    """Stopped at once: it has no effects, so a retry simply runs it again."""
    FINISH = "finish"
    """Runs to the end; a retry with the same key gets its answer."""
    FINISH_IF_KEYED = "finish_if_keyed"
    """Runs to the end when the client sent an idempotency key (it can come back for the
    answer); without one nobody can, so it is stopped and whatever it made is undone."""


class CommandBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    on_caller_left: ClassVar[Departure] = Departure.STOP

    command_id: str
    """Unique per logical request: derived from the client's idempotency key when it sent
    one (then it starts with `KEYED_PREFIX`)."""
    actor: str = ""
    """Who asked: a user id once accounts exist; empty for anonymous system calls."""
    actor_admin: bool = False
    """The actor holds the admin scope: it may see and act on every account's resources."""
    issued_at_ms: int = 0
    schema_version: int = SCHEMA_VERSION


class Ping(CommandBase, frozen=True, kw_only=True, tag="ping"):
    """Proves the round trip gateway -> JetStream -> worker -> gateway; readiness uses it."""

    message: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    delay_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_PING_DELAY_MS)] = 0
    """Work time the worker spends before answering, for exercising heartbeats and crashes."""


MAX_RESERVE_COUNT = 16
MAX_BATCH_COUNT = 16
MIN_LEASE_SECONDS = 1
MAX_LEASE_SECONDS = 30 * 24 * 3600
DEFAULT_LEASE_SECONDS = 3600
MAX_READY_SECONDS = 3600
DEFAULT_READY_SECONDS = 900


class SearchOffers(CommandBase, frozen=True, kw_only=True, tag="offers_search"):
    """Every configured provider's offers that match, cheapest first."""

    query: OfferQuery = OfferQuery()


class FindGpu(CommandBase, frozen=True, kw_only=True, tag="gpu_find"):
    """One offer, or one instance the actor may see, by id."""

    provider: ProviderName
    id: str


class CreateInstance(CommandBase, frozen=True, kw_only=True, tag="instance_create"):
    """Rent one offer; answers once the provider accepted (the instance is `starting`)."""

    on_caller_left: ClassVar[Departure] = Departure.FINISH

    provider: ProviderName
    offer_id: str
    spec: LaunchSpec = LaunchSpec()


class CreateBatch(CommandBase, frozen=True, kw_only=True, tag="instance_batch"):
    """Rent the cheapest matching offers, `counts` per provider; each instance stands alone
    (unlike a reservation, one that fails does not undo the others)."""

    on_caller_left: ClassVar[Departure] = Departure.FINISH

    counts: dict[ProviderName, Annotated[int, msgspec.Meta(ge=0, le=MAX_BATCH_COUNT)]]
    query: OfferQuery = OfferQuery()
    spec: LaunchSpec = LaunchSpec()


class DestroyInstance(CommandBase, frozen=True, kw_only=True, tag="instance_destroy"):
    on_caller_left: ClassVar[Departure] = Departure.FINISH

    instance_id: str
    provider: ProviderName | None = None
    """When given, the instance must be at this provider."""


class ListInstances(CommandBase, frozen=True, kw_only=True, tag="instance_list"):
    owner: str = ""
    """Whose instances; empty: every account's (admins only)."""
    include_ended: bool = False


class Reserve(CommandBase, frozen=True, kw_only=True, tag="reservation_create"):
    """Create `count` instances, all or nothing, and answer when every one is ready."""

    on_caller_left: ClassVar[Departure] = Departure.FINISH_IF_KEYED

    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_RESERVE_COUNT)]
    query: OfferQuery = OfferQuery()
    spec: LaunchSpec = LaunchSpec()
    strategy: str = ""
    lease_seconds: Annotated[int, msgspec.Meta(ge=MIN_LEASE_SECONDS, le=MAX_LEASE_SECONDS)] = (
        DEFAULT_LEASE_SECONDS
    )
    ready_seconds: Annotated[int, msgspec.Meta(ge=1, le=MAX_READY_SECONDS)] = DEFAULT_READY_SECONDS
    """How long the instances may take to become ready before the reservation is undone."""


class GetReservation(CommandBase, frozen=True, kw_only=True, tag="reservation_get"):
    reservation_id: str


class ListReservations(CommandBase, frozen=True, kw_only=True, tag="reservation_list"):
    owner: str = ""
    """Whose reservations; empty: every account's (admins only)."""
    include_ended: bool = False


class RenewReservation(CommandBase, frozen=True, kw_only=True, tag="reservation_renew"):
    """Set the lease to end `lease_seconds` from now."""

    on_caller_left: ClassVar[Departure] = Departure.FINISH

    reservation_id: str
    lease_seconds: Annotated[int, msgspec.Meta(ge=MIN_LEASE_SECONDS, le=MAX_LEASE_SECONDS)]


class ReleaseReservation(CommandBase, frozen=True, kw_only=True, tag="reservation_release"):
    """End the lease now: the reservation's instances are destroyed."""

    on_caller_left: ClassVar[Departure] = Departure.FINISH

    reservation_id: str


class ShareInstance(CommandBase, frozen=True, kw_only=True, tag="instance_share"):
    """Let every account's inference use an instance (admins only), or stop sharing it."""

    on_caller_left: ClassVar[Departure] = Departure.FINISH

    instance_id: str
    shared: bool


ProvisionerCommand = (
    SearchOffers
    | FindGpu
    | CreateInstance
    | CreateBatch
    | DestroyInstance
    | ListInstances
    | Reserve
    | GetReservation
    | ListReservations
    | RenewReservation
    | ReleaseReservation
    | ShareInstance
)


class Inference(CommandBase, frozen=True, kw_only=True, tag="inference"):
    """One inference request. Stopped when its caller leaves (the default departure): a
    request nobody waits for must not keep a GPU busy."""

    api: Api
    model: MODEL_NAME = ""
    """The model asked for; empty when `instance_id` names the machine."""
    instance_id: str = ""
    """Set when the caller named one machine (`instance://<id>`): only it may serve."""
    body: msgspec.Raw
    """The client's JSON object, as sent."""
    actor_role: str = ""
    """The actor's role: shared machines may serve some roles only."""
    stream: bool = False
    session_key: str = ""
    """Keeps a conversation on one machine under `session_affinity` (the `user` field or
    an `x-session-id` header); empty: the actor."""


class ListModels(CommandBase, frozen=True, kw_only=True, tag="models_list"):
    """The models the actor can reach right now."""

    actor_role: str = ""


class SetStrategy(CommandBase, frozen=True, kw_only=True, tag="strategy_set"):
    """Choose how the proxy picks machines: for one account, or (admins) the default of
    every account that chose none."""

    on_caller_left: ClassVar[Departure] = Departure.FINISH

    strategy: str
    owner: str = ""
    """Whose strategy; empty with `fleet_default`."""
    fleet_default: bool = False


class GetStrategy(CommandBase, frozen=True, kw_only=True, tag="strategy_get"):
    owner: str


class GetLoad(CommandBase, frozen=True, kw_only=True, tag="load_info"):
    """The shared load book, as far as the actor may see it."""

    instance_id: str = ""
    """Only this machine; empty: every machine the actor can reach."""
    owner: str = ""
    """Whose strategy is reported alongside."""


ProxyCommand = Inference | ListModels | SetStrategy | GetStrategy | GetLoad

Command = Ping | ProvisionerCommand | ProxyCommand
"""Every command; grows as worker kinds learn more."""


def name_of(command: CommandBase) -> str:
    """The subject token of a command: its tag."""
    tag = type(command).__struct_config__.tag
    assert isinstance(tag, str)
    return tag
