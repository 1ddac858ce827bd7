"""The HTTP API's limits on POST /v1/detect, through aiohttp's test client and a fake detector."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from inference_service.domain import FrameDetections, ImageSize, ModelInfo, Priority
from inference_service.http_api import RETRY_AFTER_S, DetectLimits, Readiness, build_app
from inference_service.metrics import Metrics
from inference_service.settings import Settings

pytestmark = pytest.mark.timeout(30)

INFO = ModelInfo(
    name="fake.pt", sha256="0" * 64, imgsz=(64, 64), conf=0.25, iou=0.45, runtime="fake/fp32"
)
TOKEN = "s3cr3t-token"


class GatedDetector:
    """Answers every frame once ``gate`` is set; records each call's size and priority."""

    info = INFO

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[tuple[int, Priority]] = []
        self.is_ready = True

    async def detect(
        self, data: bytes, *, priority: Priority = Priority.PIPELINE
    ) -> FrameDetections:
        self.calls.append((len(data), priority))
        await self.gate.wait()
        return FrameDetections(ImageSize(3, 2), (), 0.0, 0.0, 0.0, 0.0)

    def ready(self) -> bool:
        return self.is_ready


Client = TestClient[Any, Any]
Check = Callable[[Client, GatedDetector, Metrics], Awaitable[None]]


def serve(check: Check, **limits: Any) -> None:
    """Run ``check`` against the app with the given :class:`DetectLimits` fields."""
    given: dict[str, Any] = {"max_body_bytes": 8 * 1024 * 1024, "max_pending": 8}
    given.update(limits)

    async def go() -> None:
        detector = GatedDetector()
        metrics = Metrics()
        app = build_app(
            detector, metrics, Readiness({"model": detector.ready}), DetectLimits(**given)
        )
        async with TestClient(TestServer(app)) as client:
            await check(client, detector, metrics)

    asyncio.run(go())


def rejected(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("inference_http_rejected_total", {"reason": reason})
    return value or 0.0


def with_token(token: str = TOKEN) -> dict[str, Any]:
    return {"token_sha256": DetectLimits.from_settings(Settings(http_token=token)).token_sha256}


# --- token -----------------------------------------------------------------------------------


def test_detect_needs_the_token_and_probes_stay_open() -> None:
    async def check(client: Client, detector: GatedDetector, metrics: Metrics) -> None:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": "Bearer"},
        ):
            r = await client.post("/v1/detect", data=b"img", headers=headers)
            assert r.status == 401, headers
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            body = await r.json()
            assert body["error"]["code"] == "unauthorized"
            assert "INFERENCE_HTTP_TOKEN" in body["error"]["message"]
            assert TOKEN not in await r.text()
        assert detector.calls == []  # nothing reached the workers
        assert rejected(metrics, "unauthorized") == 5
        for scheme in ("Bearer", "bearer"):
            r = await client.post(
                "/v1/detect", data=b"img", headers={"Authorization": f"{scheme} {TOKEN}"}
            )
            assert r.status == 200, await r.text()
            assert (await r.json())["status"] == "ok"
        for path in ("/healthz", "/readyz", "/metrics", "/v1/model"):
            assert (await client.get(path)).status == 200, path

    serve(check, **with_token())


def test_without_a_token_setting_detect_is_open() -> None:
    async def check(client: Client, detector: GatedDetector, metrics: Metrics) -> None:
        r = await client.post("/v1/detect", data=b"img")
        assert r.status == 200
        assert detector.calls == [(3, Priority.INTERACTIVE)]

    serve(check)


def test_limits_keep_only_a_digest_of_the_token() -> None:
    limits = DetectLimits.from_settings(Settings(http_token=TOKEN))
    assert TOKEN not in repr(limits) and TOKEN.encode() not in (limits.token_sha256 or b"")
    assert limits.authorized(f"Bearer {TOKEN}") and not limits.authorized(None)
    assert DetectLimits.from_settings(Settings()).authorized(None)


# --- body size -------------------------------------------------------------------------------


