"""The detector pool: N worker processes, each owning one model, behind an asyncio API.

Shape (one job per part)::

    event loop ── detect(bytes) ──► pending deque ──► least-loaded ready worker's task queue
                                                          │ (mp.Queue of encoded frames)
                                    worker process i: T threads ── detector.detect ──┐
    futures ◄── call_soon_threadsafe ◄── monitor thread ◄── result pipe of worker i ◄┘
                                              │
                                              └── notices a dead worker (process sentinel), starts
                                                  a replacement, re-queues its in-flight frames

* Workers are started with the ``spawn`` context and load the model once, through a picklable
  factory, then warm it up and report ``ready``.
* Frames travel as encoded bytes (or a raw ``uint8`` buffer for decoded video frames), never as
  pickled arrays.
* Every worker has its own task queue and result pipe, so a worker killed mid-write can corrupt only
  channels that are thrown away with it.
* A frame whose worker dies is retried on another (or the replacement) worker up to
  ``settings.worker_retries`` times, then fails with :class:`InferenceFailedError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as MpEvent
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from inference_service.domain import FrameDetections, ModelInfo
from inference_service.errors import ConfigError, InferenceFailedError, ModelError, TaskError
from inference_service.ports import FrameDetector
from inference_service.settings import Settings

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from inference_service.model.resolve import ResolvedModel

log = logging.getLogger(__name__)

DetectorFactory = Callable[[], FrameDetector]
"""Builds the detector inside a worker process; must be picklable (module-level or a partial)."""

_START_CRASHES = 3
"""Deaths of one worker before the pool was first ready after which start() gives up."""

_POLL_S = 0.2
"""How often blocked loops look at their stop flags (well under the one-second promise)."""


class _ArrayDetector(Protocol):
    def detect_array(self, image_bgr: npt.NDArray[np.uint8]) -> FrameDetections: ...


# --------------------------------------------------------------------------------------------
# Sizing


def available_cpus() -> int:
    """CPUs this process may run on (the container's share, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def plan_workers(settings: Settings, cpu_count: int) -> tuple[int, int]:
    """``(processes, inference threads per process)`` for ``INFERENCE_WORKERS/THREADS``.

    Explicit settings win; ``auto`` fills in the rest by a rule measured on a 2-core Zen 5
    (AVX-512, native bf16), yolov8n/yolov8s on 1280x720 JPEG frames (``make bench-detector``,
    ``bench/results/sweep.md``):

    * one process per CPU, one inference thread each: with ONNX Runtime and OpenVINO, fp32 and
      bf16, P processes × 1 thread beat 1 process × P threads (intra-op threads synchronise per
      layer and leave JPEG decode, letterbox and NMS serial), and P × 1 beat P × 2
      (oversubscription);
    * when ``workers`` is given and ``threads`` is auto: ``max(1, cpus // workers)`` threads;
    * when ``threads`` is given and ``workers`` is auto: ``max(1, cpus // threads)`` processes.

    Memory is the other bound: each process holds its own model (yolov8n ~60 MB RSS with a runtime,
    yolov8s ~120 MB); the rule does not cap processes for it.
    """
    cpus = max(1, cpu_count)
    workers, threads = settings.workers, settings.threads
    if workers != "auto" and threads != "auto":
        return workers, threads
    if workers != "auto":
        return workers, max(1, cpus // workers)
    if threads != "auto":
        return max(1, cpus // threads), threads
    return cpus, 1


# --------------------------------------------------------------------------------------------
# The worker process


def load_default_detector(
    resolved: ResolvedModel, settings: Settings, threads: int
) -> FrameDetector:
    """The default factory body: the service's own detector (imported in the worker only)."""
    from inference_service.detector import load_detector

    return load_detector(resolved, settings, threads)


def _warm_up(detector: FrameDetector) -> None:
    if getattr(detector, "warmed_up", False):
        return
    warm = getattr(detector, "warmup", None)
    if callable(warm):
        warm()
        return
    import cv2
    import numpy as np

    h, w = detector.info.imgsz
    image = np.full((max(h, 32), max(w, 32), 3), 114, dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", image)
    if ok:
        detector.detect(buf.tobytes())


@dataclass(frozen=True, slots=True)
class _RawFrame:
    """A decoded BGR frame sent as its raw buffer (no pickled array)."""

    data: bytes
    height: int
    width: int


def _run_one(detector: FrameDetector, payload: bytes | _RawFrame) -> FrameDetections:
    if isinstance(payload, bytes):
        return detector.detect(payload)
    import numpy as np

    image = np.frombuffer(payload.data, dtype=np.uint8).reshape(payload.height, payload.width, 3)
    detect_array: Callable[[Any], FrameDetections] = getattr(detector, "detect_array")  # noqa: B009
    return detect_array(image)


def _error_payload(exc: BaseException) -> TaskError:
    """What travels back for a failed frame: the same TaskError type, or inference_failed."""
    if isinstance(exc, TaskError):
        try:
            return type(exc)(exc.message)
        except Exception:
            return InferenceFailedError(exc.message)
    return InferenceFailedError(f"{type(exc).__name__}: {exc}")


def _worker_main(
    index: int,
    factory: DetectorFactory,
    tasks: multiprocessing.Queue[tuple[int, bytes | _RawFrame] | None],
    results: multiprocessing.connection.Connection,
    stop: MpEvent,
    pullers: int,
    log_level: int = logging.WARNING,
) -> None:
    """Entry point of a worker process: load, warm up, then serve frames until told to stop."""
    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s %(name)s [%(processName)s]: %(message)s",
    )
    parent = os.getppid()
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            results.send(message)

    try:
        detector = factory()
        _warm_up(detector)
    except BaseException as exc:  # the parent turns this into a start-up error
        send(("fatal", type(exc).__name__, str(exc)))
        results.close()
        return
    send(("ready", detector.info))
    halt = threading.Event()

    def pull() -> None:
        while not halt.is_set():
            try:
                item = tasks.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is None:  # the parent's "no more work"
                halt.set()
                return
            job_id, payload = item
            try:
                result = _run_one(detector, payload)
            except BaseException as exc:
                send(("done", job_id, None, _error_payload(exc)))
            else:
                send(("done", job_id, result, None))

    threads = [
        threading.Thread(target=pull, name=f"detector-{index}-pull-{n}", daemon=True)
        for n in range(pullers)
    ]
    for t in threads:
        t.start()
    while not halt.is_set() and not stop.wait(_POLL_S):
        if os.getppid() != parent:  # orphaned: the service is gone
            break
    halt.set()
    deadline = time.monotonic() + 2.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    results.close()
    os._exit(0)  # skip runtime atexit handlers that may wait on their own thread pools


# --------------------------------------------------------------------------------------------
# The parent side


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of the pool's counters (for ``/metrics``)."""

    workers: int
    """Worker processes configured."""
    ready_workers: int
    """Workers that have loaded and warmed their model."""
    in_flight: int
    """Frames sent to a worker and not yet answered."""
    pending: int
    """Frames waiting for a worker with room."""
    completed: int
    """Frames answered with detections."""
    failed: int
    """Frames answered with an error (including inference_failed after retries)."""
    worker_restarts: int
    """Workers replaced after they died."""
    batch_sizes: dict[int, int]
    """Frames per inference call → number of calls (all 1 without micro-batching)."""


@dataclass(slots=True)
class _Job:
    payload: bytes | _RawFrame
    future: asyncio.Future[FrameDetections]
    loop: asyncio.AbstractEventLoop
    attempts: int = 0


@dataclass(slots=True)
class _Worker:
    index: int
    process: BaseProcess
    tasks: multiprocessing.Queue[tuple[int, bytes | _RawFrame] | None]
    results: multiprocessing.connection.Connection
    stop: MpEvent
    started_at: float
    ready: bool = False
    in_flight: set[int] = field(default_factory=set)


class DetectorPool:
    """Detection in worker processes behind :class:`~inference_service.ports.AsyncDetector`.

    ``factory`` builds the detector in each worker; without it the pool resolves
    ``settings.model`` (once, in the parent) and loads the service's detector. ``processes`` and
    ``threads`` default to :func:`plan_workers`; ``pullers`` is the number of threads per worker
    taking frames (so one decodes while another infers); ``in_flight_per_worker`` bounds the frames
    queued at one worker.
    """

    def __init__(
        self,
        settings: Settings,
        factory: DetectorFactory | None = None,
        *,
        processes: int | None = None,
        threads: int | None = None,
        pullers: int | None = None,
        in_flight_per_worker: int | None = None,
        start_timeout_s: float = 300.0,
    ) -> None:
        planned = plan_workers(settings, available_cpus())
        self._settings = settings
        self._factory = factory
        self._processes = processes or planned[0]
        self._threads = threads or planned[1]
        self._pullers = pullers or 2
        self._cap = in_flight_per_worker or self._pullers + 1
        self._start_timeout_s = start_timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._jobs: dict[int, _Job] = {}
        self._pending: collections.deque[int] = collections.deque()
        self._next_id = 0
        self._info: ModelInfo | None = None
        self._fatal: str | None = None
        self._completed = 0
        self._failed = 0
        self._restarts = 0
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._crash_streak: dict[int, int] = {}
        self._respawn_at: dict[int, float] = {}
        self._monitor: threading.Thread | None = None
        self._closing = threading.Event()
        self._started = False
        self._stopped = False
        self._all_ready = threading.Event()
        self._ever_ready = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers and wait until every one has loaded and warmed its model.

        Raises :class:`ModelError` when a worker cannot load the model.
        """
        if self._started:
            return
        if self._factory is None:
            self._factory = await asyncio.to_thread(self._default_factory)
        self._started = True
        with self._lock:
            for i in range(self._processes):
                self._workers.append(self._spawn(i))
        self._monitor = threading.Thread(
            target=self._monitor_loop, name="pool-monitor", daemon=True
        )
        self._monitor.start()
        ok = await asyncio.to_thread(self._wait_ready, self._start_timeout_s)
        if not ok and self._closing.is_set():
            log.info("detector pool stopped before it was ready")
            return
        if not ok:
            reason = self._fatal or f"workers not ready after {self._start_timeout_s:.0f} s"
            await self.stop()
            raise ModelError(f"detector workers failed to start: {reason}")
        log.info(
            "detector pool ready: %d processes × %d threads (%d pullers, %d in flight each), %s",
            self._processes,
            self._threads,
            self._pullers,
            self._cap,
            self.info.runtime,
        )

    def _default_factory(self) -> DetectorFactory:
        from inference_service.model.resolve import resolve_model

        resolved = resolve_model(self._settings)
        return functools.partial(load_default_detector, resolved, self._settings, self._threads)

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._fatal is not None or self._closing.is_set():
                return False
            if self._all_ready.wait(_POLL_S):
                return True
        return False

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stop the workers; frames not answered within ``drain_timeout_s`` are cancelled."""
        if not self._started or self._stopped:
            self._stopped = True
            return
        deadline = time.monotonic() + drain_timeout_s
        while self._jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._stopped = True
        self._closing.set()
        await asyncio.to_thread(self._shutdown_workers)
        with self._lock:
            jobs, self._jobs = self._jobs, {}
            self._pending.clear()
        for job in jobs.values():
            self._settle(job, None, None, cancel=True)

    def _shutdown_workers(self) -> None:
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            w.stop.set()
            for _ in range(self._pullers):  # wake every puller now rather than at its next poll
                with contextlib.suppress(ValueError, OSError):
                    w.tasks.put(None)
        if self._monitor is not None:
            self._monitor.join(2.0)
        deadline = time.monotonic() + 3.0
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                log.warning("detector worker %d did not stop in time; killing it", w.index)
                w.process.kill()
                w.process.join(1.0)
            self._close_channels(w)

    async def __aenter__(self) -> DetectorPool:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __del__(self) -> None:
        if getattr(self, "_started", False) and not getattr(self, "_stopped", True):
            warnings.warn(
                "DetectorPool was started but never stopped", ResourceWarning, stacklevel=1
            )

    # --- AsyncDetector -----------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise ConfigError("the detector pool has no model yet: await pool.start() first")
        return self._info

    def ready(self) -> bool:
        return self._started and not self._stopped and self._all_ready.is_set()

    async def detect(self, data: bytes) -> FrameDetections:
        """Detections of one encoded frame (JPEG, PNG, ...), computed in a worker process."""
        return await self._submit(data)

    async def detect_array(self, image_bgr: npt.NDArray[np.uint8]) -> FrameDetections:
        """Detections of one decoded BGR frame (``H×W×3 uint8``), sent as its raw buffer."""
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
            raise ValueError(f"expected an H×W×3 BGR image, got shape {image_bgr.shape}")
        h, w = int(image_bgr.shape[0]), int(image_bgr.shape[1])
        return await self._submit(_RawFrame(image_bgr.tobytes(), h, w))

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                workers=self._processes,
                ready_workers=sum(1 for w in self._workers if w.ready),
                in_flight=sum(len(w.in_flight) for w in self._workers),
                pending=len(self._pending),
                completed=self._completed,
                failed=self._failed,
                worker_restarts=self._restarts,
                batch_sizes=dict(self._batch_sizes),
            )

    @property
    def processes(self) -> int:
        return self._processes

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def pullers(self) -> int:
        return self._pullers

    @property
    def in_flight_per_worker(self) -> int:
        return self._cap

    async def _submit(self, payload: bytes | _RawFrame) -> FrameDetections:
        if not self._started or self._closing.is_set():
            raise ConfigError("the detector pool is not running: await pool.start() first")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FrameDetections] = loop.create_future()
        with self._lock:
            job_id = self._next_id
            self._next_id += 1
            self._jobs[job_id] = _Job(payload, future, loop)
            self._pending.append(job_id)
            self._dispatch_locked()
        return await future

    # --- dispatch (lock held) ----------------------------------------------------------------

    def _dispatch_locked(self) -> None:
        while self._pending:
            ready = [w for w in self._workers if w.ready and len(w.in_flight) < self._cap]
            if not ready:
                return
            worker = min(ready, key=lambda w: len(w.in_flight))
            job_id = self._pending.popleft()
            job = self._jobs.get(job_id)
            if job is None or job.future.cancelled():
                self._jobs.pop(job_id, None)
                continue
            job.attempts += 1
            worker.in_flight.add(job_id)
            worker.tasks.put((job_id, job.payload))

    # --- the monitor thread ------------------------------------------------------------------

    def _monitor_loop(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                by_conn = {w.results: w for w in self._workers}
                by_sentinel = {w.process.sentinel: w for w in self._workers}
            waitables: list[Any] = [*by_conn, *by_sentinel]
            try:
                ready = multiprocessing.connection.wait(waitables, timeout=_POLL_S)
            except OSError:  # a channel closed under us during a replacement
                continue
            dead: list[_Worker] = []
            for obj in ready:
                if obj in by_conn:
                    worker = by_conn[obj]
                    if not self._drain(worker):
                        dead.append(worker)
                elif isinstance(obj, int) and obj in by_sentinel:
                    dead.append(by_sentinel[obj])
            for worker in {id(w): w for w in dead}.values():
                if not self._closing.is_set():
                    self._on_death(worker)
            self._respawn_due()

    def _drain(self, worker: _Worker) -> bool:
        """Read every waiting message of a worker; False when its pipe is closed."""
        try:
            while worker.results.poll():
                self._on_message(worker, worker.results.recv())
        except (EOFError, OSError):
            return False
        return True

    def _on_message(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "done":
            _, job_id, result, error = message
            with self._lock:
                worker.in_flight.discard(job_id)
                job = self._jobs.pop(job_id, None)
                self._batch_sizes[1] += 1
                if error is None:
                    self._completed += 1
                else:
                    self._failed += 1
                self._dispatch_locked()
            if job is not None:
                self._settle(job, result, error)
        elif kind == "ready":
            with self._lock:
                worker.ready = True
                self._crash_streak[worker.index] = 0
                if self._info is None:
                    self._info = message[1]
                if len(self._workers) == self._processes and all(w.ready for w in self._workers):
                    self._all_ready.set()
                    self._ever_ready = True
                self._dispatch_locked()
            log.info(
                "detector worker %d ready (pid %s) in %.1f s",
                worker.index,
                worker.process.pid,
                time.monotonic() - worker.started_at,
            )
        elif kind == "fatal":
            _, name, text = message
            self._fatal = f"{name}: {text}"
            log.error("detector worker %d cannot load the model: %s: %s", worker.index, name, text)

    def _on_death(self, worker: _Worker) -> None:
        worker.process.join(0.5)
        code = worker.process.exitcode
        self._drain(worker)  # answers written before it died still count
        failed: list[tuple[_Job, InferenceFailedError]] = []
        with self._lock:
            if worker not in self._workers:
                return
            self._all_ready.clear()
            retry: list[int] = []
            for job_id in sorted(worker.in_flight):
                job = self._jobs.get(job_id)
                if job is None:
                    continue
                if job.attempts > self._settings.worker_retries:
                    self._jobs.pop(job_id)
                    self._failed += 1
                    failed.append(
                        (
                            job,
                            InferenceFailedError(
                                f"the detector worker died (exit code {code}) on this frame; "
                                f"gave up after {job.attempts} attempts"
                            ),
                        )
                    )
                else:
                    retry.append(job_id)
            worker.in_flight.clear()
            self._pending.extendleft(reversed(retry))
            self._workers.remove(worker)
            streak = self._crash_streak.get(worker.index, 0) + (0 if worker.ready else 1)
            self._crash_streak[worker.index] = streak
            delay = 0.0 if streak == 0 else min(0.25 * 2 ** (streak - 1), 10.0)
            if not self._ever_ready and streak >= _START_CRASHES and self._fatal is None:
                self._fatal = (
                    f"detector worker {worker.index} exited with code {code} before its model "
                    f"was ready, {streak} times in a row"
                )
            # While start() fails with a worker's own load error, nothing is respawned.
            if self._fatal is None or self._ever_ready:
                self._respawn_at[worker.index] = time.monotonic() + delay
            self._dispatch_locked()
        self._close_channels(worker)
        log.warning(
            "detector worker %d (pid %s) died with exit code %s; %d frames retried, %d failed; "
            "restarting it in %.2f s",
            worker.index,
            worker.process.pid,
            code,
            len(retry),
            len(failed),
            delay,
        )
        self._respawn_due()
        for job, error in failed:
            self._settle(job, None, error)

    def _respawn_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            for index, at in list(self._respawn_at.items()):
                if at <= now and not self._closing.is_set():
                    del self._respawn_at[index]
                    self._workers.append(self._spawn(index))
                    self._restarts += 1

    def _spawn(self, index: int) -> _Worker:
        assert self._factory is not None
        tasks: multiprocessing.Queue[tuple[int, bytes | _RawFrame] | None] = self._ctx.Queue()
        receive, send = self._ctx.Pipe(duplex=False)
        stop = self._ctx.Event()
        process = self._ctx.Process(
            target=_worker_main,
            args=(
                index,
                self._factory,
                tasks,
                send,
                stop,
                self._pullers,
                logging.getLogger().getEffectiveLevel(),
            ),
            name=f"detector-{index}",
            daemon=True,
        )
        process.start()
        send.close()  # the child holds the write end; EOF then means it is gone
        return _Worker(index, process, tasks, receive, stop, time.monotonic())

    @staticmethod
    def _close_channels(worker: _Worker) -> None:
        worker.tasks.cancel_join_thread()
        worker.tasks.close()
        worker.results.close()

    @staticmethod
    def _settle(
        job: _Job,
        result: FrameDetections | None,
        error: BaseException | None,
        *,
        cancel: bool = False,
    ) -> None:
        def resolve() -> None:
            if job.future.done():
                return
            if cancel:
                job.future.cancel()
            elif error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)  # type: ignore[arg-type]

        # A closed loop means nobody waits for this frame any more.
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(resolve)
