"""DetectorPool's priorities: pipeline frames go to the workers before interactive (HTTP) ones."""

from __future__ import annotations

import asyncio
import time

import pytest

from inference_service.domain import FrameDetections, Priority
from inference_service.pool import DetectorPool
from tests.unit.test_pool import FakeFactory, run, settings

pytestmark = pytest.mark.timeout(60)


async def until(check: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_waiting_pipeline_frames_go_before_waiting_interactive_ones() -> None:
    """One worker taking one frame at a time, busy: everything else waits. Then every pipeline
    frame is answered before the interactive ones, although they were submitted earlier."""

    async def go() -> None:
        async with DetectorPool(
            settings(), FakeFactory(), processes=1, threads=1, pullers=1, in_flight_per_worker=1
        ) as pool:
            done: list[int] = []

            def submit(width: int, priority: Priority) -> asyncio.Future[FrameDetections]:
                future = asyncio.ensure_future(
                    pool.detect(f"ok:{width}".encode(), priority=priority)
                )
                future.add_done_callback(lambda f: done.append(f.result().image.width))
                return future

            blocker = asyncio.ensure_future(pool.detect(b"sleep:0.5"))
            await until(lambda: pool.stats().in_flight == 1)
            futures = [submit(100 + i, Priority.INTERACTIVE) for i in range(3)]
            futures += [submit(i, Priority.PIPELINE) for i in range(3)]
            await until(lambda: pool.stats().pending == 6)  # all submitted, none dispatched
            await blocker
            await asyncio.gather(*futures)
            assert done == [0, 1, 2, 100, 101, 102]

    run(go())


def test_interactive_frames_never_queue_at_a_worker_ahead_of_pipeline_frames() -> None:
    """With 2 pullers and room for 3 at the worker, interactive frames take only the 2 pullers;
    the third waits in the pool, and a pipeline frame still goes straight to the worker."""

    async def go() -> None:
        async with DetectorPool(
            settings(), FakeFactory(), processes=1, threads=1, pullers=2, in_flight_per_worker=3
        ) as pool:
            slow = [
                asyncio.ensure_future(pool.detect(b"sleep:0.6", priority=Priority.INTERACTIVE))
                for _ in range(3)
            ]
            await until(lambda: pool.stats().in_flight == 2 and pool.stats().pending == 1)
            t0 = time.monotonic()
            kafka = await pool.detect(b"ok:7")  # the default priority is the pipeline's
            assert kafka.image.width == 7
            # It waited only for a puller to free (one slow frame), not behind the third one.
            assert time.monotonic() - t0 < 0.6 + 0.3  # behind the third: 1.2 s
            assert [r.image.width for r in await asyncio.gather(*slow)] == [2, 2, 2]

    run(go())


def test_interactive_frames_are_served_when_no_pipeline_frame_waits() -> None:
    async def go() -> None:
        async with DetectorPool(settings(), FakeFactory(), processes=2, threads=1) as pool:
            out = await asyncio.gather(
                *(pool.detect(f"ok:{i}".encode(), priority=Priority.INTERACTIVE) for i in range(20))
            )
            assert [r.image.width for r in out] == list(range(20))
            stats = pool.stats()
            assert (stats.completed, stats.pending, stats.in_flight) == (20, 0, 0)

    run(go())
