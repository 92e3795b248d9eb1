"""The load book: what every proxy replica knows of the load on every machine it routes to.

Each replica keeps one and applies to it every `Routed`, `Finished` and `ReplicaLoad` message
published by any replica, its own included, so all books agree without a shared store:

- Requests in flight per machine are the sum over replicas. A request counts from its `Routed`
  to its `Finished`; a message applied twice (an echo, a redelivery) changes nothing, by its
  `request_id`.
- A replica that restarted or missed messages converges on its peers' snapshots: a snapshot
  says how many requests its sender had in flight on each machine at its `at_ms`; the book
  drops the oldest of the sender's requests it still holds from before then when it holds too
  many (their `Finished` was missed), or counts unnamed ones when it holds too few (their
  `Routed` was missed). NATS keeps one publisher's messages in order, which this relies on.
- A replica whose snapshots stop for longer than `replica_timeout_ms` (local clock) is taken
  for dead, and its requests stop counting. The book's own requests never expire that way.
- Latency, time to first token and failures are exponentially weighted moving averages
  (`EWMA_ALPHA`) per machine and per provider. A failure counts only towards the error rate:
  a machine that fails fast must not look like the fastest.
- Routed prompts teach the prefix index (`workers.proxy.prefixes`) used by cache-aware routing.

Pure logic: the clock comes in as `now_ms`, nothing here reads the time or does I/O.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from schemas.balancing import (
    Finished,
    InstanceLoad,
    LoadInfo,
    LoadMessage,
    ProviderLoad,
    ReplicaLoad,
    Routed,
)
from workers.proxy.prefixes import PrefixIndex

EWMA_ALPHA = 0.2
"""Weight of the newest sample in every moving average: the last ten or so requests of a
machine carry most (about 90 %) of the weight, so a machine that slows down is noticed after a
handful of answers and one outlier moves the average by a fifth of its excess."""
ERROR_PENALTY = 4.0
"""How much a machine's error rate stretches its load score: one failing every request scores
as loaded as five of itself."""
REPLICA_TIMEOUT_MS = 15_000
"""Snapshots come every few seconds; three missed in a row and the sender is taken for dead.
A replica's clock starts at its first message, so one that routes but never sends a snapshot
is taken for dead this long after it first spoke."""
REMEMBERED_IDS = 65_536
"""Request ids remembered per message kind to recognise a message applied twice."""


def load_score(in_flight: int, latency_ms: float, error_rate: float) -> float:
    """`(in_flight + 1) * latency_ms * (1 + ERROR_PENALTY * error_rate)`, lower is better.

    Roughly how long a new request would take behind the ones already there, stretched by the
    chance of failing. A machine without a latency yet is given the fleet's mean (or 1 ms when
    nothing is known, which leaves the requests in flight to decide)."""
    return (in_flight + 1) * latency_ms * (1.0 + ERROR_PENALTY * error_rate)


def _ewma(average: float | None, sample: float) -> float:
    return sample if average is None else average + EWMA_ALPHA * (sample - average)


@dataclass(slots=True)
class _Averages:
    finished: int = 0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    error_rate: float = 0.0

    def add(self, message: Finished) -> None:
        self.finished += 1
        self.error_rate = _ewma(self.error_rate, 0.0 if message.ok else 1.0)
        if message.ok:
            self.latency_ms = _ewma(self.latency_ms, message.latency_ms)
            if message.ttft_ms is not None:
                self.ttft_ms = _ewma(self.ttft_ms, message.ttft_ms)


@dataclass(slots=True)
class _Instance:
    provider: str = ""
    routed: int = 0
    averages: _Averages = field(default_factory=_Averages)


@dataclass(slots=True, frozen=True)
class _Flight:
    request_id: str
    replica: str
    instance_id: str
    at_ms: int


@dataclass(slots=True)
class _Replica:
    heard_ms: int
    """Local clock at its last snapshot (or at its first message, before any snapshot)."""
    snapshot_at_ms: int | None = None
    flights: dict[str, _Flight] = field(default_factory=dict)
    unnamed: Counter[str] = field(default_factory=Counter)
    """Per machine, requests known only from a snapshot count (their `Routed` was missed)."""


class _RecentIds:
    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        if len(self._ids) > self._bound:
            self._ids.popitem(last=False)


class LoadBook:
    """One replica's copy of the shared load state; `replica` is that replica's own id."""

    def __init__(
        self,
        replica: str,
        *,
        replica_timeout_ms: int = REPLICA_TIMEOUT_MS,
        prefixes: PrefixIndex | None = None,
        remembered_ids: int = REMEMBERED_IDS,
    ) -> None:
        self.replica = replica
        self.replica_timeout_ms = replica_timeout_ms
        self.prefixes = prefixes if prefixes is not None else PrefixIndex()
        self.routed_total = 0
        """Requests seen routed, by any replica: the counter round robin turns on."""
        self._instances: dict[str, _Instance] = {}
        self._providers: dict[str, _Averages] = {}
        self._replicas: dict[str, _Replica] = {replica: _Replica(heard_ms=0)}
        self._flights: dict[str, _Flight] = {}
        self._in_flight: Counter[str] = Counter()
        self._seen_routed = _RecentIds(remembered_ids)
        self._seen_finished = _RecentIds(remembered_ids)

    # -- messages -----------------------------------------------------------------------------

    def apply(self, message: LoadMessage, *, now_ms: int) -> bool:
        """Take in one message from any replica; False when it changed nothing (seen before)."""
        match message:
            case Routed():
                changed = self._apply_routed(message, now_ms)
            case Finished():
                changed = self._apply_finished(message, now_ms)
            case ReplicaLoad():
                changed = self._apply_snapshot(message, now_ms)
        self.prune(now_ms)
        return changed

    def snapshot(self, *, now_ms: int) -> ReplicaLoad:
        """This replica's own `ReplicaLoad`, to publish every few seconds."""
        own = self._replicas[self.replica]
        counts = Counter(flight.instance_id for flight in own.flights.values())
        return ReplicaLoad(
            replica=self.replica,
            at_ms=now_ms,
            in_flight=dict(sorted(counts.items())),
            routed_seen=self.routed_total,
        )

    def prune(self, now_ms: int) -> list[str]:
        """Forget the requests of replicas silent for too long; returns those replicas' ids.
        `apply` calls it; call it on a timer too, for when no message comes at all."""
        dead = [
            name
            for name, replica in self._replicas.items()
            if name != self.replica and now_ms - replica.heard_ms > self.replica_timeout_ms
        ]
        for name in dead:
            replica = self._replicas.pop(name)
            for flight in replica.flights.values():
                del self._flights[flight.request_id]
                self._in_flight[flight.instance_id] -= 1
            self._in_flight.subtract(replica.unnamed)
        if dead:
            self._in_flight = +self._in_flight
        return dead

    def forget(self, instance_id: str) -> None:
        """The machine is gone: drop its numbers, its requests in flight and its prefixes."""
        self._instances.pop(instance_id, None)
        self._in_flight.pop(instance_id, None)
        self.prefixes.forget(instance_id)
        for replica in self._replicas.values():
            replica.unnamed.pop(instance_id, None)
            for flight in [f for f in replica.flights.values() if f.instance_id == instance_id]:
                del replica.flights[flight.request_id]
                del self._flights[flight.request_id]

    # -- reading ------------------------------------------------------------------------------

    def in_flight(self, instance_id: str) -> int:
        return self._in_flight[instance_id]

    def routed(self, instance_id: str) -> int:
        instance = self._instances.get(instance_id)
        return instance.routed if instance is not None else 0

    def latency_ms(self, instance_id: str) -> float | None:
        """The machine's moving average latency; none before its first answer."""
        instance = self._instances.get(instance_id)
        return instance.averages.latency_ms if instance is not None else None

    def fleet_latency_ms(self) -> float:
        """Mean of the known machine latencies; 1 ms when none is known."""
        known = [
            latency
            for instance in self._instances.values()
            if (latency := instance.averages.latency_ms) is not None
        ]
        return sum(known) / len(known) if known else 1.0

    def load_score(self, instance_id: str, *, fleet_latency_ms: float | None = None) -> float:
        """`load_score` of the machine; pass `fleet_latency_ms` when scoring many at once."""
        instance = self._instances.get(instance_id, _Instance())
        latency = instance.averages.latency_ms
        if latency is None:
            latency = fleet_latency_ms if fleet_latency_ms is not None else self.fleet_latency_ms()
        return load_score(self.in_flight(instance_id), latency, instance.averages.error_rate)

    def load_info(self) -> LoadInfo:
        """Every known machine and every provider, by id."""
        fleet = self.fleet_latency_ms()
        rows = [
            InstanceLoad(
                instance_id=instance_id,
                provider=instance.provider,
                in_flight=self.in_flight(instance_id),
                routed=instance.routed,
                finished=instance.averages.finished,
                avg_response_ms=instance.averages.latency_ms,
                ttft_ms=instance.averages.ttft_ms,
                error_rate=instance.averages.error_rate,
                load_score=self.load_score(instance_id, fleet_latency_ms=fleet),
            )
            for instance_id, instance in sorted(self._instances.items())
        ]
        providers = []
        for provider, averages in sorted(self._providers.items()):
            mine = [row for row in rows if row.provider == provider]
            providers.append(
                ProviderLoad(
                    provider=provider,
                    instances=len(mine),
                    in_flight=sum(row.in_flight for row in mine),
                    routed=sum(row.routed for row in mine),
                    finished=averages.finished,
                    avg_response_ms=averages.latency_ms,
                    ttft_ms=averages.ttft_ms,
                    error_rate=averages.error_rate,
                    load_score=sum(row.load_score for row in mine) / len(mine) if mine else 0.0,
                )
            )
        return LoadInfo(instances=rows, providers=providers)

    # -- applying -----------------------------------------------------------------------------

    def _apply_routed(self, message: Routed, now_ms: int) -> bool:
        request_id = message.request_id
        if request_id in self._flights or request_id in self._seen_routed:
            return False
        self._seen_routed.add(request_id)
        self.routed_total += 1
        instance = self._instance(message.instance_id)
        instance.routed += 1
        if message.provider:
            instance.provider = message.provider
            self._providers.setdefault(message.provider, _Averages())
        self.prefixes.insert(message.instance_id, message.prefix_blocks, message.at_ms)
        if request_id in self._seen_finished:
            return True
        flight = _Flight(request_id, message.replica, message.instance_id, message.at_ms)
        self._replica(message.replica, now_ms).flights[request_id] = flight
        self._flights[request_id] = flight
        self._in_flight[message.instance_id] += 1
        return True

    def _apply_finished(self, message: Finished, now_ms: int) -> bool:
        if message.request_id in self._seen_finished:
            return False
        self._seen_finished.add(message.request_id)
        flight = self._flights.pop(message.request_id, None)
        if flight is not None:
            del self._replicas[flight.replica].flights[flight.request_id]
            self._lower(flight.instance_id)
        else:
            # Its `Routed` was missed; a snapshot may have counted it unnamed.
            replica = self._replicas.get(message.replica)
            if replica is not None and replica.unnamed[message.instance_id] > 0:
                replica.unnamed[message.instance_id] -= 1
                self._lower(message.instance_id)
        instance = self._instance(message.instance_id)
        instance.averages.add(message)
        if instance.provider:
            self._providers[instance.provider].add(message)
        return True

    def _apply_snapshot(self, message: ReplicaLoad, now_ms: int) -> bool:
        if message.replica == self.replica:
            return False  # its own state is the truth; its echo is older than that
        replica = self._replica(message.replica, now_ms)
        if replica.snapshot_at_ms is not None and message.at_ms <= replica.snapshot_at_ms:
            return False
        replica.snapshot_at_ms = message.at_ms
        replica.heard_ms = now_ms
        self.routed_total = max(self.routed_total, message.routed_seen)
        before: dict[str, list[_Flight]] = {}
        for flight in replica.flights.values():
            if flight.at_ms <= message.at_ms:
                before.setdefault(flight.instance_id, []).append(flight)
        for instance_id in sorted(set(before) | set(message.in_flight) | set(replica.unnamed)):
            self._instance(instance_id)
            known = sorted(before.get(instance_id, []), key=lambda f: (f.at_ms, f.request_id))
            self._reconcile(replica, instance_id, known, message.in_flight.get(instance_id, 0))
        replica.unnamed = +replica.unnamed
        return True

    def _reconcile(
        self, replica: _Replica, instance_id: str, known: list[_Flight], count: int
    ) -> None:
        """Make the sender's requests on the machine from before its snapshot number `count`."""
        excess = len(known) + replica.unnamed[instance_id] - count
        if excess < 0:
            replica.unnamed[instance_id] -= excess
            self._in_flight[instance_id] -= excess
            return
        unnamed_dropped = min(excess, replica.unnamed[instance_id])
        replica.unnamed[instance_id] -= unnamed_dropped
        self._in_flight[instance_id] -= unnamed_dropped
        # The oldest are the likeliest to have finished unheard.
        for flight in known[: excess - unnamed_dropped]:
            del replica.flights[flight.request_id]
            del self._flights[flight.request_id]
            self._lower(instance_id)

    def _lower(self, instance_id: str) -> None:
        self._in_flight[instance_id] -= 1
        if self._in_flight[instance_id] <= 0:
            del self._in_flight[instance_id]

    def _instance(self, instance_id: str) -> _Instance:
        instance = self._instances.get(instance_id)
        if instance is None:
            instance = self._instances[instance_id] = _Instance()
        return instance

    def _replica(self, name: str, now_ms: int) -> _Replica:
        replica = self._replicas.get(name)
        if replica is None:
            replica = self._replicas[name] = _Replica(heard_ms=now_ms)
        return replica
