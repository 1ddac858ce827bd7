"""The worker process: load one detector, warm it up, then answer frames until told to stop.

``T`` puller threads share the process's detector, so one decodes while another infers; every
answer goes back on the worker's own result pipe (one send at a time), preceded by a
:class:`~.messages.Started` when the puller takes the frame.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event as MpEvent
from typing import TYPE_CHECKING

from inference_service.allocator import release_large_blocks
from inference_service.domain import FrameDetections
from inference_service.errors import InferenceFailedError, TaskError
from inference_service.pool.messages import (
    Done,
    Failed,
    FrameJob,
    FromWorker,
    Payload,
    Ready,
    Started,
    StartFailed,
    Stop,
    ToWorker,
)
from inference_service.ports import FrameDetector
from inference_service.settings import Settings

if TYPE_CHECKING:
    from inference_service.model.resolve import ResolvedModel

log = logging.getLogger(__name__)

DetectorFactory = Callable[[], FrameDetector]
"""Builds the detector inside a worker process; must be picklable (module-level or a partial)."""

POLL_S = 0.2
"""How often blocked loops look at their stop flags (well under the one-second promise)."""

_JOIN_S = 2.0
"""How long a stopping worker waits for its puller threads to finish their frames."""


def load_default_detector(
    resolved: ResolvedModel, settings: Settings, threads: int
) -> FrameDetector:
    """The default factory body: the service's own detector (imported in the worker only)."""
    from inference_service.detector import load_detector

    return load_detector(resolved, settings, threads)


def warm_up(detector: FrameDetector) -> None:
    """Warm ``detector`` up unless it already did so itself (a factory may warm while loading)."""
    if not detector.warmed_up:
        detector.warmup()


def run_one(detector: FrameDetector, payload: Payload) -> FrameDetections:
    """Detections of one payload: encoded bytes are decoded by the detector, raw frames are not."""
    if isinstance(payload, bytes):
        return detector.detect(payload)
    import numpy as np

    image = np.frombuffer(payload.data, dtype=np.uint8).reshape(payload.height, payload.width, 3)
    return detector.detect_array(image)


def error_payload(exc: BaseException) -> TaskError:
    """What travels back for a failed frame: the same TaskError type, or inference_failed."""
    if isinstance(exc, TaskError):
        try:
            return type(exc)(exc.message)
        except Exception:
            return InferenceFailedError(exc.message)
    return InferenceFailedError(f"{type(exc).__name__}: {exc}")


def answer(detector: FrameDetector, job: FrameJob) -> Done | Failed:
    """The answer to one job: its detections, or the error that any exception becomes."""
    try:
        return Done(job.job_id, run_one(detector, job.payload))
    except BaseException as exc:
        return Failed(job.job_id, error_payload(exc))


def worker_main(
    index: int,
    factory: DetectorFactory,
    tasks: multiprocessing.Queue[ToWorker],
    results: multiprocessing.connection.Connection,
    stop: MpEvent,
    pullers: int,
    log_level: int = logging.WARNING,
) -> None:
    """Entry point of a worker process: load, warm up, then serve frames until told to stop.

    Ends when ``stop`` is set, when a puller takes :class:`Stop`, or when the parent is gone.
    """
    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s %(name)s [%(processName)s]: %(message)s",
    )
    release_large_blocks()  # each frame's buffers are freed back to the OS (see allocator)
    # The supervisor alone stops a worker (stop event, Stop, or its own exit): a SIGTERM sent to
    # the whole process group (systemd's default, Ctrl-C's SIGINT) must not cut the frames short
    # that the service is finishing while it drains.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    send_lock = threading.Lock()

    def send(message: FromWorker) -> None:
        with send_lock:
            results.send(message)

    try:
        detector = factory()
        warm_up(detector)
    except BaseException as exc:  # the parent turns this into a start-up error
        send(StartFailed(type(exc).__name__, str(exc)))
        results.close()
        return
    send(Ready(detector.info))
    halt = threading.Event()

    def pull() -> None:
        while not halt.is_set():
            try:
                item = tasks.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, Stop):
                halt.set()
                return
            send(Started(item.job_id))  # before the detector runs, so a hang or crash is blamed
            send(answer(detector, item))

    threads = [
        threading.Thread(target=pull, name=f"detector-{index}-pull-{n}", daemon=True)
        for n in range(pullers)
    ]
    for t in threads:
        t.start()
    while not halt.is_set() and not stop.wait(POLL_S):
        if os.getppid() != parent:  # orphaned: the service is gone
            break
    halt.set()
    deadline = time.monotonic() + _JOIN_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    results.close()
    os._exit(0)  # skip runtime atexit handlers that may wait on their own thread pools