def test_a_body_over_the_limit_gets_413_before_the_detector() -> None:
    async def check(client: Client, detector: GatedDetector, metrics: Metrics) -> None:
        r = await client.post("/v1/detect", data=b"x" * 4097)
        assert r.status == 413
        result = await r.json()
        assert result["status"] == "error" and result["error"]["code"] == "frame_too_large"
        assert "INFERENCE_HTTP_MAX_BODY_BYTES" in result["error"]["message"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: found while reading
            for _ in range(8):
                yield b"x" * 1024

        r = await client.post("/v1/detect", data=chunks())
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "frame_too_large"
        assert detector.calls == []
        assert rejected(metrics, "too_large") == 2
        r = await client.post("/v1/detect", data=b"x" * 4096)  # at the limit: taken
        assert r.status == 200

    serve(check, max_body_bytes=4096)


# --- how many at once ------------------------------------------------------------------------


async def wait_calls(detector: GatedDetector, n: int) -> None:
    while len(detector.calls) < n:
        await asyncio.sleep(0.005)


def test_over_max_pending_gets_503_with_retry_after_until_a_slot_frees() -> None:
    async def check(client: Client, detector: GatedDetector, metrics: Metrics) -> None:
        detector.gate.clear()
        held = [asyncio.ensure_future(client.post("/v1/detect", data=b"a" * 10)) for _ in range(2)]
        await wait_calls(detector, 2)
        # A large body is refused before it is read; the client still gets the answer.
        for body in (b"b", b"c" * (5 * 1024 * 1024)):
            r = await client.post("/v1/detect", data=body)
            assert r.status == 503
            assert r.headers["Retry-After"] == str(RETRY_AFTER_S)
            error = (await r.json())["error"]
            assert error["code"] == "busy" and "INFERENCE_HTTP_MAX_PENDING" in error["message"]
        assert rejected(metrics, "busy") == 2
        gauge = metrics.registry.get_sample_value("inference_http_pending")
        assert gauge == 2
        detector.gate.set()
        assert [(await r).status for r in held] == [200, 200]
        assert metrics.registry.get_sample_value("inference_http_pending") == 0
        r = await client.post("/v1/detect", data=b"d")
        assert r.status == 200
        assert len(detector.calls) == 3  # the refused ones never reached the detector
        assert {p for _n, p in detector.calls} == {Priority.INTERACTIVE}

    serve(check, max_pending=2)


def test_expect_100_continue_is_refused_before_the_body_is_sent() -> None:
    """A client asking ``Expect: 100-continue`` gets the refusal instead of the go-ahead."""

    async def check(client: Client, detector: GatedDetector, metrics: Metrics) -> None:
        r = await client.post("/v1/detect", data=b"x" * 100, expect100=True)
        assert r.status == 200  # nothing refuses: "100 Continue", then the usual answer
        r = await client.post("/v1/detect", data=b"x" * 5000, expect100=True)
        assert r.status == 413 and (await r.json())["error"]["code"] == "frame_too_large"
        detector.gate.clear()
        held = asyncio.ensure_future(client.post("/v1/detect", data=b"a"))
        await wait_calls(detector, 2)
        r = await client.post("/v1/detect", data=b"b" * 3000, expect100=True)
        assert r.status == 503 and r.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert (await r.json())["error"]["code"] == "busy"
        assert rejected(metrics, "busy") == 1 and rejected(metrics, "too_large") == 1
        detector.gate.set()
        assert (await held).status == 200
        assert [n for n, _p in detector.calls] == [100, 1]

    serve(check, max_pending=1, max_body_bytes=4096)


def test_a_failed_detection_frees_its_slot() -> None:
    async def check(client: Client, detector: GatedDetector, metrics: Metrics) -> None:
        from inference_service.errors import UndecodableFrameError

        async def fail(data: bytes, *, priority: Priority = Priority.PIPELINE) -> FrameDetections:
            raise UndecodableFrameError("not an image")

        detector.detect = fail  # type: ignore[method-assign]
        for _ in range(3):
            r = await client.post("/v1/detect", data=b"x")
            assert r.status == 422
        assert metrics.registry.get_sample_value("inference_http_pending") == 0

    serve(check, max_pending=1)


def test_before_the_workers_are_ready_detect_gets_503() -> None:
    async def check(client: Client, detector: GatedDetector, metrics: Metrics) -> None:
        detector.is_ready = False
        r = await client.post("/v1/detect", data=b"x")
        assert r.status == 503 and r.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert (await r.json())["error"]["code"] == "not_ready"
        assert rejected(metrics, "not_ready") == 1 and detector.calls == []

    serve(check)


def test_limits_come_from_the_settings() -> None:
    limits = DetectLimits.from_settings(Settings(http_max_body_bytes=2048, http_max_pending=3))
    assert (limits.max_body_bytes, limits.max_pending, limits.token_sha256) == (2048, 3, None)
    defaults = DetectLimits.from_settings(Settings())
    assert defaults.max_body_bytes == 8 * 1024 * 1024 < Settings().max_frame_bytes
    assert defaults.max_pending == 8
