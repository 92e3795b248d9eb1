"""Load-balancing strategies: each one's share of requests, and agreement between replicas."""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Sequence

import pytest

from schemas.balancing import Finished, LoadMessage, Routed, Strategy
from schemas.errors import InvalidArgument, Unavailable
from workers.proxy.balancing import (
    WEIGHT_RESOLUTION,
    CacheAware,
    Candidate,
    RoutingRequest,
    choose,
    smooth_schedule,
    weights_of,
)
from workers.proxy.loadbook import LoadBook
from workers.proxy.prefixes import prefix_blocks

T0 = 1_700_000_000_000
FOUR = [Candidate(f"i-{c}", "vast", 1_000_000, 24) for c in "abcd"]


def routed(replica: str, chosen: Candidate, request: RoutingRequest, at_ms: int = T0) -> Routed:
    return Routed(
        replica=replica,
        request_id=request.request_id,
        instance_id=chosen.instance_id,
        at_ms=at_ms,
        prefix_blocks=list(request.prefix_blocks),
        session_key=request.session_key,
        provider=chosen.provider,
    )


def finished(replica: str, request_id: str, instance_id: str, latency_ms: int = 100) -> Finished:
    return Finished(
        replica=replica,
        request_id=request_id,
        instance_id=instance_id,
        at_ms=T0,
        ok=True,
        latency_ms=latency_ms,
        ttft_ms=None,
    )


def pick_and_route(
    strategy: Strategy,
    candidates: Sequence[Candidate],
    book: LoadBook,
    n: int,
    rng: random.Random | None = None,
) -> Counter[str]:
    """`n` requests routed one after another, each `Routed` applied before the next pick."""
    rng = rng or random.Random(0)
    shares: Counter[str] = Counter()
    for k in range(n):
        request = RoutingRequest(request_id=f"{book.replica}-{k}")
        chosen = choose(strategy, candidates, book, request, rng=rng)
        book.apply(routed(book.replica, chosen, request), now_ms=T0)
        shares[chosen.instance_id] += 1
    return shares


def loaded(*in_flight: int) -> LoadBook:
    """A book where `i-a`, `i-b`, ... have these many requests in flight (from replica p-x)."""
    book = LoadBook("p-a")
    for candidate, count in zip(FOUR, in_flight, strict=False):
        for k in range(count):
            request = RoutingRequest(request_id=f"{candidate.instance_id}-load-{k}")
            book.apply(routed("p-x", candidate, request), now_ms=T0)
    return book


# -- round robin and its weighted kinds ---------------------------------------------------------


def test_round_robin_gives_each_of_four_machines_exactly_a_quarter() -> None:
    assert pick_and_route(Strategy.ROUND_ROBIN, FOUR, LoadBook("p-a"), 400) == {
        "i-a": 100,
        "i-b": 100,
        "i-c": 100,
        "i-d": 100,
    }


def test_round_robin_takes_the_machines_in_id_order_whatever_order_they_come_in() -> None:
    book = LoadBook("p-a")
    order = []
    for k in range(8):
        request = RoutingRequest(request_id=f"r{k}")
        chosen = choose(Strategy.ROUND_ROBIN, FOUR[::-1], book, request, rng=random.Random())
        book.apply(routed("p-a", chosen, request), now_ms=T0)
        order.append(chosen.instance_id)
    assert order == ["i-a", "i-b", "i-c", "i-d"] * 2


def test_two_replicas_interleave_on_one_round_robin_rotation() -> None:
    books = [LoadBook("p-a"), LoadBook("p-b")]
    order = []
    for k in range(400):
        book = books[k % 2]
        request = RoutingRequest(request_id=f"r{k}")
        chosen = choose(Strategy.ROUND_ROBIN, FOUR, book, request, rng=random.Random())
        for each in books:
            each.apply(routed(book.replica, chosen, request), now_ms=T0)
        order.append(chosen.instance_id)
    assert order[:6] == ["i-a", "i-b", "i-c", "i-d", "i-a", "i-b"]
    assert Counter(order) == {"i-a": 100, "i-b": 100, "i-c": 100, "i-d": 100}


def test_weighted_round_robin_shares_follow_vram_per_unit_of_price() -> None:
    candidates = [
        Candidate("i-a", "vast", 1_000_000, 10),
        Candidate("i-b", "vast", 1_000_000, 20),
        Candidate("i-c", "vast", 1_000_000, 30),
        Candidate("i-d", "vast", 1_000_000, 40),
    ]
    shares = pick_and_route(Strategy.WEIGHTED_ROUND_ROBIN, candidates, LoadBook("p-a"), 400)
    assert shares == {"i-a": 40, "i-b": 80, "i-c": 120, "i-d": 160}


