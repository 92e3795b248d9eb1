"""The load book every proxy replica keeps from the messages all replicas publish."""

from __future__ import annotations

import msgspec
import pytest

from schemas.balancing import Finished, LoadMessage, ReplicaLoad, Routed
from workers.proxy.loadbook import ERROR_PENALTY, EWMA_ALPHA, LoadBook, load_score
from workers.proxy.prefixes import prefix_blocks

T0 = 1_700_000_000_000


def routed(
    replica: str, request_id: str, instance_id: str, at_ms: int = T0, provider: str = "vast"
) -> Routed:
    return Routed(
        replica=replica,
        request_id=request_id,
        instance_id=instance_id,
        at_ms=at_ms,
        prefix_blocks=prefix_blocks(f"prompt of {request_id}"),
        provider=provider,
    )


def finished(
    replica: str,
    request_id: str,
    instance_id: str,
    *,
    ok: bool = True,
    latency_ms: int = 100,
    ttft_ms: int | None = None,
    at_ms: int = T0,
) -> Finished:
    return Finished(
        replica=replica,
        request_id=request_id,
        instance_id=instance_id,
        at_ms=at_ms,
        ok=ok,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
    )


def snapshot(replica: str, at_ms: int, routed_seen: int = 0, **in_flight: int) -> ReplicaLoad:
    return ReplicaLoad(replica=replica, at_ms=at_ms, in_flight=in_flight, routed_seen=routed_seen)


def state(book: LoadBook) -> tuple[object, ...]:
    return (book.load_info(), book.routed_total, book.snapshot(now_ms=T0), len(book.prefixes))


STREAM: list[LoadMessage] = [
    routed("p-a", "r1", "i1"),
    routed("p-b", "r2", "i2"),
    snapshot("p-b", T0 + 1, i2=1),
    routed("p-a", "r3", "i1", at_ms=T0 + 2),
    finished("p-a", "r1", "i1", latency_ms=300, ttft_ms=40),
    finished("p-b", "r2", "i2", ok=False, latency_ms=5),
    snapshot("p-b", T0 + 3),
]


@pytest.mark.parametrize("message", STREAM, ids=lambda m: type(m).__name__)
def test_every_load_message_survives_a_round_trip_through_the_union(
    message: LoadMessage,
) -> None:
    for encode, decode in (
        (msgspec.msgpack.encode, msgspec.msgpack.decode),
        (msgspec.json.encode, msgspec.json.decode),
    ):
        assert decode(encode(message), type=LoadMessage) == message


def test_a_load_message_names_its_kind_in_the_type_field() -> None:
    kinds = [msgspec.json.decode(msgspec.json.encode(m))["type"] for m in STREAM[:3]]
    assert kinds == ["routed", "routed", "replica_load"]


def test_a_routed_request_is_in_flight_until_it_finishes() -> None:
    book = LoadBook("p-a")
    book.apply(routed("p-a", "r1", "i1"), now_ms=T0)
    book.apply(routed("p-b", "r2", "i1"), now_ms=T0)
    assert book.in_flight("i1") == 2
    book.apply(finished("p-b", "r2", "i1"), now_ms=T0)
    assert book.in_flight("i1") == 1
    assert book.routed("i1") == 2
    assert book.routed_total == 2


def test_every_message_applied_twice_changes_nothing() -> None:
    once, twice = LoadBook("p-a"), LoadBook("p-a")
    for message in STREAM:
        assert once.apply(message, now_ms=T0 + 5)
        assert twice.apply(message, now_ms=T0 + 5)
        assert not twice.apply(message, now_ms=T0 + 5)
    for message in STREAM:
        assert not twice.apply(message, now_ms=T0 + 5)
    assert state(twice) == state(once)


def test_a_replicas_own_echo_does_not_count_its_request_twice() -> None:
    book = LoadBook("p-a")
    mine = routed("p-a", "r1", "i1")
    book.apply(mine, now_ms=T0)
    book.apply(msgspec.msgpack.decode(msgspec.msgpack.encode(mine), type=LoadMessage), now_ms=T0)
    assert book.in_flight("i1") == 1
    assert book.routed_total == 1


def test_a_finish_heard_before_its_route_leaves_nothing_in_flight() -> None:
    book = LoadBook("p-a")
    book.apply(finished("p-b", "r1", "i1", latency_ms=80), now_ms=T0)
    book.apply(routed("p-b", "r1", "i1"), now_ms=T0)
    assert book.in_flight("i1") == 0
    assert book.routed("i1") == 1
    assert book.latency_ms("i1") == 80


