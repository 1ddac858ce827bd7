"""The detector pool: N worker processes, each owning one model, behind an asyncio API.

Shape (one job per module)::

    event loop ── detect(bytes) ──► pending deques ─► least-loaded ready worker's task queue
                                    (pipeline first)      │ (mp.Queue of FrameJob messages)
                                    worker process i: T threads ── detector.detect ──┐
    futures ◄── call_soon_threadsafe ◄── monitor thread ◄── result pipe of worker i ◄┘
                                              │
                                              └── notices a dead worker (process sentinel), starts
                                                  a replacement, re-queues its in-flight frames

* :mod:`.sizing`: how many processes and inference threads (:func:`plan_workers`).
* :mod:`.messages`: the typed messages on the task queues and result pipes.
* :mod:`.worker`: the worker process (load, warm up, answer frames).
* :mod:`.supervisor`: :class:`DetectorPool` (dispatch, monitor, respawn).

* Workers are started with the ``spawn`` context and load the model once, through a picklable
  factory, then warm it up and report :class:`~.messages.Ready`.
* Frames travel as encoded bytes (or a raw ``uint8`` buffer for decoded video frames), never as
  pickled arrays.
* Every worker has its own task queue and result pipe, so a worker killed mid-write can corrupt only
  channels that are thrown away with it.
* A frame whose worker dies is retried on another (or the replacement) worker. Only frames the
  worker had started are suspects; each is retried alone (nothing else in flight on its worker),
  and a death with one frame running counts against it, up to ``settings.worker_retries``
  retries, then :class:`~inference_service.errors.InferenceFailedError`.
* A frame running past ``settings.frame_timeout_s`` gets its worker killed and replaced; it is
  retried once alone, then fails with :class:`~inference_service.errors.InferenceTimeoutError`.
"""

from inference_service.pool.sizing import available_cpus, plan_workers
from inference_service.pool.supervisor import DetectorPool, PoolStats
from inference_service.pool.worker import DetectorFactory, load_default_detector

__all__ = [
    "DetectorFactory",
    "DetectorPool",
    "PoolStats",
    "available_cpus",
    "load_default_detector",
    "plan_workers",
]