def test_a_machine_twice_as_expensive_for_the_same_vram_gets_half_the_weight() -> None:
    candidates = [
        Candidate("i-a", "vast", 2_000_000, 48),
        Candidate("i-b", "runpod", 1_000_000, 48),
        Candidate("i-c", "runpod", 500_000, 24),
    ]
    assert weights_of(candidates) == (1, 2, 2)
    shares = pick_and_route(Strategy.WEIGHTED_ROUND_ROBIN, candidates, LoadBook("p-a"), 500)
    assert shares == {"i-a": 100, "i-b": 200, "i-c": 200}


def test_weighted_round_robin_spreads_a_heavy_machine_as_nginx_does() -> None:
    assert smooth_schedule((5, 1, 1)) == (0, 0, 1, 0, 2, 0, 0)


def test_weights_far_apart_are_scaled_so_a_rotation_stays_short() -> None:
    candidates = [
        Candidate("i-free", "own", 0, 80),
        Candidate("i-cheap", "vast", 200_000, 24),
        Candidate("i-dear", "aws", 40_000_000, 16),
    ]
    weights = weights_of(candidates)
    assert weights == (WEIGHT_RESOLUTION, 1, 1)
    assert len(smooth_schedule(weights)) == WEIGHT_RESOLUTION + 2


def test_equal_weighted_gives_each_of_four_machines_exactly_a_quarter() -> None:
    assert pick_and_route(Strategy.EQUAL_WEIGHTED, FOUR, LoadBook("p-a"), 400) == {
        "i-a": 100,
        "i-b": 100,
        "i-c": 100,
        "i-d": 100,
    }


def test_requests_for_another_set_of_machines_do_not_move_an_equal_weighted_rotation() -> None:
    model_x, model_y = FOUR[:2], FOUR[2:]
    book = LoadBook("p-a")
    shares: Counter[str] = Counter()
    for k in range(200):
        # Alternating models: a fleet-wide counter would send every x request to one machine.
        candidates = model_x if k % 2 == 0 else model_y
        request = RoutingRequest(request_id=f"r{k}")
        chosen = choose(Strategy.EQUAL_WEIGHTED, candidates, book, request, rng=random.Random())
        book.apply(routed("p-a", chosen, request), now_ms=T0)
        shares[chosen.instance_id] += 1
    assert shares == {"i-a": 50, "i-b": 50, "i-c": 50, "i-d": 50}


# -- load-driven strategies ---------------------------------------------------------------------


def test_least_connections_keeps_in_flight_counts_within_one_under_steady_load() -> None:
    rng = random.Random(7)
    book = LoadBook("p-a")
    running: list[tuple[str, str]] = []
    for k in range(1_000):
        if len(running) >= 40:
            request_id, instance_id = running.pop(rng.randrange(len(running)))
            book.apply(finished("p-a", request_id, instance_id), now_ms=T0)
        request = RoutingRequest(request_id=f"r{k}")
        chosen = choose(Strategy.LEAST_CONNECTIONS, FOUR, book, request, rng=rng)
        book.apply(routed("p-a", chosen, request), now_ms=T0)
        running.append((request.request_id, chosen.instance_id))
        counts = [book.in_flight(c.instance_id) for c in FOUR]
        assert max(counts) - min(counts) <= 1, counts


def test_least_connections_counts_the_requests_of_every_replica_and_breaks_ties_by_id() -> None:
    book = loaded(3, 1, 1, 2)
    chosen = choose(
        Strategy.LEAST_CONNECTIONS, FOUR, book, RoutingRequest("r"), rng=random.Random()
    )
    assert chosen.instance_id == "i-b"


def test_least_response_time_prefers_the_lowest_moving_average() -> None:
    book = LoadBook("p-a")
    for k, (instance_id, latency) in enumerate([("i-a", 300), ("i-b", 120), ("i-c", 200)]):
        book.apply(finished("p-x", f"r{k}", instance_id, latency_ms=latency), now_ms=T0)
    three = FOUR[:3]
    chosen = choose(
        Strategy.LEAST_RESPONSE_TIME, three, book, RoutingRequest("r"), rng=random.Random()
    )
    assert chosen.instance_id == "i-b"


