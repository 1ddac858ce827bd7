"""HTTP on port 8003: health, readiness, metrics, the model, and detection without Kafka."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from inference_service.errors import ErrorCode, TaskError
from inference_service.metrics import Metrics
from inference_service.ports import AsyncDetector
from inference_service.results import Identity, build_result, stage_timings

log = logging.getLogger(__name__)

STATUS_BY_CODE = {
    ErrorCode.FRAME_TOO_LARGE: 413,
    ErrorCode.UNDECODABLE_FRAME: 422,
    ErrorCode.INVALID_TASK: 400,
    ErrorCode.FRAME_NOT_FOUND: 404,
    ErrorCode.INFERENCE_FAILED: 500,
}


@dataclass(frozen=True, slots=True)
class Readiness:
    """Named checks; the service is ready when all pass."""

    checks: dict[str, Callable[[], bool]]

    def report(self) -> dict[str, bool]:
        return {name: bool(check()) for name, check in self.checks.items()}


def build_app(
    detector: AsyncDetector,
    metrics: Metrics,
    readiness: Readiness,
    max_body_bytes: int,
    refresh_metrics: Callable[[], None] | None = None,
) -> web.Application:
    """The aiohttp application; no I/O until it is run."""
    app = web.Application(client_max_size=max_body_bytes)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_request: web.Request) -> web.Response:
        report = readiness.report()
        ready = all(report.values())
        return web.json_response({"ready": ready, "checks": report}, status=200 if ready else 503)

    async def metrics_view(_request: web.Request) -> web.Response:
        body = metrics.render(refresh_metrics)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def model(_request: web.Request) -> web.Response:
        info = detector.info
        body = info.to_dict()
        body["classes"] = {str(i): name for i, name in enumerate(info.classes)}
        body["input_size"] = list(info.imgsz)
        return web.json_response(body)

    async def detect(request: web.Request) -> web.Response:
        started = time.perf_counter()
        data = await request.read()
        name = request.query.get("name", "")
        task_id = f"http:{uuid.uuid4()}"
        try:
            found = await detector.detect(data)
        except TaskError as exc:
            metrics.results.labels(str(exc.code)).inc()
            identity = Identity(task_id, "", None, "", name or None)
            timings = stage_timings(None, total_ms=(time.perf_counter() - started) * 1000)
            failed = build_result(identity, detector.info, timings, error=exc)
            return web.json_response(failed.to_dict(), status=STATUS_BY_CODE.get(exc.code, 400))
        identity = Identity(task_id, "", 0, "", name or None)
        timings = stage_timings(found, total_ms=(time.perf_counter() - started) * 1000)
        result = build_result(identity, detector.info, timings, found=found)
        metrics.results.labels("ok").inc()
        metrics.observe_timings(result.timings_ms)
        return web.json_response(result.to_dict())

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/v1/model", model)
    app.router.add_post("/v1/detect", detect)
    return app
