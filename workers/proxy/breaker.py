"""Circuit breakers: which machines a proxy replica keeps its requests away from for a while.

Every proxy replica keeps one `CircuitBreakers` and feeds it the same `Routed` and `Finished`
messages as its load book (`workers.proxy.loadbook`): every replica's, its own included, next
to `book.apply`. There is no other coordination: the state is derived from the messages, and
every time in it comes from the messages' `at_ms`, so replicas that heard the same messages
agree on the state, on when it changes and on the events that say so.

- **Closed → open.** A machine opens after `failures` (5) consecutive failed requests, by any
  replica, or when `window_failures` (10) of its last `window` (20) results failed: the second
  rule catches a machine that fails every other request. "Consecutive" and "last" are in the
  order of the results' `(at_ms, replica, request_id)`, not of their arrival, so two replicas
  that heard the same results in different orders count the same streak. It opens at the
  newest of those results' `at_ms`, for `open_ms` (10 s), doubled at each re-open up to
  `max_open_ms` (60 s); closing resets the period.
- **Open.** No request is let through; results that come in meanwhile (requests sent before
  it opened, or by the fallback below) are not counted.
- **Half-open** from `until_ms` on: the first `Routed` for the machine sent at or after then
  is its probe, and no other request is let through. Two replicas may each send one before
  hearing the other; then every replica takes the earliest by `(at_ms, replica, request_id)`
  as the probe and counts only its outcome, so all take the same next step and none probes
  twice. The probe's success closes the breaker, its failure opens it again, and so does no
  answer `probe_timeout_ms` after it was sent (its replica died).
- **All open.** `usable` gives the machines a request may go to; when every candidate is open
  it gives the one that turns half-open soonest, so a request is tried rather than refused.
- **Events.** Each change becomes one `InstanceCircuitChanged`, drained by `changes()` for the
  caller to publish. Its id `circuit-<instance>-<opened at ms>-<state>` is the same on every
  replica (a counter of opens would not be: a replica started later counts from zero), so the
  event stream's dedupe keeps one.

What stays possible: a result that reaches one replica after it decided and another before
(within the time a message takes to cross the bus) can make them disagree on one change. They
meet again at the next change, since every change is anchored to message times, not to what a
replica saw before. A replica started during an open period learns it from its own failures.

Pure logic: the clock comes in as `now_ms`, nothing here reads the time or does I/O. Call
`tick` on a timer too, so a breaker turns half-open (and says so) without traffic. The probe
is taken when its `Routed` is applied: check `allowed` right before routing each try.
"""

from __future__ import annotations

import bisect
import enum
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas.balancing import Finished, LoadMessage, ReplicaLoad, Routed
from schemas.events import InstanceCircuitChanged

FAILURES = 5
"""Consecutive failed requests that open a machine's breaker."""
WINDOW = 20
WINDOW_FAILURES = 10
"""Failed results among the last `WINDOW` that open it too: half of them."""
OPEN_MS = 10_000
"""How long a breaker stays open the first time; doubled at each re-open."""
MAX_OPEN_MS = 60_000
PROBE_TIMEOUT_MS = 330_000
"""A probe without an answer this long after it was sent counts as failed: the proxy's
default request timeout (300 s) and half a minute, so that a probe's own failure normally
comes first and this only catches a probe whose replica died. Pass the request timeout in use
plus some slack."""
REMEMBERED_IDS = 65_536
"""Finished request ids remembered to recognise a message applied twice."""


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True, frozen=True, order=True)
class _Result:
    at_ms: int
    replica: str
    request_id: str
    ok: bool = field(compare=False)


@dataclass(slots=True, frozen=True, order=True)
class _Probe:
    at_ms: int
    replica: str
    request_id: str


@dataclass(slots=True)
class _Breaker:
    provider: str = ""
    state: CircuitState = CircuitState.CLOSED
    results: list[_Result] = field(default_factory=list)
    """While closed: the latest results, in `(at_ms, replica, request_id)` order."""
    opened_at_ms: int = 0
    until_ms: int = 0
    opens: int = 0
    """Opens since it was last closed: the exponent of its open period."""
    failures: int = 0
    probes: dict[str, _Probe] = field(default_factory=dict)
    """While half-open: the requests sent to it since it turned half-open, by request id."""

    def probe(self) -> _Probe | None:
        return min(self.probes.values()) if self.probes else None


