"""Picking the machine for one inference request: the load-balancing strategies.

`choose` reads the shared `LoadBook` and never changes it: the replica publishes a `Routed`
message for its pick, and every replica (itself included) applies it. Given the same book and
the same inputs every strategy picks the same machine, except `random` and `power_of_two`,
which draw from the `random.Random` they are given. Candidates are taken in the order of their
ids, whatever order they come in.

- `round_robin`: the sorted candidates in turn, on the book's count of requests routed by any
  replica, so replicas interleave: one fleet-wide rotation. Every routed request turns it,
  whatever candidates it had, so shares are exact only while all requests share one set.
- `weighted_round_robin`: smooth weighted round robin (nginx's) on that count; the weight of a
  machine is its VRAM per unit of price (`weight_of`).
- `equal_weighted`: the same share for each candidate, counted per candidate set: the turn is
  the number of requests routed to members of this set (by any replica), the order a shuffle
  fixed by the set. Unlike `round_robin`, requests for other sets (another model) do not move
  this set's rotation, and two sets do not all start on the same lowest id.
- `least_connections`: fewest requests in flight across all replicas, ties by id.
- `least_response_time`: lowest moving average latency; a machine with none yet goes first, to
  learn it, but only while it has nothing in flight (then it ranks at the fleet's mean until
  its first answer), so a slow newcomer is not flooded.
- `random`: uniform draw.
- `power_of_two`: two distinct random candidates, the lower load score of the two.
- `least_cost`: lowest price per hour, ties by load score.
- `session_affinity`: rendezvous hashing of the session key (the user key when the request has
  no session; the least loaded when it has neither). Adding or removing a candidate moves only
  the sessions that candidate wins or held.
- `cache_aware`: SGLang's router, see `CacheAware`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.balancing import Strategy, strategy_named
from schemas.errors import Unavailable
from workers.proxy.loadbook import LoadBook

WEIGHT_RESOLUTION = 100
"""The heaviest machine's weight after scaling: shares are kept to 1 % of it, and a weighted
rotation is at most 100 picks per candidate long."""
_PERSON = b"gpuproxy-route"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A machine that can serve the request."""

    instance_id: str
    provider: str
    price_per_hour_micros: int
    vram_gb: int


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    request_id: str
    session_key: str = ""
    user_key: str = ""
    """Who sends it (user or API key id): the affinity key of a request without a session."""
    prefix_blocks: Sequence[int] = ()
    """`workers.proxy.prefixes.prefix_blocks` of its prompt."""


@dataclass(frozen=True, slots=True)
class CacheAware:
    """Cache-aware routing as SGLang's router does it, with our own imbalance threshold.

    When the load is imbalanced (the busiest candidate has more than `imbalance_abs` requests
    in flight over the idlest AND more than `imbalance_rel` times as many), the least loaded
    wins. Otherwise the candidate holding the longest run of the prompt's leading blocks wins
    if that run is at least `match_ratio` of the prompt's blocks, and the least loaded if not;
    the `Routed` message of either pick teaches the prefix index for the next request."""

    match_ratio: float = 0.3
    imbalance_abs: int = 4
    """SGLang's 64 never fired in `just bench` I2 (16 conversations over 4 machines that run 4
    at once): with a system prompt shared by all, every request matched the one machine that
    saw it first and queued there (p99 2.3x round robin's). At 4 the load spreads and the
    prefix follows it; with prompts of their own, cache_aware's first token came 0.53-0.58x
    round robin's at p50."""
    imbalance_rel: float = 1.5

    def imbalanced(self, loads: Sequence[int]) -> bool:
        busiest, idlest = max(loads), min(loads)
        return busiest - idlest > self.imbalance_abs and busiest > self.imbalance_rel * idlest

    def pick(
        self, candidates: Sequence[Candidate], book: LoadBook, request: RoutingRequest
    ) -> Candidate:
        least = _least_connections(candidates, book)
        blocks = request.prefix_blocks
        if not blocks or self.imbalanced([book.in_flight(c.instance_id) for c in candidates]):
            return least
        matched = book.prefixes.match(blocks)
        best = min(
            candidates,
            key=lambda c: (
                -matched.get(c.instance_id, 0),
                book.in_flight(c.instance_id),
                c.instance_id,
            ),
        )
        if matched.get(best.instance_id, 0) / len(blocks) >= self.match_ratio:
            return best
        return least


