"""The caller's wait on a future: a cancel is never lost, a timeout names itself."""

from __future__ import annotations

import asyncio

import pytest

from bus.inbox import within


async def test_a_cancel_that_lands_as_the_answer_arrives_is_not_lost() -> None:
    # asyncio.wait_for on Python 3.11 returns the result here and the cancel is gone.
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(within(answer, 5, lambda: TimeoutError("late")))
    await asyncio.sleep(0)
    answer.set_result(1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_no_answer_in_time_raises_the_error_made_for_it() -> None:
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError, match="late"):
        await within(answer, 0.01, lambda: TimeoutError("late"))


async def test_an_answer_in_time_is_returned() -> None:
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(answer.set_result, 7)
    assert await within(answer, 5, lambda: TimeoutError("late")) == 7
