import asyncio

import pytest

from inference_service.domain import Outcome
from inference_service.pipeline.ordering import InFlight


def outcome(n: int) -> Outcome:
    return Outcome(key=b"k", result={"n": n}, dead_letter=None, status="ok")


async def finish_after(n: int, delay: float) -> Outcome:
    await asyncio.sleep(delay)
    return outcome(n)


def test_results_leave_in_consumption_order_per_partition():
    async def scenario():
        lanes = InFlight()
        # Offsets 0..4 of partition 0 finish in reverse order; partition 1 finishes at once.
        for off in range(5):
            lanes.add(
                ("t", 0), off, asyncio.ensure_future(finish_after(off, 0.05 - off * 0.01)), 10
            )
        lanes.add(("t", 1), 7, asyncio.ensure_future(finish_after(100, 0)), 10)
        seen: list[tuple[tuple[str, int], int]] = []
        while lanes.count:
            await asyncio.sleep(0.001)
            seen.extend((f.partition, f.offset) for f in lanes.take_finished())
        assert [o for p, o in seen if p == ("t", 0)] == [0, 1, 2, 3, 4]
        assert (("t", 1), 7) in seen
        assert lanes.nbytes == 0

    asyncio.run(scenario())


def test_head_blocks_later_finished_work():
    async def scenario():
        lanes = InFlight()
        slow = asyncio.ensure_future(finish_after(0, 0.2))
        lanes.add(("t", 0), 0, slow, 1)
        lanes.add(("t", 0), 1, asyncio.ensure_future(finish_after(1, 0)), 1)
        lanes.add(("t", 1), 5, asyncio.ensure_future(finish_after(5, 0)), 1)
        await asyncio.sleep(0.02)
        assert lanes.ready() == 1  # partition 1's record; partition 0 waits for its head
        assert [f.offset for f in lanes.take_finished()] == [5]
        await slow
        assert lanes.ready() == 2
        assert [f.offset for f in lanes.take_finished()] == [0, 1]
        assert lanes.ready() == 0

    asyncio.run(scenario())


def test_drop_cancels_and_reports_rewind_points():
    async def scenario():
        lanes = InFlight()
        works = [asyncio.ensure_future(finish_after(i, 10)) for i in range(3)]
        for i, w in enumerate(works):
            lanes.add(("t", 2), 10 + i, w, 5)
        assert lanes.drop([("t", 2)]) == {("t", 2): 10}
        await asyncio.sleep(0)
        assert all(w.cancelled() for w in works)
        assert (lanes.count, lanes.nbytes) == (0, 0)

    asyncio.run(scenario())


def test_offsets_must_grow():
    async def scenario():
        lanes = InFlight()
        lanes.add(("t", 0), 5, asyncio.ensure_future(finish_after(0, 0)), 1)
        with pytest.raises(ValueError, match="lanes only grow"):
            lanes.add(("t", 0), 5, asyncio.ensure_future(finish_after(0, 0)), 1)
        lanes.drop()

    asyncio.run(scenario())
