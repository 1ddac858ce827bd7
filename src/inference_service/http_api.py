"""HTTP on port 8003: health, readiness, metrics, the model, and detection without Kafka.

``/healthz``, ``/readyz``, ``/metrics`` and ``GET /v1/model`` are open, for probes and scrapers.
``POST /v1/model`` swaps the model (:class:`ModelControl`) and needs the token as detection does.
``POST /v1/detect`` shares the detector workers with the Kafka pipeline, so it is bounded
(:class:`DetectLimits`): a bearer token when one is set (401), a body size (413), a number of
requests at once (503 with ``Retry-After``), and its frames go to the workers only when no
pipeline frame waits (:attr:`~inference_service.domain.Priority.INTERACTIVE`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

# aiohttp's own answer to "Expect: 100-continue" (it is not exported): sent when nothing refuses.
from aiohttp.web_urldispatcher import _default_expect_handler

from inference_service.domain import Priority, SwapReport
from inference_service.errors import ErrorCode, FrameTooLargeError, TaskError
from inference_service.metrics import Metrics
from inference_service.ports import AsyncDetector
from inference_service.results import Identity, build_result, stage_timings
from inference_service.settings import Settings, env_name

log = logging.getLogger(__name__)

STATUS_BY_CODE = {
    ErrorCode.FRAME_TOO_LARGE: 413,
    ErrorCode.UNDECODABLE_FRAME: 422,
    ErrorCode.INVALID_TASK: 400,
    ErrorCode.FRAME_NOT_FOUND: 404,
    ErrorCode.FRAME_FORBIDDEN: 403,
    ErrorCode.INFERENCE_FAILED: 500,
    ErrorCode.INFERENCE_TIMEOUT: 504,
}


RETRY_AFTER_S = 1
"""``Retry-After`` of a 503 from ``/v1/detect``: one frame takes tens of milliseconds, so a slot is
usually free again within a second."""


@dataclass(frozen=True, slots=True)
class DetectLimits:
    """What ``POST /v1/detect`` admits (built from :class:`Settings` by :meth:`from_settings`)."""

    max_body_bytes: int
    """Largest request body; a bigger one gets 413 before it is read, or as soon as it is."""
    max_pending: int
    """Most requests being read, waiting for a worker or detected at once; one more gets 503."""
    token_sha256: bytes | None = field(default=None, repr=False)
    """SHA-256 of the bearer token required (None: no token). Only the digest is kept, and the
    digests are compared, so that the comparison takes the same time whatever is sent."""

    @classmethod
    def from_settings(cls, settings: Settings) -> DetectLimits:
        token = settings.http_token
        return cls(
            max_body_bytes=settings.http_max_body_bytes,
            max_pending=settings.http_max_pending,
            token_sha256=None if token is None else _digest(token.get_secret_value()),
        )

    def authorized(self, header: str | None) -> bool:
        """True when no token is required, or ``header`` is ``Bearer <the token>``."""
        if self.token_sha256 is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(_digest(given.strip()), self.token_sha256)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _refusal(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """A refused request's JSON body, ``{"error": {"code", "message"}}`` (not a result: no
    detection was attempted)."""
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


SWAP_STATUS = {"swapped": 200, "unchanged": 200, "failed": 422, "busy": 409, "refused": 503}
"""The status of ``POST /v1/model`` by the swap's outcome (the body is the swap's report)."""


class ModelControl(Protocol):
    """What ``/v1/model`` needs to swap the model and say how the last swap went."""

    @property
    def source(self) -> str:
        """The serving model's path or URI."""
        ...

    @property
    def last_swap(self) -> SwapReport | None: ...

    async def swap(self, model: str | None = None, *, trigger: str) -> SwapReport:
        """Swap to ``model`` (None: reload the serving model's source); returns once done."""
        ...


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
    limits: DetectLimits,
    refresh_metrics: Callable[[], None] | None = None,
    control: ModelControl | None = None,
) -> web.Application:
    """The aiohttp application; no I/O until it is run. Without ``control`` the model cannot
    be swapped (no ``POST /v1/model``)."""
    # aiohttp refuses a body over client_max_size while reading it (a chunked one has no length).
    app = web.Application(client_max_size=limits.max_body_bytes)
    admitted = 0  # /v1/detect requests now past the checks (one event loop: no lock needed)

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
        if control is not None:
            body["source"] = control.source
            last = control.last_swap
            body["last_swap"] = last.to_dict() if last is not None else None
        return web.json_response(body)

    def unauthorized(request: web.Request) -> web.Response | None:
        """401 unless the request carries the token (or none is required)."""
        if limits.authorized(request.headers.get("Authorization")):
            return None
        metrics.http_rejected.labels("unauthorized").inc()
        return _refusal(
            401,
            "unauthorized",
            f"{request.method} {request.path} needs the header 'Authorization: Bearer <token>' "
            f"with the service's token ({env_name('http_token')})",
            {"WWW-Authenticate": 'Bearer realm="inference-service"'},
        )

    async def swap_model(request: web.Request) -> web.Response:
        assert control is not None
        refused = unauthorized(request)
        if refused is not None:
            return refused
        raw = await request.read()
        try:
            given = json.loads(raw) if raw.strip() else {}
        except ValueError:
            given = None
        model = given.get("model") if isinstance(given, dict) else None
        if not isinstance(given, dict) or not (model is None or isinstance(model, str)):
            return _refusal(
                400,
                "invalid_request",
                'expected a JSON object {"model": "<path or s3:// URI>"} (or an empty body: '
                "reload the serving model's source)",
            )
        report = await control.swap(model, trigger="http")
        return web.json_response(report.to_dict(), status=SWAP_STATUS[report.outcome])

    def too_large(request: web.Request, started: float, size: str) -> web.Response:
        """413 as the result of a ``frame_too_large`` error, like a frame the worker refuses."""
        exc = FrameTooLargeError(
            f"the request body ({size}) is over {limits.max_body_bytes} bytes "
            f"({env_name('http_max_body_bytes')})"
        )
        metrics.http_rejected.labels("too_large").inc()
        name = request.query.get("name", "")
        identity = Identity(f"http:{uuid.uuid4()}", "", None, "", name or None)
        timings = stage_timings(None, total_ms=(time.perf_counter() - started) * 1000)
        failed = build_result(identity, detector.info, timings, error=exc)
        return web.json_response(failed.to_dict(), status=413)

    def refusal(request: web.Request, started: float) -> web.Response | None:
        """The answer to a detection that cannot be taken now (None: it can).

        Decided before the body is read, so that a refused body is never held in memory; and
        for a client that sends ``Expect: 100-continue`` (curl does for large bodies), before
        the body is even sent.
        """
        refused = unauthorized(request)
        if refused is not None:
            return refused
        if not detector.ready():
            metrics.http_rejected.labels("not_ready").inc()
            return _refusal(
                503,
                "not_ready",
                "the detector workers are not ready yet",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        length = request.content_length
        if length is not None and length > limits.max_body_bytes:
            return too_large(request, started, f"{length} bytes")
        if admitted >= limits.max_pending:
            metrics.http_rejected.labels("busy").inc()
            return _refusal(
                503,
                "busy",
                f"{admitted} detections are under way, the most at once "
                f"({env_name('http_max_pending')}); retry later",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        return None

    async def detect_expect(request: web.Request) -> web.StreamResponse | None:
        refused = refusal(request, time.perf_counter())
        if refused is not None:
            return refused  # sent instead of "100 Continue": the client keeps its body
        await _default_expect_handler(request)
        return None

    async def detect(request: web.Request) -> web.Response:
        nonlocal admitted
        started = time.perf_counter()
        refused = refusal(request, started)
        if refused is not None:
            return refused
        admitted += 1
        metrics.http_pending.set(admitted)
        try:
            return await detect_admitted(request, started)
        finally:
            admitted -= 1
            metrics.http_pending.set(admitted)

    async def detect_admitted(request: web.Request, started: float) -> web.Response:
        name = request.query.get("name", "")
        task_id = f"http:{uuid.uuid4()}"
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:  # no Content-Length (chunked), found while reading
            return too_large(request, started, "sent chunked")
        try:
            found = await detector.detect(data, priority=Priority.INTERACTIVE)
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
    if control is not None:
        app.router.add_post("/v1/model", swap_model)
    app.router.add_post("/v1/detect", detect, expect_handler=detect_expect)
    return app
