"""The circuit breakers every proxy replica derives from the load messages all replicas send."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from schemas.balancing import Finished, LoadMessage, ReplicaLoad, Routed
from schemas.events import Event, InstanceCircuitChanged, subject_of
from workers.proxy.breaker import (
    FAILURES,
    MAX_OPEN_MS,
    OPEN_MS,
    PROBE_TIMEOUT_MS,
    CircuitBreakers,
    CircuitState,
)

T0 = 1_700_000_000_000
_ids = itertools.count()


def routed(replica: str, instance_id: str, at_ms: int, request_id: str = "") -> Routed:
    return Routed(
        replica=replica,
        at_ms=at_ms,
        request_id=request_id or f"r{next(_ids)}",
        instance_id=instance_id,
        prefix_blocks=[],
        provider="vast",
    )


def finished(request: Routed, *, ok: bool, at_ms: int | None = None) -> Finished:
    return Finished(
        replica=request.replica,
        at_ms=request.at_ms + 50 if at_ms is None else at_ms,
        request_id=request.request_id,
        instance_id=request.instance_id,
        ok=ok,
        latency_ms=50,
    )


def requests(replica: str, instance_id: str, outcomes: str, start_ms: int) -> list[LoadMessage]:
    """One request per letter, 100 ms apart: `f` failed, `s` answered."""
    messages: list[LoadMessage] = []
    for n, outcome in enumerate(outcomes):
        request = routed(replica, instance_id, start_ms + 100 * n)
        messages += [request, finished(request, ok=outcome == "s")]
    return messages


def feed(breakers: CircuitBreakers, messages: list[LoadMessage]) -> None:
    for message in messages:
        breakers.apply(message, now_ms=message.at_ms)


def tripped(instance_id: str = "i1", replica: str = "p-a") -> tuple[CircuitBreakers, int]:
    """Breakers with `instance_id` just opened; returns them and when it opened."""
    breakers = CircuitBreakers()
    messages = requests(replica, instance_id, "f" * FAILURES, T0)
    feed(breakers, messages)
    assert breakers.state(instance_id, now_ms=messages[-1].at_ms) is CircuitState.OPEN
    return breakers, messages[-1].at_ms


def states(changes: list[InstanceCircuitChanged]) -> list[str]:
    return [change.state for change in changes]


# -- closed -> open ---------------------------------------------------------------------------


def test_a_machine_opens_after_five_consecutive_failures_from_any_replica() -> None:
    breakers = CircuitBreakers()
    feed(breakers, requests("p-a", "i1", "ff", T0) + requests("p-b", "i1", "ff", T0 + 200))
    assert breakers.allowed("i1", now_ms=T0 + 500)

    feed(breakers, requests("p-b", "i1", "f", T0 + 400))

    assert not breakers.allowed("i1", now_ms=T0 + 500)
    [change] = breakers.changes()
    assert (change.state, change.reason, change.failures) == ("open", "consecutive_failures", 5)


def test_an_answer_between_failures_starts_the_count_again() -> None:
    breakers = CircuitBreakers()

    feed(breakers, requests("p-a", "i1", "ffffsffff", T0))

    assert breakers.allowed("i1", now_ms=T0 + 1_000)
    assert breakers.changes() == []


def test_an_answer_counts_where_it_was_sent_not_where_it_arrived() -> None:
    in_order = requests("p-a", "i1", "ffsfffff", T0)
    answer = next(m for m in in_order if isinstance(m, Finished) and m.ok)
    late = [m for m in in_order if m is not answer]
    late.insert(in_order.index(answer) + 2, answer)  # after the next failure, not before
    a, b = CircuitBreakers(), CircuitBreakers()

    feed(a, in_order)
    feed(b, late)

    # Counted as they arrived, b would have seen four in a row; sent, there are five.
    assert a.changes() == b.changes() != []


def test_a_machine_failing_half_its_requests_opens_on_its_error_rate() -> None:
    breakers = CircuitBreakers()

    feed(breakers, requests("p-a", "i1", "fs" * 10, T0))

    [change] = breakers.changes()
    assert (change.reason, change.failures) == ("error_rate", 10)
    assert not breakers.allowed("i1", now_ms=T0 + 2_000)


def test_a_failure_applied_twice_counts_once() -> None:
    breakers = CircuitBreakers()
    messages = requests("p-a", "i1", "ffff", T0)

    feed(breakers, messages + messages[-1:] + messages[-1:])

    assert breakers.allowed("i1", now_ms=T0 + 1_000)


def test_a_machine_nobody_spoke_of_is_allowed() -> None:
    breakers = CircuitBreakers()

    assert breakers.allowed("i9", now_ms=T0)
    assert breakers.state("i9", now_ms=T0) is CircuitState.CLOSED


# -- open -------------------------------------------------------------------------------------


def test_an_open_machine_stays_out_for_the_open_period_then_turns_half_open() -> None:
    breakers, opened = tripped()

    assert not breakers.allowed("i1", now_ms=opened + OPEN_MS - 1)
    assert breakers.allowed("i1", now_ms=opened + OPEN_MS)
    assert breakers.state("i1", now_ms=opened + OPEN_MS) is CircuitState.HALF_OPEN


def test_results_that_come_in_while_open_are_not_counted() -> None:
    breakers, opened = tripped()
    straggler = routed("p-b", "i1", opened - 1_000)

    breakers.apply(finished(straggler, ok=True, at_ms=opened + 10), now_ms=opened + 10)

    assert breakers.state("i1", now_ms=opened + 20) is CircuitState.OPEN


def test_tick_turns_a_breaker_half_open_without_any_traffic() -> None:
    breakers, opened = tripped()
    breakers.changes()

    breakers.tick(opened + OPEN_MS)

    assert states(breakers.changes()) == ["half_open"]


# -- half-open: one probe ---------------------------------------------------------------------


def test_half_open_lets_one_probe_through_and_keeps_the_rest_out() -> None:
    breakers, opened = tripped()
    now = opened + OPEN_MS
    assert breakers.allowed("i1", now_ms=now)

    breakers.apply(routed("p-a", "i1", now), now_ms=now)

    assert not breakers.allowed("i1", now_ms=now + 1)


def test_a_probe_heard_from_another_replica_keeps_this_one_out() -> None:
    breakers, opened = tripped()
    now = opened + OPEN_MS

    breakers.apply(routed("p-b", "i1", now), now_ms=now + 2)

    assert not breakers.allowed("i1", now_ms=now + 3)


def test_a_probe_sent_by_a_replica_whose_clock_is_ahead_counts_before_ours_gets_there() -> None:
    breakers, opened = tripped()
    until = opened + OPEN_MS

    breakers.apply(routed("p-b", "i1", until + 5), now_ms=until - 5)

    assert breakers.state("i1", now_ms=until - 4) is CircuitState.HALF_OPEN
    assert not breakers.allowed("i1", now_ms=until - 4)


def test_a_request_sent_while_still_open_is_not_the_probe() -> None:
    breakers, opened = tripped()
    fallback = routed("p-b", "i1", opened + 100)

    breakers.apply(fallback, now_ms=opened + OPEN_MS + 1)
    breakers.apply(
        finished(fallback, ok=True, at_ms=opened + OPEN_MS + 2), now_ms=opened + OPEN_MS + 2
    )

    assert breakers.state("i1", now_ms=opened + OPEN_MS + 3) is CircuitState.HALF_OPEN
    assert breakers.allowed("i1", now_ms=opened + OPEN_MS + 3)


def test_the_probes_success_closes_the_breaker() -> None:
    breakers, opened = tripped()
    probe = routed("p-a", "i1", opened + OPEN_MS)

    feed(breakers, [probe, finished(probe, ok=True)])

    assert breakers.state("i1", now_ms=probe.at_ms + 100) is CircuitState.CLOSED
    assert breakers.allowed("i1", now_ms=probe.at_ms + 100)
    assert states(breakers.changes()) == ["open", "half_open", "closed"]


def test_the_probes_failure_opens_it_again_for_twice_as_long() -> None:
    breakers, opened = tripped()
    probe = routed("p-a", "i1", opened + OPEN_MS)
    failed = finished(probe, ok=False)

    feed(breakers, [probe, failed])

    reopened = breakers.changes()[-1]
    assert not breakers.allowed("i1", now_ms=failed.at_ms + 2 * OPEN_MS - 1)
    assert breakers.allowed("i1", now_ms=failed.at_ms + 2 * OPEN_MS)
    assert (reopened.state, reopened.reason) == ("open", "probe_failed")
    assert (reopened.failures, reopened.until_ms) == (FAILURES + 1, failed.at_ms + 2 * OPEN_MS)


def test_the_open_period_doubles_at_each_reopening_up_to_a_minute() -> None:
    breakers, opened = tripped()
    until = opened + OPEN_MS
    periods = []
    for _ in range(5):
        probe = routed("p-a", "i1", until)
        failed = finished(probe, ok=False)
        feed(breakers, [probe, failed])
        until = breakers.changes()[-1].until_ms
        periods.append(until - failed.at_ms)

    assert periods == [2 * OPEN_MS, 4 * OPEN_MS, MAX_OPEN_MS, MAX_OPEN_MS, MAX_OPEN_MS]


def test_a_machine_that_closed_opens_for_the_first_period_again_when_it_next_fails() -> None:
    breakers, opened = tripped()
    probe = routed("p-a", "i1", opened + OPEN_MS)
    feed(breakers, [probe, finished(probe, ok=False)])
    second = routed("p-a", "i1", opened + OPEN_MS + 50 + 2 * OPEN_MS)
    feed(breakers, [second, finished(second, ok=True)])
    breakers.changes()

    feed(breakers, requests("p-a", "i1", "f" * FAILURES, second.at_ms + 1_000))

    [change] = breakers.changes()
    assert change.until_ms - change.occurred_at_ms == OPEN_MS


def test_a_probe_that_never_answers_counts_as_failed() -> None:
    breakers, opened = tripped()
    probe = routed("p-b", "i1", opened + OPEN_MS)
    breakers.apply(probe, now_ms=probe.at_ms)
    deadline = probe.at_ms + PROBE_TIMEOUT_MS
    breakers.changes()

    assert not breakers.allowed("i1", now_ms=deadline - 1)
    breakers.tick(deadline)

    [change] = breakers.changes()
    assert (change.state, change.reason, change.occurred_at_ms) == (
        "open",
        "probe_timed_out",
        deadline,
    )
    assert change.until_ms == deadline + 2 * OPEN_MS


def test_an_answer_from_a_request_that_was_not_the_probe_decides_nothing() -> None:
    breakers, opened = tripped()
    probe = routed("p-a", "i1", opened + OPEN_MS)
    other = routed("p-b", "i1", opened + OPEN_MS + 5)
    feed(breakers, [probe, other])

    breakers.apply(finished(other, ok=True), now_ms=other.at_ms + 50)

    assert breakers.state("i1", now_ms=other.at_ms + 60) is CircuitState.HALF_OPEN
    assert not breakers.allowed("i1", now_ms=other.at_ms + 60)


# -- replicas agree ---------------------------------------------------------------------------


def test_two_replicas_that_hear_the_failures_in_different_orders_open_alike() -> None:
    messages = requests("p-a", "i1", "fsff", T0) + requests("p-b", "i1", "sfff", T0 + 50)
    # Each publisher's own messages keep their order on the bus; here p-b's all come first.
    reordered = sorted(messages, key=lambda m: m.replica != "p-b")
    a, b = CircuitBreakers(), CircuitBreakers()

    feed(a, messages)
    for message in reordered:
        b.apply(message, now_ms=T0 + 5_000)

    assert a.changes() == b.changes() != []


def test_two_replicas_that_both_probed_before_hearing_each_other_follow_the_same_probe() -> None:
    (a, opened), (b, _) = tripped(replica="p-x"), tripped(replica="p-x")
    now = opened + OPEN_MS
    assert a.allowed("i1", now_ms=now)
    assert b.allowed("i1", now_ms=now)
    probe_a = routed("p-a", "i1", now + 3)
    probe_b = routed("p-b", "i1", now + 1)
    a.apply(probe_a, now_ms=now + 3)
    b.apply(probe_b, now_ms=now + 1)

    a.apply(probe_b, now_ms=now + 4)
    b.apply(probe_a, now_ms=now + 4)
    # The later probe answers first; only the earliest one (p-b's) decides, on both.
    for replica in (a, b):
        replica.apply(finished(probe_a, ok=True, at_ms=now + 40), now_ms=now + 40)
    assert not a.allowed("i1", now_ms=now + 41)
    assert not b.allowed("i1", now_ms=now + 41)
    for replica in (a, b):
        replica.apply(finished(probe_b, ok=False, at_ms=now + 90), now_ms=now + 90)

    assert a.state("i1", now_ms=now + 91) is b.state("i1", now_ms=now + 91) is CircuitState.OPEN
    assert a.changes() == b.changes()


def test_replicas_that_hear_a_probe_in_time_let_only_it_through() -> None:
    tripped_replicas = [tripped() for _ in range(3)]
    now = tripped_replicas[0][1] + OPEN_MS
    replicas = [breakers for breakers, _ in tripped_replicas]
    let_through = []
    for n, replica in enumerate(replicas):
        if replica.allowed("i1", now_ms=now + n):
            probe = routed(f"p-{n}", "i1", now + n)
            let_through.append(probe)
            for each in replicas:
                each.apply(probe, now_ms=now + n)

    assert len(let_through) == 1


# -- events -----------------------------------------------------------------------------------


def test_each_change_is_one_event_with_an_id_every_replica_gives_it() -> None:
    breakers, opened = tripped()
    probe = routed("p-a", "i1", opened + OPEN_MS)
    feed(breakers, [probe, finished(probe, ok=True)])

    changes = breakers.changes()

    assert [c.event_id for c in changes] == [
        f"circuit-i1-{opened}-open",
        f"circuit-i1-{opened}-half_open",
        f"circuit-i1-{opened}-closed",
    ]
    assert [c.occurred_at_ms for c in changes] == [opened, opened + OPEN_MS, probe.at_ms + 50]
    assert {c.provider for c in changes} == {"vast"}
    assert breakers.changes() == []


def test_asking_again_does_not_repeat_a_change() -> None:
    breakers, opened = tripped()
    for now in (opened + 1, opened + OPEN_MS, opened + OPEN_MS + 1):
        breakers.allowed("i1", now_ms=now)
        breakers.tick(now)
        breakers.apply(ReplicaLoad(replica="p-b", at_ms=now, in_flight={}), now_ms=now)

    assert states(breakers.changes()) == ["open", "half_open"]


def test_a_circuit_event_goes_through_the_event_union_on_its_subject() -> None:
    breakers, _ = tripped()
    [change] = breakers.changes()

    decoded = msgspec.json.decode(msgspec.json.encode(change), type=Event)

    assert decoded == change
    assert subject_of(change) == "gpuproxy.evt.instance.circuit_changed"


# -- all open ---------------------------------------------------------------------------------


def test_when_every_candidate_is_open_the_one_that_reopens_soonest_is_still_offered() -> None:
    breakers, _ = tripped("i1")
    feed(breakers, requests("p-a", "i2", "f" * FAILURES, T0 + 2_000))
    feed(breakers, requests("p-a", "i3", "f" * FAILURES, T0 + 1_000))
    now = T0 + 5_000

    assert breakers.usable(["i2", "i3", "i1"], now_ms=now) == ["i1"]
    assert breakers.rank_open(["i2", "i3", "i1"]) == ["i1", "i3", "i2"]


def test_while_any_candidate_is_allowed_only_the_allowed_are_offered() -> None:
    breakers, _ = tripped("i1")

    assert breakers.usable(["i3", "i1", "i2"], now_ms=T0 + 1_000) == ["i3", "i2"]


def test_a_forgotten_machine_starts_closed_again() -> None:
    breakers, opened = tripped("i1")

    breakers.forget("i1")

    assert breakers.allowed("i1", now_ms=opened + 1)


@pytest.mark.parametrize(
    "settings",
    [
        {"failures": 0},
        {"window": 5, "window_failures": 6},
        {"open_ms": 20_000, "max_open_ms": 10_000},
    ],
)
def test_settings_that_cannot_work_are_refused(settings: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="need"):
        CircuitBreakers(**settings)