def test_least_response_time_tries_a_machine_it_knows_nothing_of_once() -> None:
    book = LoadBook("p-a")
    for k, (instance_id, latency) in enumerate([("i-a", 300), ("i-b", 120), ("i-c", 200)]):
        book.apply(finished("p-x", f"r{k}", instance_id, latency_ms=latency), now_ms=T0)
    first = RoutingRequest("first")
    chosen = choose(Strategy.LEAST_RESPONSE_TIME, FOUR, book, first, rng=random.Random())
    assert chosen.instance_id == "i-d"
    book.apply(routed("p-a", chosen, first), now_ms=T0)
    # Learning is under way: until it answers, i-d ranks at the fleet's mean (206 ms).
    chosen = choose(
        Strategy.LEAST_RESPONSE_TIME, FOUR, book, RoutingRequest("r"), rng=random.Random()
    )
    assert chosen.instance_id == "i-b"


def test_random_spreads_evenly_and_repeats_with_the_same_seed() -> None:
    def draws(seed: int) -> list[str]:
        rng = random.Random(seed)
        book = LoadBook("p-a")
        return [
            choose(Strategy.RANDOM, FOUR, book, RoutingRequest(f"r{k}"), rng=rng).instance_id
            for k in range(4_000)
        ]

    first = draws(11)
    assert first == draws(11)
    assert first != draws(12)
    for instance_id, count in Counter(first).items():
        assert 900 <= count <= 1_100, instance_id


def test_power_of_two_never_picks_the_busiest_of_four_machines() -> None:
    book = loaded(0, 1, 2, 9)
    rng = random.Random(3)
    picks = Counter(
        choose(Strategy.POWER_OF_TWO, FOUR, book, RoutingRequest(f"r{k}"), rng=rng).instance_id
        for k in range(400)
    )
    assert "i-d" not in picks
    assert picks["i-a"] > picks["i-b"] > picks["i-c"] > 0


def test_power_of_two_spreads_a_steady_load_over_four_machines() -> None:
    rng = random.Random(5)
    book = LoadBook("p-a")
    running: deque[tuple[str, str]] = deque()
    shares: Counter[str] = Counter()
    for k in range(2_000):
        if len(running) >= 20:
            request_id, instance_id = running.popleft()
            book.apply(finished("p-a", request_id, instance_id), now_ms=T0)
        request = RoutingRequest(request_id=f"r{k}")
        chosen = choose(Strategy.POWER_OF_TWO, FOUR, book, request, rng=rng)
        book.apply(routed("p-a", chosen, request), now_ms=T0)
        running.append((request.request_id, chosen.instance_id))
        shares[chosen.instance_id] += 1
    for instance_id, count in shares.items():
        assert 400 <= count <= 600, instance_id


def test_power_of_two_with_one_machine_picks_it() -> None:
    chosen = choose(
        Strategy.POWER_OF_TWO, FOUR[:1], LoadBook("p-a"), RoutingRequest("r"), rng=random.Random()
    )
    assert chosen == FOUR[0]


def test_least_cost_picks_the_cheapest_and_breaks_price_ties_by_load() -> None:
    candidates = [
        Candidate("i-a", "vast", 900_000, 24),
        Candidate("i-b", "vast", 400_000, 24),
        Candidate("i-c", "runpod", 400_000, 24),
        Candidate("i-d", "aws", 3_000_000, 80),
    ]
    book = loaded(0, 2, 1, 0)
    chosen = choose(Strategy.LEAST_COST, candidates, book, RoutingRequest("r"), rng=random.Random())
    assert chosen.instance_id == "i-c"


# -- session affinity ---------------------------------------------------------------------------


def owners(candidates: Sequence[Candidate], keys: Sequence[str]) -> dict[str, str]:
    book = LoadBook("p-a")
    return {
        key: choose(
            Strategy.SESSION_AFFINITY,
            candidates,
            book,
            RoutingRequest(f"r-{key}", session_key=key),
            rng=random.Random(),
        ).instance_id
        for key in keys
    }


def test_session_affinity_spreads_sessions_over_the_machines() -> None:
    shares = Counter(owners(FOUR, [f"s{k}" for k in range(4_000)]).values())
    for instance_id, count in shares.items():
        assert 850 <= count <= 1_150, instance_id


def test_adding_a_machine_moves_only_the_sessions_it_takes() -> None:
    keys = [f"s{k}" for k in range(4_000)]
    before = owners(FOUR, keys)
    after = owners([*FOUR, Candidate("i-e", "vast", 1_000_000, 24)], keys)
    moved = [key for key in keys if after[key] != before[key]]
    assert {after[key] for key in moved} == {"i-e"}
    assert 0.15 <= len(moved) / len(keys) <= 0.25


