"""The caller's inbox: reply chunks checked for attempt and sequence before they count."""

from __future__ import annotations

import time

import pytest

from bus.inbox import Inbox
from schemas.errors import Internal, Unavailable
from schemas.replies import Data, Heartbeat, Pong, Result


def _data(attempt: int, seq: int, body: bytes = b"x") -> Data:
    return Data(command_id="c", attempt=attempt, seq=seq, body=body)


def _result(attempt: int, seq: int) -> Result:
    pong = Pong(message="", worker_kind="", worker_id="w", attempt=attempt)
    return Result(command_id="c", attempt=attempt, seq=seq, result=pong)


async def _drain(inbox: Inbox) -> list[object]:
    got: list[object] = []
    while True:
        chunk = await inbox.next(time.monotonic() + 1)
        got.append(chunk)
        if isinstance(chunk, Result):
            return got


async def test_heartbeats_and_repeated_chunks_are_skipped() -> None:
    inbox = Inbox()
    for chunk in (
        Heartbeat(command_id="c", attempt=1, seq=0),
        _data(1, 1, b"a"),
        _data(1, 1, b"a"),
        _result(1, 2),
    ):
        inbox.put(chunk)
    got = await _drain(inbox)
    assert [type(c).__name__ for c in got] == ["Data", "Result"]


async def test_a_gap_in_the_sequence_is_an_error_not_a_silent_hole() -> None:
    inbox = Inbox()
    inbox.put(_data(1, 0))
    inbox.put(_data(1, 2))
    assert isinstance(await inbox.next(time.monotonic() + 1), Data)
    with pytest.raises(Internal, match="lost"):
        await inbox.next(time.monotonic() + 1)


async def test_a_later_attempt_supersedes_one_that_sent_nothing_yet() -> None:
    inbox = Inbox()
    inbox.put(Heartbeat(command_id="c", attempt=1, seq=0))
    inbox.put(_result(2, 0))
    inbox.put(_result(1, 1))
    got = await _drain(inbox)
    assert isinstance(got[0], Result)
    assert got[0].attempt == 2


async def test_late_chunks_of_a_superseded_attempt_are_ignored() -> None:
    inbox = Inbox()
    inbox.put(Heartbeat(command_id="c", attempt=2, seq=0))
    inbox.put(_data(1, 0))
    inbox.put(_result(2, 1))
    got = await _drain(inbox)
    assert [c.attempt for c in got if isinstance(c, Result | Data)] == [2]


async def test_a_new_attempt_after_data_reached_the_client_is_unavailable() -> None:
    # Part of the answer is already out: a restarted attempt would repeat or splice it.
    inbox = Inbox()
    inbox.put(_data(1, 0))
    inbox.put(_data(2, 0))
    assert isinstance(await inbox.next(time.monotonic() + 1), Data)
    with pytest.raises(Unavailable, match="mid-stream"):
        await inbox.next(time.monotonic() + 1)
