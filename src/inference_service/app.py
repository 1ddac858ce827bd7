"""The composition root: settings → adapters → pipeline, HTTP, signals. Only ``serve`` uses it.

Signals: SIGTERM and SIGINT stop the service cleanly; SIGHUP reloads the serving model's source
(a zero-downtime swap, :class:`~inference_service.pool.swap.ModelSlot`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from inference_service.adapters.kafka import kafka_ready, message_limits, open_kafka
from inference_service.adapters.s3 import S3FrameStore
from inference_service.allocator import release_large_blocks
from inference_service.budget import FrameBudget
from inference_service.errors import ConfigError, InferenceError
from inference_service.http_api import DetectLimits, Readiness, build_app
from inference_service.metrics import Metrics
from inference_service.model.source import model_version
from inference_service.pipeline import Pipeline, PipelineConfig
from inference_service.pool.swap import ModelSlot
from inference_service.processing import Backoff, TaskProcessor
from inference_service.settings import Settings, env_name

log = logging.getLogger(__name__)


class _PoolMetrics:
    """Copies the pools' counters and the serving model into Prometheus metrics when
    ``/metrics`` is read."""

    def __init__(self, pool: ModelSlot, metrics: Metrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self._restarts = 0
        self._batches: dict[int, int] = {}
        self._swaps: dict[str, int] = {}

    def refresh(self) -> None:
        if self._pool.ready():
            info = self._pool.info
            self._metrics.show_model(info.name, info.sha256, info.runtime, info.precision)
            self._metrics.model_load_seconds.set(self._pool.load_s)
        for outcome, count in self._pool.outcomes.items():
            seen = self._swaps.get(outcome, 0)
            if count > seen:
                self._metrics.model_swaps.labels(outcome).inc(count - seen)
                self._swaps[outcome] = count
        stats = self._pool.stats()
        self._metrics.detector_in_flight.set(stats.in_flight)
        self._metrics.detector_pending.set(stats.pending)
        if stats.worker_restarts > self._restarts:
            self._metrics.worker_restarts.inc(stats.worker_restarts - self._restarts)
            self._restarts = stats.worker_restarts
        for size, calls in stats.batch_sizes.items():
            seen = self._batches.get(size, 0)
            for _ in range(calls - seen):
                self._metrics.batch_size.observe(size)
            self._batches[size] = calls


async def wait_for(
    what: str,
    check: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    timeout_s: float,
) -> bool:
    """Call ``check`` until it passes, with backoff, logging what is awaited. False if stopped."""
    backoff = Backoff(initial_s=0.5, max_s=10.0)
    started = time.monotonic()
    attempt = 0
    while not stop.is_set():
        try:
            await check()
        except InferenceError as exc:
            if not exc.retriable:
                raise
            waited = time.monotonic() - started
            if timeout_s and waited > timeout_s:
                raise ConfigError(
                    f"gave up waiting for {what} after {waited:.0f} s "
                    f"(INFERENCE_STARTUP_TIMEOUT_S): {exc}"
                ) from exc
            delay = backoff.delay(attempt)
            log.warning("waiting for %s (retry in %.1f s): %s", what, delay, exc)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            continue
        log.info("%s is ready", what)
        return True
    return False


async def serve(settings: Settings) -> int:
    """Run the service until SIGTERM or SIGINT; 0 on a clean stop."""
    release_large_blocks()  # frame-sized buffers go back to the OS when freed (see allocator)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopping = threading.Event()
    """The same request for the Kafka I/O thread, whose start-up retries must end on it."""
    pipeline: Pipeline | None = None
    metrics = Metrics()
    pool = ModelSlot(settings)
    swaps: set[asyncio.Future[object]] = set()
    """Swaps asked for by SIGHUP and the model's watch, kept until they end."""

    def in_background(work: Awaitable[object]) -> None:
        future = asyncio.ensure_future(work)
        swaps.add(future)
        future.add_done_callback(swaps.discard)

    def on_signal(signum: int) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()
        stopping.set()
        pool.drain()  # a worker that exits now (the whole group got the signal) is not replaced
        if pipeline is not None:
            pipeline.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    def on_hangup() -> None:
        log.info("received SIGHUP: reloading the model from %s", pool.source)
        in_background(pool.swap(None, trigger="sighup"))

    loop.add_signal_handler(signal.SIGHUP, on_hangup)

    store = S3FrameStore(settings)
    deps = {"kafka": False, "s3": False}
    frames = FrameBudget(settings.max_in_flight_bytes, largest_frame=settings.max_frame_bytes)
    processor = TaskProcessor(
        store,
        pool,
        settings.s3_bucket,
        budget=frames,
        allowed_buckets=settings.allowed_buckets(),
        lease=pool.lease,
    )
    if settings.allowed_buckets() is None:
        log.warning(
            "tasks may name any bucket the S3 credentials reach (%s=*)",
            env_name("s3_allowed_buckets"),
        )
    pool_metrics = _PoolMetrics(pool, metrics)
    readiness = Readiness(
        {
            "kafka": lambda: deps["kafka"] and pipeline is not None and pipeline.ready,
            "s3": lambda: deps["s3"] and processor.health.healthy,
            "model": pool.ready,
        }
    )
    app = build_app(
        pool,
        metrics,
        readiness,
        DetectLimits.from_settings(settings),
        refresh_metrics=pool_metrics.refresh,
        control=pool,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    log.info("HTTP on %s:%d (/healthz /readyz /metrics /v1/model /v1/detect)",
             settings.http_host, settings.http_port)  # fmt: skip
    if settings.http_token is None:
        log.warning(
            "POST /v1/detect and POST /v1/model take requests without a token: set %s (or %s) "
            "to require one",
            env_name("http_token_file"),
            env_name("http_token"),
        )
    try:
        pool_start = asyncio.ensure_future(pool.start())

        async def check_kafka() -> None:
            await asyncio.to_thread(kafka_ready, settings)

        async def check_s3() -> None:
            await store.check(settings.s3_bucket)

        kafka_what = f"Kafka at {settings.kafka_bootstrap_servers}"
        s3_what = f"S3 at {settings.s3_endpoint_url or 'AWS'} (bucket {settings.s3_bucket!r})"
        if not await wait_for(kafka_what, check_kafka, stop, settings.startup_timeout_s):
            return 0
        deps["kafka"] = True
        processor.limits = await asyncio.to_thread(message_limits, settings)
        if not await wait_for(s3_what, check_s3, stop, settings.startup_timeout_s):
            return 0
        deps["s3"] = True
        await pool_start
        if stop.is_set():
            return 0
        info = pool.info
        log.info(
            "model %s (sha256 %s…) on %s, %d workers × %d threads, loaded in %.1f s",
            *(info.name, info.sha256[:12], info.runtime, pool.processes, pool.threads),
            pool.load_s,
        )
        if settings.model_poll_s:
            in_background(pool.watch(settings.model_poll_s, model_version))
        io, source, sink = open_kafka(settings, metrics, processor.limits, stopping)
        pipeline = Pipeline(
            PipelineConfig.from_settings(settings), source, sink, processor, metrics
        )
        try:
            await pipeline.run()
        except InferenceError as exc:
            if not (exc.retriable and stop.is_set()):
                raise
            log.warning("stopped before Kafka was ready: %s", exc)
        finally:
            io.shutdown()
        log.info("stopped cleanly")
        return 0
    finally:
        pool.drain()
        for future in list(swaps):
            future.cancel()
        await asyncio.gather(*swaps, return_exceptions=True)
        await pool.stop()
        await runner.cleanup()