def test_a_replica_whose_snapshots_stop_has_its_requests_dropped() -> None:
    book = LoadBook("p-a", replica_timeout_ms=15_000)
    book.apply(routed("p-b", "r1", "i1"), now_ms=T0)
    book.apply(routed("p-c", "r2", "i1"), now_ms=T0)
    book.apply(snapshot("p-c", T0 + 10_000, i1=1), now_ms=T0 + 10_000)
    assert book.prune(T0 + 15_000) == []
    assert book.in_flight("i1") == 2
    assert book.prune(T0 + 15_001) == ["p-b"]
    assert book.in_flight("i1") == 1
    assert book.prune(T0 + 25_001) == ["p-c"]
    assert book.in_flight("i1") == 0


def test_the_dead_replicas_late_finish_still_teaches_the_averages() -> None:
    book = LoadBook("p-a", replica_timeout_ms=1_000)
    book.apply(routed("p-b", "r1", "i1"), now_ms=T0)
    book.prune(T0 + 2_000)
    book.apply(finished("p-b", "r1", "i1", latency_ms=250), now_ms=T0 + 2_000)
    assert book.in_flight("i1") == 0
    assert book.latency_ms("i1") == 250


def test_the_books_own_requests_never_expire() -> None:
    book = LoadBook("p-a", replica_timeout_ms=1_000)
    book.apply(routed("p-a", "r1", "i1"), now_ms=T0)
    assert book.prune(T0 + 3_600_000) == []
    assert book.in_flight("i1") == 1


def test_a_snapshot_counts_requests_whose_route_was_missed() -> None:
    book = LoadBook("p-a")
    book.apply(routed("p-b", "r1", "i1"), now_ms=T0)
    book.apply(snapshot("p-b", T0 + 5, i1=3, i2=1), now_ms=T0 + 5)
    assert (book.in_flight("i1"), book.in_flight("i2")) == (3, 1)
    # A missed request finishes: its unnamed place is freed.
    book.apply(finished("p-b", "r-missed", "i1"), now_ms=T0 + 6)
    assert book.in_flight("i1") == 2


def test_a_snapshot_drops_the_oldest_requests_whose_finish_was_missed() -> None:
    book = LoadBook("p-a")
    for n in range(3):
        book.apply(routed("p-b", f"r{n}", "i1", at_ms=T0 + n), now_ms=T0)
    book.apply(snapshot("p-b", T0 + 10, i1=1), now_ms=T0 + 10)
    assert book.in_flight("i1") == 1
    # r2, the newest, is the one kept: its finish lowers the count to zero.
    book.apply(finished("p-b", "r2", "i1"), now_ms=T0 + 11)
    assert book.in_flight("i1") == 0


def test_a_snapshot_leaves_requests_routed_after_it_alone() -> None:
    book = LoadBook("p-a")
    book.apply(routed("p-b", "r1", "i1", at_ms=T0 + 20), now_ms=T0)
    book.apply(snapshot("p-b", T0 + 10), now_ms=T0 + 10)
    assert book.in_flight("i1") == 1


def test_a_replica_ignores_the_echo_of_its_own_snapshot() -> None:
    book = LoadBook("p-a")
    book.apply(routed("p-a", "r1", "i1"), now_ms=T0)
    echo = book.snapshot(now_ms=T0)
    book.apply(routed("p-a", "r2", "i1", at_ms=T0), now_ms=T0)
    assert not book.apply(echo, now_ms=T0 + 1)
    assert book.in_flight("i1") == 2


def test_an_older_snapshot_than_the_last_applied_is_ignored() -> None:
    book = LoadBook("p-a")
    book.apply(snapshot("p-b", T0 + 10, i1=2), now_ms=T0 + 10)
    assert not book.apply(snapshot("p-b", T0 + 5, i1=7), now_ms=T0 + 11)
    assert book.in_flight("i1") == 2


def test_a_replica_that_started_late_takes_the_round_robin_counter_from_a_snapshot() -> None:
    book = LoadBook("p-new")
    book.apply(snapshot("p-old", T0, routed_seen=41), now_ms=T0)
    assert book.routed_total == 41
    book.apply(routed("p-old", "r1", "i1"), now_ms=T0)
    assert book.routed_total == 42


def test_the_own_snapshot_counts_the_replicas_own_requests_by_machine() -> None:
    book = LoadBook("p-a")
    book.apply(routed("p-a", "r1", "i2"), now_ms=T0)
    book.apply(routed("p-a", "r2", "i1"), now_ms=T0)
    book.apply(routed("p-a", "r3", "i1"), now_ms=T0)
    book.apply(routed("p-b", "r4", "i1"), now_ms=T0)
    assert book.snapshot(now_ms=T0 + 1) == ReplicaLoad(
        replica="p-a", at_ms=T0 + 1, in_flight={"i1": 2, "i2": 1}, routed_seen=4
    )


