"""The frame byte budget: what is held never exceeds the limit by more than one frame."""

from __future__ import annotations

import asyncio
import random

import pytest

from inference_service.budget import ByteBudget, Reservation, SizeEstimate


def test_a_reservation_waits_for_room_and_a_lone_oversized_one_passes() -> None:
    async def scenario() -> None:
        budget = ByteBudget(100)
        await budget.acquire(60)
        waiter = asyncio.ensure_future(budget.acquire(50))
        await asyncio.sleep(0.01)
        assert not waiter.done() and budget.held == 60
        await budget.release(60)
        await asyncio.wait_for(waiter, 1)
        assert budget.held == 50
        await budget.release(50)
        await asyncio.wait_for(budget.acquire(500), 1)  # alone: larger than the budget is fine
        assert budget.held == 500

    asyncio.run(scenario())


def test_the_estimate_is_the_largest_recent_frame() -> None:
    est = SizeEstimate(initial=1000, window=3)
    assert est.value() == 1000
    for size in (10, 30, 20):
        est.observe(size)
    assert est.value() == 30
    est.observe(5)
    est.observe(6)
    assert est.value() == 20
    est.observe(1)
    assert est.value() == 6


@pytest.mark.parametrize("seed", range(5))
def test_many_fetches_of_random_sizes_stay_within_limit_plus_one_frame(seed: int) -> None:
    rng = random.Random(seed)
    limit, largest = 1000, 400
    sizes = [rng.randint(1, largest) for _ in range(200)]
    peak = 0

    async def scenario() -> None:
        nonlocal peak
        budget = ByteBudget(limit)
        estimate = SizeEstimate(initial=largest)
        reading = 0

        async def fetch(size: int) -> None:
            nonlocal reading, peak
            r = Reservation(budget, estimate)
            await r.start()
            await asyncio.sleep(rng.random() / 1000)  # the response headers arrive
            await r.admit(size)
            reading += size  # the body is read only now
            peak = max(peak, reading)
            await asyncio.sleep(rng.random() / 500)  # detection
            reading -= size
            await r.close()

        await asyncio.wait_for(asyncio.gather(*(fetch(s) for s in sizes)), 30)
        assert budget.held == 0

    asyncio.run(scenario())
    assert 0 < peak <= limit  # no frame is larger than the budget here
