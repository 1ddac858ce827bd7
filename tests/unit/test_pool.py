"""DetectorPool logic with a fake detector in real spawned worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inference_service.domain import FrameDetections, ImageSize, ModelInfo
from inference_service.errors import (
    InferenceFailedError,
    InferenceTimeoutError,
    ModelError,
    UndecodableFrameError,
)
from inference_service.pool import DetectorPool, plan_workers
from inference_service.settings import Settings

pytestmark = pytest.mark.timeout(60)

INFO = ModelInfo(
    name="fake.pt", sha256="0" * 64, imgsz=(64, 64), conf=0.25, iou=0.45, runtime="fake/fp32"
)


class FakeDetector:
    """Answers by the frame's bytes.

    ``ok:N`` → width N; ``bad`` → undecodable; ``crash`` → SIGKILL; ``crash-once:PATH`` → SIGKILL
    the first time only; ``boom`` → a plain bug; ``sleep:S`` → wait S seconds; ``exit`` →
    ``os._exit``; ``hang`` → never answer; ``hang-once:PATH`` → never answer in the first process
    that sees it.
    """

    info = INFO
    warmed_up = False

    def warmup(self) -> None:
        pass

    def detect(self, data: bytes) -> FrameDetections:
        text = data.decode()
        if text == "bad":
            raise UndecodableFrameError("not an image")
        if text == "boom":
            raise ValueError("a bug")
        if text == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if text.startswith("crash-once:"):
            marker = Path(text.split(":", 1)[1])
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            text = "ok:1"
        if text == "exit":
            os._exit(3)
        if text == "hang":
            threading.Event().wait()
        if text.startswith("hang-once:"):
            marker = Path(text.split(":", 1)[1])
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                threading.Event().wait()
            text = "ok:1"
        if text.startswith("sleep:"):
            time.sleep(float(text.split(":", 1)[1]))
            text = "ok:2"
        width = int(text.split(":", 1)[1])
        return FrameDetections(ImageSize(width, os.getpid()), (), 0.0, 0.0, 0.0, 0.0)

    def detect_array(self, image: Any) -> FrameDetections:
        h, w = image.shape[:2]
        return FrameDetections(ImageSize(w, h), (), float(image.sum()), 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class FakeFactory:
    fail: bool = False
    crash: bool = False
    load_s: float = 0.0

    def __call__(self) -> FakeDetector:
        time.sleep(self.load_s)
        if self.fail:
            raise RuntimeError("no such model")
        if self.crash:
            os.kill(os.getpid(), signal.SIGKILL)
        return FakeDetector()


def settings(**kw: object) -> Settings:
    return Settings(**kw)  # type: ignore[arg-type]


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def test_results_match_their_frames_in_order() -> None:
    async def go() -> None:
        async with DetectorPool(settings(), FakeFactory(), processes=2, threads=1) as pool:
            assert pool.ready()
            assert pool.info == INFO
            out = await asyncio.gather(*(pool.detect(f"ok:{i}".encode()) for i in range(50)))
            assert [r.image.width for r in out] == list(range(50))
            assert len({r.image.height for r in out}) == 2  # both workers served frames
            stats = pool.stats()
            assert stats.completed == 50
            assert stats.in_flight == 0
            assert stats.batch_sizes == {1: 50}
        assert not pool.ready()

    run(go())


def test_decoded_frames_travel_as_raw_buffers() -> None:
    import numpy as np

    async def go() -> None:
        async with DetectorPool(settings(), FakeFactory(), processes=1, threads=1) as pool:
            image = np.zeros((7, 5, 3), dtype=np.uint8)
            image[1, 2] = (1, 2, 3)
            result = await pool.detect_array(image)
            assert (result.image.width, result.image.height) == (5, 7)
            assert result.decode_ms == 6.0
            with pytest.raises(ValueError, match="H×W×3"):
                await pool.detect_array(np.zeros((4, 4), dtype=np.uint8))

    run(go())


def test_task_errors_come_back_with_their_type_and_message() -> None:
    async def go() -> None:
        async with DetectorPool(settings(), FakeFactory(), processes=1, threads=1) as pool:
            with pytest.raises(UndecodableFrameError, match="not an image"):
                await pool.detect(b"bad")
            with pytest.raises(InferenceFailedError, match="ValueError: a bug"):
                await pool.detect(b"boom")
            assert (await pool.detect(b"ok:3")).image.width == 3
            assert pool.stats().failed == 2

    run(go())


def test_crashed_worker_is_replaced_and_its_frame_retried(tmp_path: Path) -> None:
    async def go() -> None:
        async with DetectorPool(
            settings(worker_retries=1), FakeFactory(), processes=1, threads=1
        ) as pool:
            first_pid = (await pool.detect(b"ok:1")).image.height
            t0 = time.monotonic()
            marker = tmp_path / "crashed"
            result = await pool.detect(f"crash-once:{marker}".encode())
            assert marker.exists()
            assert result.image.width == 1
            assert result.image.height != first_pid  # answered by the replacement
            assert time.monotonic() - t0 < 30
            assert pool.stats().worker_restarts == 1
            assert pool.ready()

    run(go())


def test_innocent_frames_in_flight_survive_a_crash(tmp_path: Path) -> None:
    async def go() -> None:
        async with DetectorPool(
            settings(worker_retries=1), FakeFactory(), processes=1, threads=1, pullers=2
        ) as pool:
            slow = asyncio.ensure_future(pool.detect(b"sleep:0.5"))
            await asyncio.sleep(0.1)
            crash = asyncio.ensure_future(pool.detect(f"crash-once:{tmp_path / 'm'}".encode()))
            assert (await slow).image.width == 2
            assert (await crash).image.width == 1

    run(go())


def test_frame_that_always_kills_its_worker_fails_after_retries() -> None:
    async def go() -> None:
        async with DetectorPool(
            settings(worker_retries=2), FakeFactory(), processes=1, threads=1
        ) as pool:
            with pytest.raises(InferenceFailedError, match="after 3 attempts"):
                await pool.detect(b"crash")
            assert pool.stats().worker_restarts == 3
            assert (await pool.detect(b"ok:5")).image.width == 5

    run(go())


def test_no_retries_fails_on_first_crash() -> None:
    async def go() -> None:
        async with DetectorPool(
            settings(worker_retries=0), FakeFactory(), processes=1, threads=1
        ) as pool:
            with pytest.raises(InferenceFailedError, match="after 1 attempts"):
                await pool.detect(b"crash")

    run(go())


@pytest.mark.parametrize(("processes", "retries"), [(1, 0), (2, 1)])
def test_a_killer_frame_fails_alone_and_its_neighbours_succeed(
    processes: int, retries: int
) -> None:
    """The killer dies with other frames running beside it: they are retried alone, uncounted,
    and succeed; only the killer, dying alone, counts and ends inference_failed."""

    async def go() -> None:
        async with DetectorPool(
            settings(worker_retries=retries),
            FakeFactory(),
            processes=processes,
            threads=1,
            pullers=2,
        ) as pool:
            frames = [b"sleep:0.2"] * 3 + [b"exit"] + [b"sleep:0.2"] * 3
            out = await asyncio.gather(*(pool.detect(f) for f in frames), return_exceptions=True)
            errors = [o for o in out if isinstance(o, BaseException)]
            assert len(errors) == 1 and isinstance(out[3], InferenceFailedError), out
            assert f"after {retries + 1} attempts" in str(out[3])
            assert all(isinstance(o, FrameDetections) and o.image.width == 2 for o in out[:3])
            assert all(isinstance(o, FrameDetections) and o.image.width == 2 for o in out[4:])
            stats = pool.stats()
            assert (stats.completed, stats.failed, stats.pending, stats.in_flight) == (6, 1, 0, 0)
            # one death beside others (uncounted) at most, then retries + 1 deaths alone
            assert retries + 1 <= stats.worker_restarts <= retries + 2
            assert (await pool.detect(b"ok:5")).image.width == 5

    run(go())


def test_a_hanging_frame_times_out_and_the_pool_serves_on() -> None:
    async def go() -> None:
        async with DetectorPool(
            settings(frame_timeout_s=0.5), FakeFactory(), processes=2, threads=1, pullers=2
        ) as pool:
            t0 = time.monotonic()
            hang = asyncio.ensure_future(pool.detect(b"hang"))
            await asyncio.sleep(0.05)
            good = await asyncio.gather(*(pool.detect(f"ok:{i}".encode()) for i in range(6)))
            assert [r.image.width for r in good] == list(range(6))
            assert not hang.done()  # the others were served while it hung
            # Killed once; once it runs alone on the replacement, the other worker serves on.
            while not (pool.stats().worker_restarts == 1 and pool.stats().in_flight == 1):
                await asyncio.sleep(0.01)
            more = await asyncio.gather(*(pool.detect(f"ok:{i}".encode()) for i in range(8)))
            assert [r.image.width for r in more] == list(range(8))
            assert not hang.done()
            with pytest.raises(InferenceTimeoutError, match="INFERENCE_FRAME_TIMEOUT_S"):
                await hang
            assert time.monotonic() - t0 < 15
            stats = pool.stats()
            assert stats.worker_restarts == 2  # killed at its deadline, then again when alone
            assert (stats.completed, stats.failed, stats.in_flight) == (14, 1, 0)
            out = await asyncio.gather(*(pool.detect(f"ok:{i}".encode()) for i in range(4)))
            assert [r.image.width for r in out] == list(range(4))

    run(go())


def test_the_frames_beside_a_hanging_one_are_innocent() -> None:
    """The worker killed for one frame's deadline also held a frame running (not yet overdue) and
    one queued: both go back uncounted and end ok; only the hanging frame fails."""

    async def go() -> None:
        async with DetectorPool(
            settings(frame_timeout_s=0.5), FakeFactory(), processes=1, threads=1, pullers=2
        ) as pool:
            hang = asyncio.ensure_future(pool.detect(b"hang"))
            await asyncio.sleep(0.3)
            beside = asyncio.gather(pool.detect(b"sleep:0.3"), pool.detect(b"ok:7"))
            with pytest.raises(InferenceTimeoutError):
                await hang
            assert [r.image.width for r in await beside] == [2, 7]
            stats = pool.stats()
            assert (stats.completed, stats.failed, stats.worker_restarts) == (2, 1, 2)

    run(go())


def test_a_frame_that_hangs_once_succeeds_when_retried(tmp_path: Path) -> None:
    async def go() -> None:
        async with DetectorPool(
            settings(frame_timeout_s=0.5), FakeFactory(), processes=1, threads=1
        ) as pool:
            marker = tmp_path / "hung"
            result = await pool.detect(f"hang-once:{marker}".encode())
            assert result.image.width == 1
            assert result.image.height != int(marker.read_text())  # the replacement answered
            assert pool.stats().worker_restarts == 1

    run(go())


def test_the_deadline_runs_from_the_start_of_detection_not_the_dispatch() -> None:
    """With one puller the second frame waits in the worker's queue behind the first: together
    they take longer than the timeout, each alone does not, so nothing is killed."""

    async def go() -> None:
        async with DetectorPool(
            settings(frame_timeout_s=0.6), FakeFactory(), processes=1, threads=1, pullers=1
        ) as pool:
            out = await asyncio.gather(*(pool.detect(b"sleep:0.4") for _ in range(2)))
            assert [r.image.width for r in out] == [2, 2]
            assert pool.stats().worker_restarts == 0

    run(go())


def test_a_worker_killed_from_outside_is_noticed_quickly() -> None:
    async def go() -> None:
        async with DetectorPool(settings(), FakeFactory(), processes=1, threads=1) as pool:
            pid = (await pool.detect(b"ok:1")).image.height
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            while pool.stats().worker_restarts == 0:
                await asyncio.sleep(0.02)
            assert time.monotonic() - t0 < 1.0
            assert (await pool.detect(b"ok:2")).image.height != pid

    run(go())


def test_stop_is_prompt_and_cancels_unanswered_frames() -> None:
    async def go() -> None:
        pool = DetectorPool(settings(), FakeFactory(), processes=1, threads=1, pullers=1)
        await pool.start()
        pid = (await pool.detect(b"ok:1")).image.height
        slow = asyncio.ensure_future(pool.detect(b"sleep:0.3"))
        queued = asyncio.ensure_future(pool.detect(b"ok:9"))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await pool.stop()
        assert time.monotonic() - t0 < 2.0
        outcomes = await asyncio.wait_for(asyncio.gather(slow, queued, return_exceptions=True), 1)
        assert isinstance(outcomes[1], asyncio.CancelledError)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    run(go())


def test_stop_during_start_ends_the_start_promptly() -> None:
    """serve stops the pool when Kafka refuses its credentials while models still load: the
    start must not keep waiting for workers that are being shut down."""

    async def go() -> None:
        pool = DetectorPool(settings(), FakeFactory(load_s=30), processes=1, threads=1)
        starting = asyncio.ensure_future(pool.start())
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await pool.stop()
        await asyncio.wait_for(starting, 5)  # returns, no error: nothing failed to load
        assert time.monotonic() - t0 < 5
        assert not pool.ready()

    run(go())


def test_load_failure_is_a_model_error() -> None:
    async def go() -> None:
        pool = DetectorPool(settings(), FakeFactory(fail=True), processes=1, threads=1)
        with pytest.raises(ModelError, match="no such model"):
            await pool.start()

    run(go())


def test_event_loop_stays_responsive_while_workers_are_busy() -> None:
    async def go() -> None:
        async with DetectorPool(settings(), FakeFactory(), processes=1, threads=1) as pool:
            work = asyncio.gather(*(pool.detect(b"sleep:0.2") for _ in range(3)))
            gaps = []
            last = time.monotonic()
            while not work.done():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
            await work
            assert max(gaps) < 0.1

    run(go())


@pytest.mark.parametrize(
    ("workers", "threads", "cpus", "expected"),
    [
        ("auto", "auto", 2, (2, 1)),
        ("auto", "auto", 8, (8, 1)),
        ("auto", "auto", 1, (1, 1)),
        (1, "auto", 4, (1, 4)),
        ("auto", 2, 4, (2, 2)),
        ("auto", 8, 4, (1, 8)),
        (3, 2, 4, (3, 2)),
    ],
)
def test_plan_workers(
    workers: object, threads: object, cpus: int, expected: tuple[int, int]
) -> None:
    assert plan_workers(settings(workers=workers, threads=threads), cpus) == expected


def test_workers_that_die_while_loading_fail_the_start() -> None:
    async def go() -> None:
        pool = DetectorPool(settings(), FakeFactory(crash=True), processes=1, threads=1)
        with pytest.raises(ModelError, match="before its model was ready, 3 times"):
            await pool.start()

    run(go())


def test_start_gives_up_after_the_startup_timeout_setting() -> None:
    async def go() -> None:
        pool = DetectorPool(
            settings(startup_timeout_s=0.5), FakeFactory(load_s=30), processes=1, threads=1
        )
        t0 = time.monotonic()
        with pytest.raises(ModelError, match="INFERENCE_STARTUP_TIMEOUT_S"):
            await pool.start()
        assert time.monotonic() - t0 < 10
        assert not pool.ready()

    run(go())
