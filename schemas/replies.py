"""What a worker sends back on a command's reply subject.

Replies travel on core NATS as a sequence of chunks: any number of `Data` and `Heartbeat`,
then exactly one terminal `Result` or `Failure`. `seq` counts from 0 within one delivery
`attempt`; a redelivered command starts a new attempt.
"""

from __future__ import annotations

import msgspec

from schemas import SCHEMA_VERSION
from schemas.balancing import LoadInfo
from schemas.errors import ErrorInfo
from schemas.gpus import GpuOffer, Instance, ProviderName, Reservation
from schemas.inference import InferenceDone, ModelList


class Pong(msgspec.Struct, frozen=True, kw_only=True, tag="pong"):
    message: str
    worker_kind: str
    worker_id: str
    attempt: int
    """The JetStream delivery count of the command that produced this answer."""


class OfferList(msgspec.Struct, frozen=True, kw_only=True, tag="offers"):
    offers: list[GpuOffer]
    unavailable: dict[str, str] = {}
    """Providers that did not answer the search, with their reason: the list lacks them."""


class GpuFound(msgspec.Struct, frozen=True, kw_only=True, tag="gpu"):
    """Exactly one of the two is set."""

    offer: GpuOffer | None = None
    instance: Instance | None = None


class InstanceView(msgspec.Struct, frozen=True, kw_only=True, tag="instance"):
    instance: Instance
    message: str = ""


class InstanceList(msgspec.Struct, frozen=True, kw_only=True, tag="instances"):
    instances: list[Instance]


class BatchFailure(msgspec.Struct, frozen=True, kw_only=True):
    provider: ProviderName
    error: ErrorInfo


class BatchCreated(msgspec.Struct, frozen=True, kw_only=True, tag="batch"):
    instances: list[Instance]
    failures: list[BatchFailure] = []
    """One entry per instance that could not be created, with why."""


class ReservationView(msgspec.Struct, frozen=True, kw_only=True, tag="reservation"):
    reservation: Reservation
    instances: list[Instance] = []


class ReservationList(msgspec.Struct, frozen=True, kw_only=True, tag="reservations"):
    reservations: list[Reservation]


class StrategyView(msgspec.Struct, frozen=True, kw_only=True, tag="strategy"):
    strategy: str
    source: str
    """`account` (chosen for it), `default` (an admin's choice for all) or `setting`
    (`LB_STRATEGY`)."""


class LoadView(msgspec.Struct, frozen=True, kw_only=True, tag="load"):
    load: LoadInfo
    strategy: str
    """The strategy in force for the account asked about."""


Reply = (
    Pong
    | OfferList
    | GpuFound
    | InstanceView
    | InstanceList
    | BatchCreated
    | ReservationView
    | ReservationList
    | InferenceDone
    | ModelList
    | StrategyView
    | LoadView
)
"""Every terminal result."""


class ChunkBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="t"):
    command_id: str
    attempt: int
    seq: int
    schema_version: int = SCHEMA_VERSION


class Data(ChunkBase, frozen=True, kw_only=True, tag="data"):
    """A piece of a streamed answer (for example inference tokens)."""

    body: bytes


class Heartbeat(ChunkBase, frozen=True, kw_only=True, tag="heartbeat"):
    """The worker is still at it; the gateway keeps waiting."""


class Result(ChunkBase, frozen=True, kw_only=True, tag="result"):
    result: Reply


class Failure(ChunkBase, frozen=True, kw_only=True, tag="failure"):
    error: ErrorInfo


Chunk = Data | Heartbeat | Result | Failure
Terminal = Result | Failure


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """A command's terminal answer as kept in the results bucket."""

    result: Reply | None = None
    error: ErrorInfo | None = None
    stopped_run: int | None = None
    """Set when this is no answer: that run of the command was stopped before it had effects
    (its caller left, or its deadline passed first). A retry with the same idempotency key
    starts the next run instead of being answered with `error`."""

    @property
    def finished(self) -> bool:
        return self.stopped_run is None
