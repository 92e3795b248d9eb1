"""Load-balancing messages shared by the proxy replicas, and the strategies they can route by.

Every proxy replica publishes what it routed (`Routed`), what came back (`Finished`) and, every
few seconds, what it still has in flight (`ReplicaLoad`) on one core NATS subject that every
replica applies, its own messages included. Each replica so keeps the same load book and two
replicas routing one conversation send it to one machine. A message is applied once by its
`request_id` (snapshots by replica and time), so an echo or a redelivery changes nothing.

`LoadInfo` is the book read back: per machine and per provider, for operators and dashboards.
"""

from __future__ import annotations

import enum

import msgspec

from schemas.errors import InvalidArgument


class Strategy(enum.StrEnum):
    """How a proxy replica picks the machine for one inference request."""

    ROUND_ROBIN = "round_robin"
    WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
    EQUAL_WEIGHTED = "equal_weighted"
    LEAST_CONNECTIONS = "least_connections"
    LEAST_RESPONSE_TIME = "least_response_time"
    RANDOM = "random"
    POWER_OF_TWO = "power_of_two"
    LEAST_COST = "least_cost"
    SESSION_AFFINITY = "session_affinity"
    CACHE_AWARE = "cache_aware"


def strategy_named(name: str) -> Strategy:
    """The strategy a caller named (any case, spaces around ignored); `InvalidArgument`
    naming the field `strategy` and every known name when there is none by that name."""
    try:
        return Strategy(name.strip().lower())
    except ValueError:
        names = ", ".join(Strategy)
        raise InvalidArgument(
            f"unknown strategy {name[:64]!r}; one of {names}", field="strategy"
        ) from None


class LoadMessageBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    replica: str
    """The proxy replica that published the message (its worker id)."""
    at_ms: int
    """The publishing replica's clock."""


class Routed(LoadMessageBase, frozen=True, kw_only=True, tag="routed"):
    """A replica sent a request to a machine; the request is in flight there until `Finished`."""

    request_id: str
    instance_id: str
    prefix_blocks: list[int]
    """Chained hashes of the prompt's leading blocks (`workers.proxy.prefixes`): teaches every
    replica's prefix index that this machine now holds them in its cache."""
    session_key: str = ""
    provider: str = ""
    """The machine's provider, so every replica can add it to the provider's aggregates."""


class Finished(LoadMessageBase, frozen=True, kw_only=True, tag="finished"):
    """A routed request came back, answered or failed."""

    request_id: str
    instance_id: str
    ok: bool
    latency_ms: int
    """From sending the request to the last byte of the answer (or the failure)."""
    ttft_ms: int | None = None
    """Time to the first token of a streamed answer; none for a failure or a whole answer."""


class ReplicaLoad(LoadMessageBase, frozen=True, kw_only=True, tag="replica_load"):
    """A replica's periodic snapshot of its own requests in flight. A replica that restarted or
    missed messages takes these counts as the truth about the sender, and a sender whose
    snapshots stop is taken for dead: its requests stop counting."""

    in_flight: dict[str, int]
    """Requests in flight from this replica, by machine id; a machine with none is left out."""
    routed_seen: int = 0
    """How many requests the sender has seen routed by all replicas: the round-robin counter.
    Every replica takes the highest it hears, so one that started late joins the rotation."""


LoadMessage = Routed | Finished | ReplicaLoad


class InstanceLoad(msgspec.Struct, frozen=True, kw_only=True):
    """One machine as the load book sees it."""

    instance_id: str
    provider: str
    in_flight: int
    """Requests in flight on it, from every live replica."""
    routed: int
    """Requests sent to it since the book started (or the machine was forgotten)."""
    finished: int
    avg_response_ms: float | None
    """Moving average (EWMA) of the latency of answered requests; none before the first."""
    ttft_ms: float | None
    """Moving average (EWMA) of the time to first token; none before the first stream."""
    error_rate: float
    """Moving average (EWMA) of failures: 0.0 never fails, 1.0 always does."""
    load_score: float
    """Lower is better; the formula is `workers.proxy.loadbook.load_score`."""


class ProviderLoad(msgspec.Struct, frozen=True, kw_only=True):
    """The machines of one provider taken together."""

    provider: str
    instances: int
    in_flight: int
    routed: int
    finished: int
    avg_response_ms: float | None
    ttft_ms: float | None
    error_rate: float
    load_score: float
    """The mean load score of its machines."""


class LoadInfo(msgspec.Struct, frozen=True, kw_only=True):
    instances: list[InstanceLoad]
    providers: list[ProviderLoad]
