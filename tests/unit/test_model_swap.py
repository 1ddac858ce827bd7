"""The zero-downtime model swap: the cycle cut, pool readiness, :class:`ModelSlot` with fake
detectors in real worker processes, the poller, and ``POST /v1/model``."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from inference_service.domain import FrameDetections, ImageSize, ModelInfo, Outcome, SwapReport
from inference_service.http_api import DetectLimits, Readiness, build_app
from inference_service.metrics import Metrics
from inference_service.pipeline.ordering import InFlight
from inference_service.pool import DetectorPool
from inference_service.pool.swap import ModelSlot
from inference_service.settings import Settings
from tests.unit.test_pool import INFO, FakeDetector, FakeFactory

pytestmark = pytest.mark.timeout(60)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


# ------------------------------------------------------------------------------ the cycle cut
def outcome(n: int, sha: str) -> Outcome:
    return Outcome(key=b"k", result={"n": n}, dead_letter=None, status="ok", model_sha256=sha)


async def done(value: Outcome) -> Outcome:
    return value


def test_a_cycle_takes_the_outcomes_of_one_model_only() -> None:
    async def scenario() -> None:
        lanes = InFlight()
        p0, p1 = ("t", 0), ("t", 1)
        for off, sha in enumerate(["old", "old", "new", "new"]):
            lanes.add(p0, off, asyncio.ensure_future(done(outcome(off, sha))), 1)
        for off, sha in enumerate(["old", "new"]):
            lanes.add(p1, off, asyncio.ensure_future(done(outcome(off, sha))), 1)
        await asyncio.sleep(0)
        assert lanes.ready() == 6
        same: Callable[[Outcome], object] = lambda o: o.model_sha256  # noqa: E731
        cycles = []
        while lanes.count:
            cycles.append([(f.partition[1], f.offset, f.outcome.model_sha256)
                           for f in lanes.take_finished(same=same)])  # fmt: skip
        assert cycles == [
            [(0, 0, "old"), (0, 1, "old"), (1, 0, "old")],
            [(0, 2, "new"), (0, 3, "new"), (1, 1, "new")],
        ]
        # without the key, one call takes everything finished, as before
        lanes = InFlight()
        for off, sha in enumerate(["old", "new"]):
            lanes.add(p0, off, asyncio.ensure_future(done(outcome(off, sha))), 1)
        await asyncio.sleep(0)
        assert len(lanes.take_finished()) == 2

    run(scenario())


# ------------------------------------------------------------------------------ pool readiness
def test_the_pool_stays_ready_while_one_replacement_worker_loads() -> None:
    async def go() -> None:
        async with DetectorPool(
            Settings(), FakeFactory(load_s=1.0), processes=2, threads=1
        ) as pool:
            found = await asyncio.gather(*(pool.detect(b"sleep:0.05") for _ in range(8)))
            pids = {f.image.height for f in found}
            assert pool.ready() and len(pids) == 2
            os.kill(next(iter(pids)), signal.SIGKILL)
            samples: list[tuple[bool, int]] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                stats = pool.stats()
                samples.append((pool.ready(), stats.ready_workers))
                if stats.worker_restarts == 1 and stats.ready_workers == 2:
                    break
                await asyncio.sleep(0.02)
            assert any(n == 1 for _, n in samples), "the replacement was never seen loading"
            assert all(ready for ready, _ in samples), "unready while a worker still served"
            assert samples[-1] == (True, 2)

    run(go())


def test_the_pool_is_not_ready_before_every_worker_was() -> None:
    async def go() -> None:
        pool = DetectorPool(Settings(), FakeFactory(load_s=0.5), processes=2, threads=1)
        assert not pool.ready()
        starting = asyncio.ensure_future(pool.start())
        await asyncio.sleep(0.2)
        assert not pool.ready()
        await starting
        assert pool.ready()
        await pool.stop()
        assert not pool.ready()

    run(go())


# ------------------------------------------------------------------------------ the slot
class ShaDetector(FakeDetector):
    """The fake detector under another identity; ``bad_smoke`` answers decoded frames wrongly."""

    def __init__(self, info: ModelInfo, bad_smoke: bool) -> None:
        self.info = info
        self.bad_smoke = bad_smoke

    def detect_array(self, image: Any) -> FrameDetections:
        if self.bad_smoke:
            return FrameDetections(ImageSize(1, 1), (), 0.0, 0.0, 0.0, 0.0)
        return super().detect_array(image)


@dataclass(frozen=True)
class ShaFactory:
    sha: str
    load_s: float = 0.0
    fail: bool = False
    bad_smoke: bool = False

    def __call__(self) -> ShaDetector:
        time.sleep(self.load_s)
        if self.fail:
            raise RuntimeError("not a model: random bytes")
        return ShaDetector(replace(INFO, sha256=self.sha * 64), self.bad_smoke)


class Models:
    """Model paths → what loading them gives (mutable: a file replaced in place)."""

    def __init__(self, **files: ShaFactory) -> None:
        self.files = files
        self.pools: list[DetectorPool] = []

    def pool(self, settings: Settings) -> DetectorPool:
        factory = self.files[str(settings.model)]
        pool = DetectorPool(settings, factory, processes=1, threads=1)
        self.pools.append(pool)
        return pool


async def started(models: Models, model: str = "a.pt") -> ModelSlot:
    slot = ModelSlot(Settings(model=model), models.pool)  # type: ignore[call-arg]
    await slot.start()
    assert slot.ready()
    return slot


def test_a_swap_serves_the_new_model_and_the_old_stops_after_its_last_lease() -> None:
    async def go() -> None:
        models = Models(**{"a.pt": ShaFactory("a"), "b.pt": ShaFactory("b")})
        slot = await started(models)
        try:
            assert slot.info.sha256 == "a" * 64 and slot.load_s > 0
            await slot.detect(b"ok:1")
            with slot.lease() as before:  # a record started before the swap
                report = await slot.swap("b.pt", trigger="http")
                assert report.outcome == "swapped", report
                assert report.model is not None and report.model.sha256 == "b" * 64
                assert report.previous is not None and report.previous.sha256 == "a" * 64
                assert slot.info.sha256 == "b" * 64 and slot.source == "b.pt"
                assert slot.ready()
                with slot.lease() as after:
                    assert after.info.sha256 == "b" * 64
                await asyncio.sleep(0.3)
                # the old pool serves the record that leased it, after the switch
                assert before.info.sha256 == "a" * 64 and before.ready()
                assert (await before.detect(b"ok:7")).image.width == 7
            old = models.pools[0]
            deadline = time.monotonic() + 10
            while old.ready() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not old.ready(), "the old pool did not stop after its last lease"
            assert slot.stats().completed >= 3  # the old pool's frames still count
            assert slot.last_swap == report and slot.outcomes["swapped"] == 1
        finally:
            await slot.stop()
        assert not any(p.ready() for p in models.pools)

    run(go())


@pytest.mark.parametrize(
    ("factory", "stage", "error"),
    [
        (ShaFactory("b", fail=True), "load", "random bytes"),
        (ShaFactory("b", bad_smoke=True), "smoke", "answered a 64×64 frame as 1×1"),
    ],
)
def test_a_model_that_fails_leaves_the_old_one_serving(
    factory: ShaFactory, stage: str, error: str
) -> None:
    async def go() -> None:
        models = Models(**{"a.pt": ShaFactory("a"), "broken.onnx": factory})
        slot = await started(models)
        try:
            report = await slot.swap("broken.onnx", trigger="http")
            assert (report.outcome, report.stage) == ("failed", stage), report
            assert error in report.error
            assert report.model is not None and report.model.sha256 == "a" * 64
            assert slot.info.sha256 == "a" * 64 and slot.source == "a.pt" and slot.ready()
            assert (await slot.detect(b"ok:3")).image.width == 3
            assert slot.last_swap == report and slot.outcomes["failed"] == 1
            assert not models.pools[1].ready()  # the failed model's workers are gone
            assert report.to_dict()["error"] == report.error
        finally:
            await slot.stop()

    run(go())


def test_a_swap_asked_for_meanwhile_is_busy_and_the_same_model_is_unchanged() -> None:
    async def go() -> None:
        models = Models(**{"a.pt": ShaFactory("a"), "b.pt": ShaFactory("b", load_s=1.0)})
        slot = await started(models)
        try:
            first = asyncio.ensure_future(slot.swap("b.pt", trigger="http"))
            await asyncio.sleep(0.2)
            assert slot.swapping
            busy = await slot.swap("a.pt", trigger="sighup")
            assert busy.outcome == "busy" and slot.ready()
            assert (await first).outcome == "swapped"
            same = await slot.swap(None, trigger="sighup")  # b.pt again, same content
            assert same.outcome == "unchanged" and slot.info.sha256 == "b" * 64
            bad = await slot.swap("s3://NOT_A_BUCKET/x.onnx", trigger="http")
            assert (bad.outcome, bad.stage) == ("failed", "model")
            assert "INFERENCE_MODEL" in bad.error
            assert dict(slot.outcomes) == {"swapped": 1, "busy": 1, "unchanged": 1, "failed": 1}
            assert slot.last_swap == bad  # busy ones are not kept as the last swap
        finally:
            await slot.stop()
        refused = await slot.swap("b.pt", trigger="http")
        assert refused.outcome == "refused"

    run(go())


def test_the_watch_swaps_when_the_version_changes_and_survives_errors() -> None:
    async def go() -> None:
        models = Models(**{"a.pt": ShaFactory("a")})
        slot = await started(models)
        version = {"a.pt": "v1"}
        reads: list[str] = []

        def read(settings: Settings) -> str:
            reads.append(str(settings.model))
            value = version[str(settings.model)]
            if value == "unreadable":
                raise OSError("no route to host")
            return value

        watch = asyncio.ensure_future(slot.watch(0.05, read))
        try:
            await asyncio.sleep(0.3)
            assert reads and not slot.outcomes  # the first read is the base, nothing swapped
            version["a.pt"] = "unreadable"
            await asyncio.sleep(0.2)
            assert not watch.done()
            models.files["a.pt"] = ShaFactory("c")  # the file replaced in place
            version["a.pt"] = "v2"
            deadline = time.monotonic() + 15
            while slot.outcomes["swapped"] < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert slot.info.sha256 == "c" * 64
            assert slot.last_swap is not None and slot.last_swap.trigger == "poll"
            await asyncio.sleep(0.3)
            assert sum(slot.outcomes.values()) == 1  # an unchanged version swaps nothing
        finally:
            watch.cancel()
            await slot.stop()

    run(go())


# ------------------------------------------------------------------------------ POST /v1/model
class FakeControl:
    def __init__(self, outcome: str = "swapped") -> None:
        self.outcome = outcome
        self.calls: list[tuple[str | None, str]] = []
        self.last_swap: SwapReport | None = None
        self.source = "a.pt"

    async def swap(self, model: str | None = None, *, trigger: str) -> SwapReport:
        self.calls.append((model, trigger))
        self.last_swap = SwapReport(
            self.outcome,  # type: ignore[arg-type]
            trigger,
            model or self.source,
            time.time(),
            0.5,
            model=INFO,
            stage="load" if self.outcome == "failed" else "",
            error="bad model" if self.outcome == "failed" else "",
        )
        return self.last_swap


class ReadyDetector:
    info = INFO

    async def detect(self, data: bytes, **_: Any) -> FrameDetections:
        return FrameDetections(ImageSize(1, 1), (), 0.0, 0.0, 0.0, 0.0)

    def ready(self) -> bool:
        return True


def swap_api(check: Callable[[Any, FakeControl], Coroutine[Any, Any, None]], outcome: str) -> None:
    async def go() -> None:
        control = FakeControl(outcome)
        token = DetectLimits.from_settings(Settings(http_token="tok")).token_sha256
        limits = DetectLimits(max_body_bytes=1 << 20, max_pending=4, token_sha256=token)
        app = build_app(ReadyDetector(), Metrics(), Readiness({}), limits, control=control)
        async with TestClient(TestServer(app)) as client:
            await check(client, control)

    run(go())


AUTH = {"Authorization": "Bearer tok"}


def test_post_model_needs_the_token_and_answers_with_the_swap() -> None:
    async def check(client: Any, control: FakeControl) -> None:
        r = await client.post("/v1/model", json={"model": "b.onnx"})
        assert r.status == 401 and control.calls == []
        assert "POST /v1/model" in (await r.json())["error"]["message"]
        r = await client.post("/v1/model", json={"model": "b.onnx"}, headers=AUTH)
        body = await r.json()
        assert r.status == 200 and body["outcome"] == "swapped" and body["requested"] == "b.onnx"
        r = await client.post("/v1/model", headers=AUTH)  # no body: reload the source
        assert r.status == 200 and control.calls[-1] == (None, "http")
        for bad in (b"[1]", b"not json", b'{"model": 3}'):
            r = await client.post("/v1/model", data=bad, headers=AUTH)
            assert r.status == 400, bad
        r = await client.get("/v1/model")
        body = await r.json()
        assert body["source"] == "a.pt" and body["last_swap"]["outcome"] == "swapped"
        assert body["sha256"] == INFO.sha256

    swap_api(check, "swapped")


@pytest.mark.parametrize(("outcome", "status"), [("failed", 422), ("busy", 409), ("refused", 503)])
def test_post_model_status_by_outcome(outcome: str, status: int) -> None:
    async def check(client: Any, control: FakeControl) -> None:
        r = await client.post("/v1/model", json={"model": "b.onnx"}, headers=AUTH)
        body = await r.json()
        assert r.status == status and body["outcome"] == outcome
        if outcome == "failed":
            assert (body["stage"], body["error"]) == ("load", "bad model")

    swap_api(check, outcome)
