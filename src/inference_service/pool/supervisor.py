"""The supervisor: :class:`DetectorPool` starts the worker processes, hands them frames, reads
their answers and replaces the workers that die.

* The event loop submits a frame; it waits in ``pending`` until the least-loaded ready worker has
  room, then goes to that worker's task queue as a :class:`~.messages.FrameJob`. Pending frames go
  out in :class:`~inference_service.domain.Priority` order: an interactive (HTTP) frame only when
  no pipeline frame waits, and only to a worker with an idle puller, so that it never sits in a
  worker's queue ahead of a pipeline frame sent after it.
* One monitor thread waits on every worker's result pipe and process sentinel: answers resolve
  their futures (``call_soon_threadsafe``), a dead worker's in-flight frames are queued again and a
  replacement is started after a backoff.
* Blame (``frame_timeout_s``, ``worker_retries``): a worker reports each frame it starts
  (:class:`~.messages.Started`). A frame running past ``frame_timeout_s`` gets its worker killed
  (and replaced as any dead one); it is retried once alone, i.e. on a worker with nothing else in
  flight, then fails with inference_timeout; the worker's other frames go back uncounted. When a
  worker dies by itself, the frames it had started are suspects, each retried alone; only a death
  with a single frame started counts against ``worker_retries``. Frames it had not started go
  back as they were. With several processes a suspect runs only while another ready worker stays
  open to every other frame; with one, suspects and the rest take turns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
import warnings
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as MpEvent
from types import TracebackType
from typing import TYPE_CHECKING, Any

from inference_service.domain import FrameDetections, ModelInfo, Priority
from inference_service.errors import (
    ConfigError,
    InferenceFailedError,
    InferenceTimeoutError,
    ModelError,
    TaskError,
)
from inference_service.pool.messages import (
    Done,
    Failed,
    FrameJob,
    FromWorker,
    Payload,
    RawFrame,
    Ready,
    Started,
    StartFailed,
    Stop,
    ToWorker,
)
from inference_service.pool.sizing import available_cpus, plan_workers
from inference_service.pool.worker import (
    POLL_S,
    DetectorFactory,
    load_default_detector,
    worker_main,
)
from inference_service.settings import Settings, env_name

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger(__name__)

_START_CRASHES = 3
"""Deaths of one worker before the pool was first ready after which start() gives up."""

_TIMEOUT_RETRIES = 1
"""Retries (alone on a worker) of a frame that ran past ``frame_timeout_s`` before it fails."""


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
    """Frames waiting for a worker with room (of every priority)."""
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
    payload: Payload
    future: asyncio.Future[FrameDetections]
    loop: asyncio.AbstractEventLoop
    priority: Priority
    attempts: int = 0
    running_since: float | None = None
    """When its worker reported starting it (monotonic); None while it is not running."""
    alone: bool = False
    """A suspect: sent only to a worker with nothing in flight, and nothing joins it there."""
    crashes: int = 0
    """Worker deaths while this was the only frame started on its worker."""
    timeouts: int = 0
    """Times it ran past ``frame_timeout_s``."""


@dataclass(slots=True)
class _Worker:
    index: int
    process: BaseProcess
    tasks: multiprocessing.Queue[ToWorker]
    results: multiprocessing.connection.Connection
    stop: MpEvent
    started_at: float
    ready: bool = False
    in_flight: set[int] = field(default_factory=set)
    alone: int | None = None
    """The suspect frame it runs alone, if any: no other frame is sent to it meanwhile."""
    reserved: bool = False
    """Held for a waiting suspect: no new frame is sent to it until it has drained."""
    overdue: frozenset[int] = frozenset()
    """The frames past their deadline for which it was killed (blamed when its death is seen)."""

    @property
    def open(self) -> bool:
        """Takes any frame: ready, not running a suspect, not held for one, not being killed."""
        return self.ready and self.alone is None and not self.reserved and not self.overdue


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
    ) -> None:
        planned = plan_workers(settings, available_cpus())
        self._settings = settings
        self._factory = factory
        self._processes = processes or planned[0]
        self._threads = threads or planned[1]
        self._pullers = pullers or 2
        self._cap = in_flight_per_worker or self._pullers + 1
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._jobs: dict[int, _Job] = {}
        # One queue of job ids per priority, highest first (Priority's definition order).
        self._pending: dict[Priority, collections.deque[int]] = {
            priority: collections.deque() for priority in Priority
        }
        self._next_id = 0
        self._info: ModelInfo | None = None
        self._fatal: str | None = None
        self._completed = 0
        self._failed = 0
        self._restarts = 0
        # Suspects waiting for a worker to themselves (see _dispatch_alone_locked), in order.
        self._alone: collections.deque[int] = collections.deque()
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._crash_streak: dict[int, int] = {}
        self._respawn_at: dict[int, float] = {}
        self._monitor: threading.Thread | None = None
        self._closing = threading.Event()
        self._draining = threading.Event()
        self._started = False
        self._stopped = False
        self._all_ready = threading.Event()
        self._ever_ready = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers and wait until every one has loaded and warmed its model.

        Raises :class:`ModelError` when a worker cannot load the model, or when the workers are
        not all ready within ``settings.startup_timeout_s`` (0: no limit).
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
        timeout_s = self._settings.startup_timeout_s
        ok = await asyncio.to_thread(self._wait_ready, timeout_s)
        if not ok and (self._closing.is_set() or self._draining.is_set()):
            log.info("detector pool stopped before it was ready")
            return
        if not ok:
            reason = self._fatal or (
                f"workers not ready after {timeout_s:.0f} s ({env_name('startup_timeout_s')})"
            )
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

    def _wait_ready(self, timeout_s: float) -> bool:
        """Wait for every worker to be ready; False on a load error, a stop or ``timeout_s``
        (0: no limit, as for the setting)."""
        deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
        while time.monotonic() < deadline:
            if self._fatal is not None or self._closing.is_set() or self._draining.is_set():
                return False
            if self._all_ready.wait(POLL_S):
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
            for queue in self._pending.values():
                queue.clear()
            self._alone.clear()
        for job in jobs.values():
            self._settle(job, None, None, cancel=True)

    def drain(self) -> None:
        """The service is stopping: workers keep answering, but one that dies is not replaced
        (its frames wait for the others, or end unanswered with the shutdown)."""
        self._draining.set()

    def _shutdown_workers(self) -> None:
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            w.stop.set()
            for _ in range(self._pullers):  # wake every puller now rather than at its next poll
                with contextlib.suppress(ValueError, OSError):
                    w.tasks.put(Stop())
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
        """True once every worker was ready together (the start), and then while at least one
        worker can take frames: a worker being replaced (or respawned after a crash) does not
        make a pool whose other workers serve unready."""
        if not self._started or self._stopped or self._closing.is_set():
            return False
        if not self._ever_ready:
            return self._all_ready.is_set()
        with self._lock:
            return any(w.ready for w in self._workers)

    async def detect(
        self, data: bytes, *, priority: Priority = Priority.PIPELINE
    ) -> FrameDetections:
        """Detections of one encoded frame (JPEG, PNG, ...), computed in a worker process;
        waiting frames are sent to workers in ``priority`` order."""
        return await self._submit(data, priority)

    async def detect_array(self, image_bgr: npt.NDArray[np.uint8]) -> FrameDetections:
        """Detections of one decoded BGR frame (``H×W×3 uint8``), sent as its raw buffer."""
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
            raise ValueError(f"expected an H×W×3 BGR image, got shape {image_bgr.shape}")
        h, w = int(image_bgr.shape[0]), int(image_bgr.shape[1])
        return await self._submit(RawFrame(image_bgr.tobytes(), h, w), Priority.PIPELINE)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                workers=self._processes,
                ready_workers=sum(1 for w in self._workers if w.ready),
                in_flight=sum(len(w.in_flight) for w in self._workers),
                pending=sum(len(queue) for queue in self._pending.values()) + len(self._alone),
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

    async def _submit(self, payload: Payload, priority: Priority) -> FrameDetections:
        if not self._started or self._closing.is_set():
            raise ConfigError("the detector pool is not running: await pool.start() first")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FrameDetections] = loop.create_future()
        with self._lock:
            job_id = self._next_id
            self._next_id += 1
            self._jobs[job_id] = _Job(payload, future, loop, priority)
            self._pending[priority].append(job_id)
            self._dispatch_locked()
        try:
            return await future
        finally:
            # A failed frame's exception keeps this frame alive through its traceback, and the
            # future keeps the exception: unbound here, that cycle (which holds the frame's bytes
            # until the garbage collector runs) never forms.
            del future

    # --- dispatch (lock held) ----------------------------------------------------------------

    def _dispatch_locked(self) -> None:
        """Send waiting frames to the least-loaded ready workers, highest priority first.

        A lower priority is served only once no frame of a higher one waits. A pipeline frame may
        fill a worker up to its cap; an interactive one only up to its pullers, i.e. it is taken
        at once and a pipeline frame that comes later waits for no interactive frame but the ones
        already being processed.
        """
        self._dispatch_alone_locked()  # suspects first; workers they run on or wait for are shut
        for priority, queue in self._pending.items():
            limit = self._cap if priority is Priority.PIPELINE else min(self._cap, self._pullers)
            while queue:
                ready = [w for w in self._workers if w.open and len(w.in_flight) < limit]
                if not ready:
                    return  # this priority still waits, so no lower one may go
                worker = min(ready, key=lambda w: len(w.in_flight))
                job_id = queue.popleft()
                job = self._jobs.get(job_id)
                if job is None or job.future.cancelled():
                    self._jobs.pop(job_id, None)
                    continue
                job.attempts += 1
                worker.in_flight.add(job_id)
                worker.tasks.put(FrameJob(job_id, job.payload))

    # --- the monitor thread ------------------------------------------------------------------

    def _monitor_loop(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                by_conn = {w.results: w for w in self._workers}
                by_sentinel = {w.process.sentinel: w for w in self._workers}
            waitables: list[Any] = [*by_conn, *by_sentinel]
            try:
                ready = multiprocessing.connection.wait(waitables, timeout=POLL_S)
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
            self._kill_overdue()

    def _drain(self, worker: _Worker) -> bool:
        """Read every waiting message of a worker; False when its pipe is closed."""
        try:
            while worker.results.poll():
                self._on_message(worker, worker.results.recv())
        except (EOFError, OSError):
            return False
        return True

    def _on_message(self, worker: _Worker, message: FromWorker) -> None:
        if isinstance(message, Started):
            self._on_started(worker, message)
        elif isinstance(message, Done | Failed):
            self._on_answer(worker, message)
        elif isinstance(message, Ready):
            self._on_ready(worker, message)
        elif isinstance(message, StartFailed):
            self._fatal = f"{message.error_type}: {message.message}"
            log.error(
                "detector worker %d cannot load the model: %s: %s",
                worker.index,
                message.error_type,
                message.message,
            )

    def _on_answer(self, worker: _Worker, message: Done | Failed) -> None:
        with self._lock:
            worker.in_flight.discard(message.job_id)
            if worker.alone == message.job_id:  # its suspect is answered: the worker opens again
                worker.alone = None
            job = self._jobs.pop(message.job_id, None)
            self._batch_sizes[1] += 1
            if isinstance(message, Done):
                self._completed += 1
            else:
                self._failed += 1
            self._dispatch_locked()
        if job is None:
            return
        if isinstance(message, Done):
            self._settle(job, message.detections, None)
        else:
            self._settle(job, None, message.error)

    def _on_ready(self, worker: _Worker, message: Ready) -> None:
        with self._lock:
            worker.ready = True
            self._crash_streak[worker.index] = 0
            if self._info is None:
                self._info = message.info
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

    def _on_death(self, worker: _Worker) -> None:
        worker.process.join(0.5)
        code = worker.process.exitcode
        self._drain(worker)  # answers written before it died still count
        with self._lock:
            if worker not in self._workers:
                return
            self._all_ready.clear()
            retry, failed = self._sort_out_locked(worker, code)
            self._workers.remove(worker)
            streak = self._crash_streak.get(worker.index, 0) + (0 if worker.ready else 1)
            self._crash_streak[worker.index] = streak
            delay = 0.0 if streak == 0 else min(0.25 * 2 ** (streak - 1), 10.0)
            if not self._ever_ready and streak >= _START_CRASHES and self._fatal is None:
                self._fatal = (
                    f"detector worker {worker.index} exited with code {code} before its model "
                    f"was ready, {streak} times in a row"
                )
            # While start() fails with a worker's own load error, nothing is respawned; nor
            # while the service stops.
            respawn = (self._fatal is None or self._ever_ready) and not self._draining.is_set()
            if respawn:
                self._respawn_at[worker.index] = time.monotonic() + delay
            self._dispatch_locked()
        self._close_channels(worker)
        log.warning(
            "detector worker %d (pid %s) died with exit code %s; %d frames retried, %d failed; %s",
            worker.index,
            worker.process.pid,
            code,
            len(retry),
            len(failed),
            f"restarting it in {delay:.2f} s" if respawn else "not restarted (stopping)",
        )
        self._respawn_due()
        for job, error in failed:
            self._settle(job, None, error)

    # --- blame: deadlines and suspects (monitor thread) --------------------------------------

    def _on_started(self, worker: _Worker, message: Started) -> None:
        with self._lock:
            job = self._jobs.get(message.job_id)
            if job is not None and message.job_id in worker.in_flight:
                job.running_since = time.monotonic()

    def _kill_overdue(self) -> None:
        """Kill each worker running a frame past ``frame_timeout_s`` (0: never). Its sentinel then
        brings it to :meth:`_on_death`, which blames the frames named in ``overdue`` only and
        replaces the worker as any dead one."""
        timeout_s = self._settings.frame_timeout_s
        if not timeout_s:
            return
        now = time.monotonic()
        doomed: list[_Worker] = []
        with self._lock:
            for w in self._workers:
                if w.overdue:
                    continue  # already killed; its death is on its way
                late = frozenset(
                    job_id
                    for job_id in w.in_flight
                    if (job := self._jobs.get(job_id)) is not None
                    and job.running_since is not None
                    and now - job.running_since > timeout_s
                )
                if late:
                    w.overdue = late
                    doomed.append(w)
        for w in doomed:
            log.warning(
                "detector worker %d (pid %s) ran %d frame(s) past %g s (%s); killing it",
                w.index,
                w.process.pid,
                len(w.overdue),
                timeout_s,
                env_name("frame_timeout_s"),
            )
            w.process.kill()

    def _sort_out_locked(
        self, worker: _Worker, code: int | None
    ) -> tuple[list[int], list[tuple[_Job, TaskError]]]:
        """What becomes of a dead worker's frames (lock held): the ids retried, the jobs failed.

        * Killed for a deadline: each overdue frame counts a timeout and is retried alone, or
          fails with inference_timeout past ``_TIMEOUT_RETRIES``; its other frames are innocent.
        * Died by itself: the frames it had started are suspects, retried alone. With one frame
          started the death is that frame's and counts against ``worker_retries`` (then
          inference_failed); with several, none counts, and the deaths alone will tell.
        * Innocent frames (not started, or not overdue) go back first in their queue, uncounted;
          a suspect among them stays one.

        Every run alone either ends its frame or counts against one of its two bounded counters,
        and a frame becomes a suspect once, so deaths that count nothing are bounded: no livelock.
        """
        jobs = [(i, j) for i in sorted(worker.in_flight) if (j := self._jobs.get(i)) is not None]
        worker.in_flight.clear()
        started = sum(1 for _, job in jobs if job.running_since is not None)
        failed: list[tuple[_Job, TaskError]] = []
        suspects: list[int] = []
        innocents: list[int] = []
        for job_id, job in jobs:
            running, job.running_since = job.running_since is not None, None
            error: TaskError | None = None
            if worker.overdue:
                if job_id not in worker.overdue:
                    innocents.append(job_id)
                    continue
                job.timeouts += 1
                if job.timeouts > _TIMEOUT_RETRIES:
                    error = InferenceTimeoutError(
                        f"detection on this frame took longer than "
                        f"{self._settings.frame_timeout_s:g} s ({env_name('frame_timeout_s')}), "
                        f"also when retried alone on a fresh worker"
                    )
            elif not running:
                innocents.append(job_id)
                continue
            elif started == 1:
                job.crashes += 1
                if job.crashes > self._settings.worker_retries:
                    error = InferenceFailedError(
                        f"the detector worker died (exit code {code}) on this frame, with no "
                        f"other frame running; gave up after {job.crashes} attempts"
                    )
            if error is not None:
                self._jobs.pop(job_id)
                self._failed += 1
                failed.append((job, error))
            else:
                job.alone = True
                suspects.append(job_id)
        # Innocents go first in their queues, in their original order; new suspects queue last.
        for job_id in reversed(innocents):
            job = self._jobs[job_id]
            (self._alone if job.alone else self._pending[job.priority]).appendleft(job_id)
        self._alone.extend(suspects)
        return innocents + suspects, failed

    def _dispatch_alone_locked(self) -> None:
        """Send waiting suspects each to an empty ready worker, and hold workers for them.

        With more than one process, at most ``processes - 1`` workers run or are held for
        suspects, and a worker takes or is held for one only while another ready worker stays
        open, so that every other frame keeps being served (a suspect rather waits for a
        replacement to come up). A held worker gets no new frame, so it drains: a suspect cannot
        wait forever behind a busy pool. With one process, suspects and the rest take turns.
        """
        limit = max(1, self._processes - 1)
        keep_open = 1 if self._processes > 1 else 0
        while self._alone:
            job_id = self._alone[0]
            job = self._jobs.get(job_id)
            if job is None or job.future.cancelled():
                self._alone.popleft()
                self._jobs.pop(job_id, None)
                continue
            serving = sum(1 for w in self._workers if w.alone is not None)
            empty = [
                w
                for w in self._workers
                if w.ready and w.alone is None and not w.overdue and not w.in_flight
            ]
            if serving >= limit or not empty:
                break
            worker = max(empty, key=lambda w: w.reserved)  # a held worker first
            if not worker.reserved and sum(1 for w in self._workers if w.open) <= keep_open:
                break  # it is the last open worker
            self._alone.popleft()
            worker.reserved = False
            worker.alone = job_id
            job.attempts += 1
            worker.in_flight.add(job_id)
            worker.tasks.put(FrameJob(job_id, job.payload))
        # Hold as many workers as the waiting suspects may still use, the least loaded first.
        serving = sum(1 for w in self._workers if w.alone is not None)
        wanted = max(0, min(len(self._alone), limit - serving))
        held = [w for w in self._workers if w.reserved]
        for w in held[wanted:]:
            w.reserved = False
        held = held[:wanted]
        free = sorted((w for w in self._workers if w.open), key=lambda w: len(w.in_flight))
        if keep_open and not free and held:
            held.pop().reserved = False  # the open one died: a held one serves the rest again
        for w in free[: max(0, min(wanted - len(held), len(free) - keep_open))]:
            w.reserved = True

    def _respawn_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            for index, at in list(self._respawn_at.items()):
                if at <= now and not self._closing.is_set() and not self._draining.is_set():
                    del self._respawn_at[index]
                    self._workers.append(self._spawn(index))
                    self._restarts += 1

    def _spawn(self, index: int) -> _Worker:
        assert self._factory is not None
        tasks: multiprocessing.Queue[ToWorker] = self._ctx.Queue()
        receive, send = self._ctx.Pipe(duplex=False)
        stop = self._ctx.Event()
        process = self._ctx.Process(
            target=worker_main,
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
