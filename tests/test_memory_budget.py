"""FrameBudget (broker/memory_budget.py): never more than bytes_max reserved, waiters
served first come first served, a cancelled wait (a deadline) holds nothing, including
one granted just as it was cancelled."""

from __future__ import annotations

import asyncio

import pytest

from nodi.broker.server.memory_budget import FRAME_BUFFER_BYTES_MIN, FrameBudget, default_frame_buffer_bytes_max


def test_reservations_stay_within_the_budget_and_waiters_go_in_order():
    async def scenario():
        budget = FrameBudget(100)
        assert budget.reserve_nowait(60)
        assert not budget.reserve_nowait(50)
        order = []

        async def wait(name, count):
            await budget.wait_reserve(count)
            order.append(name)

        large = asyncio.create_task(wait("large", 90))
        await asyncio.sleep(0)
        small = asyncio.create_task(wait("small", 10))
        await asyncio.sleep(0)
        # 10 would fit now, but the larger waiter came first.
        assert order == [] and budget.statistics().waiting == 2
        assert not budget.reserve_nowait(10)  # nor may a newcomer jump the queue
        budget.release(60)
        await asyncio.gather(large, small)
        assert order == ["large", "small"]
        statistics = budget.statistics()
        assert (statistics.bytes_reserved, statistics.waiting, statistics.waits) == (100, 0, 2)

    asyncio.run(scenario())


def test_a_cancelled_wait_holds_nothing_and_lets_the_next_one_in():
    async def scenario():
        budget = FrameBudget(100)
        assert budget.reserve_nowait(95)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await budget.wait_reserve(50)
        follower = asyncio.create_task(budget.wait_reserve(5))
        await asyncio.wait_for(follower, 1)  # fits once the timed-out waiter is gone
        assert budget.statistics().bytes_reserved == 100
        assert budget.statistics().wait_timeouts == 1

        # Granted by a release, then cancelled before it ran: the grant is given back.
        budget.release(100)
        assert budget.reserve_nowait(100)
        waiter = asyncio.create_task(budget.wait_reserve(30))
        await asyncio.sleep(0)
        budget.release(100)  # grants the waiter's 30
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.statistics().bytes_reserved == 0

    asyncio.run(scenario())


def test_the_default_budget_fits_the_machine():
    assert default_frame_buffer_bytes_max() >= FRAME_BUFFER_BYTES_MIN