def test_removing_a_machine_moves_only_its_own_sessions() -> None:
    keys = [f"s{k}" for k in range(4_000)]
    before = owners(FOUR, keys)
    after = owners([c for c in FOUR if c.instance_id != "i-b"], keys)
    for key in keys:
        if before[key] != "i-b":
            assert after[key] == before[key]
    assert {after[key] for key in keys if before[key] == "i-b"} == {"i-a", "i-c", "i-d"}


def test_a_request_without_a_session_sticks_by_its_user_key() -> None:
    book = LoadBook("p-a")
    picks = {
        choose(
            Strategy.SESSION_AFFINITY,
            FOUR,
            book,
            RoutingRequest(f"r{k}", user_key="key-42"),
            rng=random.Random(),
        ).instance_id
        for k in range(20)
    }
    assert len(picks) == 1


def test_a_request_with_neither_session_nor_user_goes_to_the_least_loaded() -> None:
    chosen = choose(
        Strategy.SESSION_AFFINITY,
        FOUR,
        loaded(2, 2, 0, 1),
        RoutingRequest("r"),
        rng=random.Random(),
    )
    assert chosen.instance_id == "i-c"


# -- cache aware --------------------------------------------------------------------------------

SYSTEM = "You are a meticulous assistant for a travel agency. Be precise and brief. " * 8


def conversation(turns: int) -> str:
    text = SYSTEM
    for turn in range(turns):
        text += f"\nUser: tell me about city number {turn} please.\nAssistant: city {turn} is "
        text += "a fine place with a river, a market and a museum. " * 2
    return text


def test_cache_aware_follows_the_longest_cached_prefix_when_load_is_balanced() -> None:
    book = loaded(2, 4, 3, 3)
    earlier = RoutingRequest("r-1", prefix_blocks=prefix_blocks(conversation(2)))
    book.apply(routed("p-x", FOUR[1], earlier), now_ms=T0)
    request = RoutingRequest("r-2", prefix_blocks=prefix_blocks(conversation(3)))
    chosen = choose(Strategy.CACHE_AWARE, FOUR, book, request, rng=random.Random())
    assert chosen.instance_id == "i-b"


def test_cache_aware_falls_back_to_the_least_loaded_when_load_is_imbalanced() -> None:
    book = loaded(1, 8, 2, 3)  # 8 - 1 > 4 and 8 > 1.5 * 1
    earlier = RoutingRequest("r-1", prefix_blocks=prefix_blocks(conversation(2)))
    book.apply(routed("p-x", FOUR[1], earlier), now_ms=T0)
    request = RoutingRequest("r-2", prefix_blocks=prefix_blocks(conversation(3)))
    chosen = choose(Strategy.CACHE_AWARE, FOUR, book, request, rng=random.Random())
    assert chosen.instance_id == "i-a"


def test_cache_aware_needs_both_the_absolute_and_the_relative_gap_to_call_load_imbalanced() -> None:
    policy = CacheAware()
    assert policy.imbalanced([1, 8])
    assert not policy.imbalanced([2, 6])  # gap 4: not over 4
    assert not policy.imbalanced([20, 26])  # gap 6 but 26 < 1.5 * 20
    assert policy.imbalanced([0, 5])
    sglang = CacheAware(imbalance_abs=64)
    assert not sglang.imbalanced([10, 70])  # gap 60: not over 64
    assert sglang.imbalanced([0, 65])


def test_cache_aware_sends_a_prompt_matched_below_the_ratio_to_the_least_loaded() -> None:
    book = loaded(2, 4, 1, 3)
    shared = SYSTEM[:128]  # two of the new prompt's blocks
    earlier = RoutingRequest("r-1", prefix_blocks=prefix_blocks(shared + "x" * 640))
    book.apply(routed("p-x", FOUR[1], earlier), now_ms=T0)
    request = RoutingRequest("r-2", prefix_blocks=prefix_blocks(shared + "y" * 640))
    chosen = choose(Strategy.CACHE_AWARE, FOUR, book, request, rng=random.Random())
    assert chosen.instance_id == "i-c"
    lenient = CacheAware(match_ratio=0.1)
    chosen = choose(
        Strategy.CACHE_AWARE, FOUR, book, request, rng=random.Random(), cache_aware=lenient
    )
    assert chosen.instance_id == "i-b"


def test_cache_aware_thresholds_are_the_callers_to_set() -> None:
    book = loaded(10, 40, 20, 30)
    earlier = RoutingRequest("r-1", prefix_blocks=prefix_blocks(conversation(2)))
    book.apply(routed("p-x", FOUR[1], earlier), now_ms=T0)
    request = RoutingRequest("r-2", prefix_blocks=prefix_blocks(conversation(3)))
    strict = CacheAware(imbalance_abs=20, imbalance_rel=1.2)
    chosen = choose(
        Strategy.CACHE_AWARE, FOUR, book, request, rng=random.Random(), cache_aware=strict
    )
    assert chosen.instance_id == "i-a"