class CircuitBreakers:
    """One replica's breakers, one per machine, derived from the load messages of all."""

    def __init__(
        self,
        *,
        failures: int = FAILURES,
        window: int = WINDOW,
        window_failures: int = WINDOW_FAILURES,
        open_ms: int = OPEN_MS,
        max_open_ms: int = MAX_OPEN_MS,
        probe_timeout_ms: int = PROBE_TIMEOUT_MS,
        remembered_ids: int = REMEMBERED_IDS,
    ) -> None:
        if failures < 1 or not 1 <= window_failures <= window:
            raise ValueError("need failures >= 1 and 1 <= window_failures <= window")
        if open_ms < 1 or max_open_ms < open_ms or probe_timeout_ms < 1:
            raise ValueError("need 1 <= open_ms <= max_open_ms and probe_timeout_ms >= 1")
        self.failures = failures
        self.window = window
        self.window_failures = window_failures
        self.open_ms = open_ms
        self.max_open_ms = max_open_ms
        self.probe_timeout_ms = probe_timeout_ms
        self._kept = max(failures, window)
        self._remembered = remembered_ids
        self._seen_finished: OrderedDict[str, None] = OrderedDict()
        self._breakers: dict[str, _Breaker] = {}
        self._changes: list[InstanceCircuitChanged] = []

    # -- messages -----------------------------------------------------------------------------

    def apply(self, message: LoadMessage, *, now_ms: int) -> None:
        """Take in one load message from any replica; applying one twice changes nothing."""
        match message:
            case Routed():
                self._apply_routed(message, now_ms)
            case Finished():
                self._apply_finished(message, now_ms)
            case ReplicaLoad():
                self.tick(now_ms)

    def tick(self, now_ms: int) -> None:
        """Take the changes time alone makes: open periods over, probes that never answered."""
        for instance_id, breaker in self._breakers.items():
            self._advance(instance_id, breaker, now_ms)

    def forget(self, instance_id: str) -> None:
        """The machine is gone."""
        self._breakers.pop(instance_id, None)

    def changes(self) -> list[InstanceCircuitChanged]:
        """The changes since the last call, oldest first, to publish as events."""
        changes, self._changes = self._changes, []
        return changes

    # -- reading ------------------------------------------------------------------------------

    def state(self, instance_id: str, *, now_ms: int) -> CircuitState:
        breaker = self._breakers.get(instance_id)
        if breaker is None:
            return CircuitState.CLOSED
        self._advance(instance_id, breaker, now_ms)
        return breaker.state

    def allowed(self, instance_id: str, *, now_ms: int) -> bool:
        """Whether a request may go to the machine now: closed, or half-open with no probe."""
        breaker = self._breakers.get(instance_id)
        if breaker is None:
            return True
        self._advance(instance_id, breaker, now_ms)
        match breaker.state:
            case CircuitState.CLOSED:
                return True
            case CircuitState.OPEN:
                return False
            case CircuitState.HALF_OPEN:
                return not breaker.probes

    def rank_open(self, instance_ids: Iterable[str]) -> list[str]:
        """The machines by when their breaker lets requests through again, soonest first:
        closed ones, then those past their open period, then the others by its end. Ties keep
        the order given."""
        return sorted(instance_ids, key=self._until_ms)

    def usable(self, instance_ids: Iterable[str], *, now_ms: int) -> list[str]:
        """The machines, in the order given, a request may go to now; when every one is open,
        the one that turns half-open soonest alone."""
        ids = list(instance_ids)
        allowed = [i for i in ids if self.allowed(i, now_ms=now_ms)]
        return allowed or self.rank_open(ids)[:1]

    # -- applying -----------------------------------------------------------------------------

    def _apply_routed(self, message: Routed, now_ms: int) -> None:
        breaker = self._breaker(message.instance_id)
        if message.provider:
            breaker.provider = message.provider
        # Its sender found the open period over; a clock a little behind the sender's agrees.
        self._advance(message.instance_id, breaker, max(now_ms, message.at_ms))
        if breaker.state is CircuitState.HALF_OPEN and message.at_ms >= breaker.until_ms:
            probe = _Probe(message.at_ms, message.replica, message.request_id)
            breaker.probes.setdefault(message.request_id, probe)

    def _apply_finished(self, message: Finished, now_ms: int) -> None:
        if message.request_id in self._seen_finished:
            return
        self._seen_finished[message.request_id] = None
        if len(self._seen_finished) > self._remembered:
            self._seen_finished.popitem(last=False)
        instance_id = message.instance_id
        breaker = self._breaker(instance_id)
        self._advance(instance_id, breaker, now_ms)
        match breaker.state:
            case CircuitState.CLOSED:
                self._count(instance_id, breaker, message)
            case CircuitState.HALF_OPEN:
                probe = breaker.probe()
                if probe is None or probe.request_id != message.request_id:
                    return
                if message.ok:
                    self._close(instance_id, breaker, message.at_ms)
                else:
                    failures = breaker.failures + 1
                    self._open(instance_id, breaker, message.at_ms, "probe_failed", failures)
            case CircuitState.OPEN:
                pass

    def _count(self, instance_id: str, breaker: _Breaker, message: Finished) -> None:
        results = breaker.results
        bisect.insort(
            results, _Result(message.at_ms, message.replica, message.request_id, message.ok)
        )
        del results[: -self._kept]
        streak = 0
        for result in reversed(results):
            if result.ok:
                break
            streak += 1
        recent = sum(not result.ok for result in results[-self.window :])
        newest = results[-1].at_ms
        if streak >= self.failures:
            self._open(instance_id, breaker, newest, "consecutive_failures", streak)
        elif len(results) >= self.window and recent >= self.window_failures:
            self._open(instance_id, breaker, newest, "error_rate", recent)

    def _advance(self, instance_id: str, breaker: _Breaker, now_ms: int) -> None:
        # A probe that timed out opens it again, and that period too may be over already.
        while True:
            if breaker.state is CircuitState.OPEN and now_ms >= breaker.until_ms:
                breaker.state = CircuitState.HALF_OPEN
                self._emit(instance_id, breaker, breaker.until_ms, "open_elapsed")
                continue
            probe = breaker.probe() if breaker.state is CircuitState.HALF_OPEN else None
            if probe is not None and now_ms >= probe.at_ms + self.probe_timeout_ms:
                at_ms = probe.at_ms + self.probe_timeout_ms
                failures = breaker.failures + 1
                self._open(instance_id, breaker, at_ms, "probe_timed_out", failures)
                continue
            return

    def _open(
        self, instance_id: str, breaker: _Breaker, at_ms: int, reason: str, failures: int
    ) -> None:
        breaker.opens += 1
        breaker.state = CircuitState.OPEN
        breaker.opened_at_ms = at_ms
        breaker.until_ms = at_ms + self._period(breaker.opens)
        breaker.failures = failures
        breaker.results.clear()
        breaker.probes.clear()
        self._emit(instance_id, breaker, at_ms, reason)

    def _close(self, instance_id: str, breaker: _Breaker, at_ms: int) -> None:
        breaker.state = CircuitState.CLOSED
        breaker.opens = 0
        breaker.failures = 0
        breaker.until_ms = 0
        breaker.probes.clear()
        self._emit(instance_id, breaker, at_ms, "probe_succeeded")

    def _period(self, opens: int) -> int:
        # Capping the exponent keeps the integer small however often it re-opened.
        doublings = min(opens - 1, self.max_open_ms.bit_length())
        return min(self.open_ms << doublings, self.max_open_ms)

    def _emit(self, instance_id: str, breaker: _Breaker, at_ms: int, reason: str) -> None:
        state = breaker.state.value
        self._changes.append(
            InstanceCircuitChanged(
                event_id=f"circuit-{instance_id}-{breaker.opened_at_ms}-{state}",
                occurred_at_ms=at_ms,
                instance_id=instance_id,
                provider=breaker.provider,
                state=state,
                reason=reason,
                failures=breaker.failures,
                until_ms=breaker.until_ms if breaker.state is CircuitState.OPEN else 0,
            )
        )

    def _until_ms(self, instance_id: str) -> int:
        breaker = self._breakers.get(instance_id)
        return breaker.until_ms if breaker is not None else 0

    def _breaker(self, instance_id: str) -> _Breaker:
        breaker = self._breakers.get(instance_id)
        if breaker is None:
            breaker = self._breakers[instance_id] = _Breaker()
        return breaker