def test_latency_and_time_to_first_token_are_moving_averages() -> None:
    book = LoadBook("p-a")
    for n, (latency, ttft) in enumerate([(100, 10), (200, None), (50, 30)]):
        book.apply(routed("p-b", f"r{n}", "i1"), now_ms=T0)
        book.apply(finished("p-b", f"r{n}", "i1", latency_ms=latency, ttft_ms=ttft), now_ms=T0)
    (row,) = book.load_info().instances
    # The first sample starts the average; each later one moves it by EWMA_ALPHA of the gap.
    after_two = 100 + EWMA_ALPHA * (200 - 100)
    assert row.avg_response_ms == pytest.approx(after_two + EWMA_ALPHA * (50 - after_two))
    assert row.avg_response_ms == pytest.approx(106.0)
    assert row.ttft_ms == pytest.approx(10 + EWMA_ALPHA * (30 - 10))
    assert row.finished == 3
    assert row.error_rate == 0.0


def test_a_failure_raises_the_error_rate_but_not_the_latency() -> None:
    book = LoadBook("p-a")
    outcomes = [(True, 400), (False, 2), (False, 3), (True, 400)]
    for n, (ok, latency) in enumerate(outcomes):
        book.apply(finished("p-b", f"r{n}", "i1", ok=ok, latency_ms=latency), now_ms=T0)
    (row,) = book.load_info().instances
    assert row.avg_response_ms == 400
    # 0 -> 0 -> 0.2 -> 0.36 -> 0.288
    assert row.error_rate == pytest.approx(0.288)


def test_the_load_score_is_in_flight_plus_one_times_latency_stretched_by_errors() -> None:
    assert load_score(3, 100.0, 0.0) == 400.0
    assert load_score(0, 100.0, 0.5) == 100.0 * (1 + ERROR_PENALTY * 0.5)
    book = LoadBook("p-a")
    book.apply(finished("p-b", "r0", "i1", latency_ms=100), now_ms=T0)
    book.apply(finished("p-b", "r1", "i2", latency_ms=300), now_ms=T0)
    book.apply(routed("p-b", "r2", "i3"), now_ms=T0)
    book.apply(routed("p-b", "r3", "i3"), now_ms=T0)
    scores = {row.instance_id: row.load_score for row in book.load_info().instances}
    # i3 has no latency yet: it is scored at the fleet's mean, 200 ms.
    assert scores == {"i1": 100.0, "i2": 300.0, "i3": 600.0}


def test_providers_aggregate_their_machines() -> None:
    book = LoadBook("p-a")
    book.apply(routed("p-b", "r1", "i1", provider="vast"), now_ms=T0)
    book.apply(routed("p-b", "r2", "i2", provider="vast"), now_ms=T0)
    book.apply(routed("p-b", "r3", "i3", provider="runpod"), now_ms=T0)
    book.apply(routed("p-b", "r4", "i2", provider="vast"), now_ms=T0)
    book.apply(finished("p-b", "r1", "i1", latency_ms=100), now_ms=T0)
    book.apply(finished("p-b", "r2", "i2", latency_ms=200, ok=False), now_ms=T0)
    runpod, vast = book.load_info().providers
    assert (runpod.provider, runpod.instances, runpod.in_flight, runpod.routed) == (
        "runpod",
        1,
        1,
        1,
    )
    assert (vast.provider, vast.instances, vast.in_flight, vast.routed, vast.finished) == (
        "vast",
        2,
        1,
        3,
        2,
    )
    assert vast.avg_response_ms == 100
    assert vast.error_rate == pytest.approx(EWMA_ALPHA)
    rows = {row.instance_id: row for row in book.load_info().instances}
    assert vast.load_score == pytest.approx((rows["i1"].load_score + rows["i2"].load_score) / 2)


def test_a_forgotten_machine_leaves_the_book() -> None:
    book = LoadBook("p-a")
    book.apply(routed("p-b", "r1", "i1"), now_ms=T0)
    book.apply(routed("p-b", "r2", "i2"), now_ms=T0)
    book.forget("i1")
    assert [row.instance_id for row in book.load_info().instances] == ["i2"]
    assert book.in_flight("i1") == 0
    assert book.prefixes.match(routed("p-b", "r1", "i1").prefix_blocks) == {}
    book.apply(finished("p-b", "r1", "i1"), now_ms=T0)
    assert book.in_flight("i1") == 0


def test_routed_prompts_teach_the_prefix_index() -> None:
    book = LoadBook("p-a")
    message = routed("p-b", "r1", "i7")
    book.apply(message, now_ms=T0)
    assert book.prefixes.match(message.prefix_blocks) == {"i7": len(message.prefix_blocks)}