class TwoReplicas:
    """Two proxy replicas on one bus: each applies its own messages at once and hears every
    message (its own echo included) later, one publisher's messages in order but the
    publishers interleaved at random, so the two books see different orders."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.books = {name: LoadBook(name) for name in ("p-a", "p-b")}
        self.unheard: dict[str, dict[str, deque[LoadMessage]]] = {
            listener: {publisher: deque() for publisher in self.books} for listener in self.books
        }

    def publish(self, message: LoadMessage) -> None:
        self.books[message.replica].apply(message, now_ms=T0)
        for listener in self.books:
            self.unheard[listener][message.replica].append(message)

    def hear_some(self, until: LoadMessage | None = None) -> None:
        """Deliver a random part of what is in transit; all of it up to `until` for sure."""
        for listener, queues in self.unheard.items():
            pending = [m for queue in queues.values() for m in queue]
            stop = until is not None and until in pending
            while any(queues.values()):
                if not stop and self.rng.random() < 0.3:
                    break
                publisher = self.rng.choice([p for p, queue in queues.items() if queue])
                message = queues[publisher].popleft()
                self.books[listener].apply(message, now_ms=T0)
                if message is until:
                    stop = False

    def hear_all(self) -> None:
        for listener, queues in self.unheard.items():
            while any(queues.values()):
                publisher = self.rng.choice([p for p, queue in queues.items() if queue])
                self.books[listener].apply(queues[publisher].popleft(), now_ms=T0)


@pytest.mark.parametrize("strategy", [Strategy.SESSION_AFFINITY, Strategy.CACHE_AWARE])
def test_a_conversation_stays_on_one_machine_whichever_replica_routes_it(
    strategy: Strategy,
) -> None:
    rng = random.Random(21)
    bus = TwoReplicas(rng)
    running: list[Routed] = []
    conversation_machines = []
    last_turn: Routed | None = None
    for step in range(600):
        replica = rng.choice(["p-a", "p-b"])
        if step % 50 == 0:
            # A new turn comes seconds after the last answer: the turn before has been heard.
            bus.hear_some(until=last_turn)
            request = RoutingRequest(
                f"turn-{step}",
                session_key="conv-1",
                prefix_blocks=prefix_blocks(conversation(step // 50)),
            )
        else:
            request = RoutingRequest(
                f"bg-{step}",
                session_key=f"other-{step}",
                prefix_blocks=prefix_blocks(f"unrelated question {step} " * rng.randint(1, 30)),
            )
        chosen = choose(strategy, FOUR, bus.books[replica], request, rng=rng)
        message = routed(replica, chosen, request)
        bus.publish(message)
        if step % 50 == 0:
            conversation_machines.append(chosen.instance_id)
            last_turn = message
        running.append(message)
        if len(running) > 12:
            done = running.pop(rng.randrange(len(running)))
            bus.publish(finished(done.replica, done.request_id, done.instance_id))
        bus.hear_some()
    assert len(conversation_machines) == 12
    assert len(set(conversation_machines)) == 1
    bus.hear_all()
    book_a, book_b = bus.books.values()
    assert book_a.routed_total == book_b.routed_total == 600
    assert [book_a.in_flight(c.instance_id) for c in FOUR] == [
        book_b.in_flight(c.instance_id) for c in FOUR
    ]
    blocks = prefix_blocks(conversation(11))
    assert book_a.prefixes.match(blocks) == book_b.prefixes.match(blocks)


# -- errors -------------------------------------------------------------------------------------


def test_a_strategy_may_be_named_by_its_plain_string() -> None:
    chosen = choose(
        "least_connections", FOUR, loaded(1, 0), RoutingRequest("r"), rng=random.Random()
    )
    assert chosen.instance_id == "i-b"


def test_an_unknown_strategy_is_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match="fastest_please") as caught:
        choose("fastest_please", FOUR, LoadBook("p-a"), RoutingRequest("r"), rng=random.Random())
    assert caught.value.field == "strategy"
    assert "least_connections" in caught.value.message


def test_no_candidate_is_unavailable() -> None:
    with pytest.raises(Unavailable):
        choose(Strategy.ROUND_ROBIN, [], LoadBook("p-a"), RoutingRequest("r"), rng=random.Random())
