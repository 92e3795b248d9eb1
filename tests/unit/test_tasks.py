"""Stopping background tasks that swallow a cancellation (Python 3.11's wait_for race)."""

from __future__ import annotations

import asyncio

from bus.tasks import cancel_and_wait


async def test_a_task_that_swallows_one_cancellation_is_still_stopped() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as a library that returns a result and drops the cancel

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait([task], every=0.05)
    assert task.cancelled()
    assert swallowed == 1


async def test_finished_tasks_are_left_as_they_are() -> None:
    async def quick() -> int:
        return 1

    task = asyncio.create_task(quick())
    await task
    await cancel_and_wait([task])
    assert task.result() == 1