def choose(
    strategy: Strategy | str,
    candidates: Sequence[Candidate],
    book: LoadBook,
    request: RoutingRequest,
    *,
    rng: random.Random,
    cache_aware: CacheAware = CacheAware(),  # frozen: one shared default is safe
) -> Candidate:
    """The machine to send `request` to. Raises `InvalidArgument` (field `strategy`) for a
    strategy it does not know and `Unavailable` when there is no candidate."""
    known = strategy if isinstance(strategy, Strategy) else strategy_named(strategy)
    if not candidates:
        raise Unavailable("no machine can serve this request")
    ordered = sorted(candidates, key=lambda c: c.instance_id)
    match known:
        case Strategy.ROUND_ROBIN:
            return ordered[book.routed_total % len(ordered)]
        case Strategy.WEIGHTED_ROUND_ROBIN:
            schedule = smooth_schedule(weights_of(ordered))
            return ordered[schedule[book.routed_total % len(schedule)]]
        case Strategy.EQUAL_WEIGHTED:
            return _equal_weighted(ordered, book)
        case Strategy.LEAST_CONNECTIONS:
            return _least_connections(ordered, book)
        case Strategy.LEAST_RESPONSE_TIME:
            return _least_response_time(ordered, book)
        case Strategy.RANDOM:
            return rng.choice(ordered)
        case Strategy.POWER_OF_TWO:
            return _less_loaded(rng.sample(ordered, 2) if len(ordered) > 1 else ordered, book)
        case Strategy.LEAST_COST:
            fleet = book.fleet_latency_ms()
            return min(
                ordered,
                key=lambda c: (
                    c.price_per_hour_micros,
                    book.load_score(c.instance_id, fleet_latency_ms=fleet),
                ),
            )
        case Strategy.SESSION_AFFINITY:
            key = request.session_key or request.user_key
            if not key:
                return _least_connections(ordered, book)
            return max(ordered, key=lambda c: rendezvous_weight(key, c.instance_id))
        case Strategy.CACHE_AWARE:
            return cache_aware.pick(ordered, book, request)


def weight_of(candidate: Candidate) -> int:
    """GB of VRAM per unit (1,000,000 micros) of hourly price, at least 1; a free machine is
    priced at one micro."""
    per_unit = candidate.vram_gb * 1_000_000 // max(candidate.price_per_hour_micros, 1)
    return max(1, per_unit)


def weights_of(candidates: Sequence[Candidate]) -> tuple[int, ...]:
    """Candidate weights scaled to at most `WEIGHT_RESOLUTION` and reduced by their common
    divisor, so the rotation stays short."""
    weights = [weight_of(c) for c in candidates]
    heaviest = max(weights)
    if heaviest > WEIGHT_RESOLUTION:
        weights = [max(1, w * WEIGHT_RESOLUTION // heaviest) for w in weights]
    divisor = math.gcd(*weights)
    return tuple(w // divisor for w in weights)


@functools.lru_cache(maxsize=256)
def smooth_schedule(weights: tuple[int, ...]) -> tuple[int, ...]:
    """One full turn of nginx's smooth weighted round robin: candidate indexes, `sum(weights)`
    long, each index as often as its weight and spread out (5, 1, 1 -> a a b a c a a)."""
    total = sum(weights)
    current = [0] * len(weights)
    turn = []
    for _ in range(total):
        for index, weight in enumerate(weights):
            current[index] += weight
        best = max(range(len(weights)), key=lambda i: (current[i], -i))
        current[best] -= total
        turn.append(best)
    return tuple(turn)


def rendezvous_weight(key: str, instance_id: str) -> int:
    """Highest-random-weight hashing: the candidate with the highest weight for a key wins."""
    data = key.encode("utf-8", "surrogatepass") + b"\x00" + instance_id.encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=_PERSON).digest(), "big")


def _least_connections(candidates: Sequence[Candidate], book: LoadBook) -> Candidate:
    return min(candidates, key=lambda c: (book.in_flight(c.instance_id), c.instance_id))


def _least_response_time(candidates: Sequence[Candidate], book: LoadBook) -> Candidate:
    fleet = book.fleet_latency_ms()

    def rank(candidate: Candidate) -> tuple[float, int, str]:
        in_flight = book.in_flight(candidate.instance_id)
        latency = book.latency_ms(candidate.instance_id)
        if latency is None:
            latency = 0.0 if in_flight == 0 else fleet
        return latency, in_flight, candidate.instance_id

    return min(candidates, key=rank)


def _less_loaded(candidates: Sequence[Candidate], book: LoadBook) -> Candidate:
    fleet = book.fleet_latency_ms()
    return min(
        candidates,
        key=lambda c: (
            book.load_score(c.instance_id, fleet_latency_ms=fleet),
            book.in_flight(c.instance_id),
            c.instance_id,
        ),
    )


def _equal_weighted(ordered: Sequence[Candidate], book: LoadBook) -> Candidate:
    members = hashlib.blake2b("\n".join(c.instance_id for c in ordered).encode()).hexdigest()
    shuffled = sorted(ordered, key=lambda c: rendezvous_weight(members, c.instance_id))
    turn = sum(book.routed(c.instance_id) for c in ordered)
    return shuffled[turn % len(shuffled)]
