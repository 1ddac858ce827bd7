"""How many worker processes, and inference threads in each, the pool runs on this machine."""

from __future__ import annotations

import os

from inference_service.settings import Settings


def available_cpus() -> int:
    """CPUs this process may run on (the container's share, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def plan_workers(settings: Settings, cpu_count: int) -> tuple[int, int]:
    """``(processes, inference threads per process)`` for ``INFERENCE_WORKERS/THREADS``.

    Explicit settings win; ``auto`` fills in the rest by a rule measured with yolov8n/yolov8s on
    1280x720 JPEG frames (``make bench-detector``, ``bench/results/sweep.md``):

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
