"""The serving model and its replacement without downtime: :class:`ModelSlot`.

The slot holds the serving :class:`~.supervisor.DetectorPool` and is the detector the processor and
HTTP use. :meth:`ModelSlot.swap` starts a second pool beside it on the new model (every worker
loads and warms it), runs one detection on a synthetic frame, and only then switches:

* A record takes its detector when it starts (:meth:`ModelSlot.lease`) and keeps it until its
  outcome, so the records of a partition, started in offset order, use the old model up to some
  offset and the new one after it; the pipeline never commits outcomes of two models in one cycle.
* The old pool stops once the last record that leased it has its outcome.
* A model that fails to load, warm or detect leaves the old pool serving; the failure is logged
  and kept (:attr:`ModelSlot.last_swap`, counted in :attr:`ModelSlot.outcomes`).
* One swap at a time: a swap asked for meanwhile ends at once as ``busy``.

Both pools run during a swap: twice the workers' memory for the seconds it takes, in exchange for
never serving with fewer ready workers than configured (docs/operations.md, "Swapping the model").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from inference_service.domain import (
    FrameDetections,
    ImageSize,
    ModelInfo,
    Priority,
    SwapOutcome,
    SwapReport,
)
from inference_service.errors import ConfigError, ModelError
from inference_service.pool.supervisor import DetectorPool, PoolStats
from inference_service.settings import Settings, env_name

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger(__name__)

PoolFactory = Callable[[Settings], DetectorPool]
"""Builds the (not yet started) pool of a model's settings."""


def with_model(settings: Settings, model: str) -> Settings:
    """``settings`` naming ``model`` (a path or ``s3://`` URI), validated as ``INFERENCE_MODEL``
    is; raises ``ValueError`` for a value that setting refuses."""
    copy = settings.model_copy()
    type(settings).__pydantic_validator__.validate_assignment(copy, "model", model)
    return copy


def smoke_frame(info: ModelInfo) -> npt.NDArray[np.uint8]:
    """A synthetic BGR frame of the model's input size: grey, with two coloured blocks."""
    import numpy as np

    h, w = info.imgsz
    frame = np.full((h, w, 3), 114, dtype=np.uint8)
    frame[h // 4 : h // 2, w // 4 : w // 2] = (40, 160, 220)
    frame[h // 2 : 3 * h // 4, w // 2 : 7 * w // 8] = (200, 60, 30)
    return frame


def check_smoke(info: ModelInfo, found: FrameDetections) -> None:
    """Raise ``ModelError`` unless ``found`` is a sound answer to :func:`smoke_frame`."""
    h, w = info.imgsz
    if found.image != ImageSize(w, h):
        raise ModelError(
            f"the model answered a {w}×{h} frame as {found.image.width}×{found.image.height}"
        )
    if info.classes:
        bad = [d.class_id for d in found.detections if not 0 <= d.class_id < len(info.classes)]
        if bad:
            raise ModelError(f"the model detected class ids {bad} of {len(info.classes)} classes")


@dataclass(eq=False, slots=True)
class _Generation:
    """One model's pool and the records that leased it."""

    pool: DetectorPool
    settings: Settings
    load_s: float
    leases: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever no record holds a lease (cleared by each first lease)."""


@dataclass(frozen=True, slots=True)
class _Attempt:
    """A swap under way: what asked for it, for which model, since when."""

    trigger: str
    requested: str
    started_at: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Totals:
    """Counters of pools already stopped, so that the slot's counters never go back."""

    completed: int = 0
    failed: int = 0
    restarts: int = 0
    batches: collections.Counter[int] = field(default_factory=collections.Counter)

    def add(self, stats: PoolStats) -> None:
        self.completed += stats.completed
        self.failed += stats.failed
        self.restarts += stats.worker_restarts
        self.batches.update(stats.batch_sizes)


class ModelSlot:
    """The serving model's pool behind :class:`~inference_service.ports.AsyncDetector`, swapped
    without downtime by :meth:`swap`."""

    def __init__(self, settings: Settings, pool_factory: PoolFactory = DetectorPool) -> None:
        self._settings = settings
        self._factory = pool_factory
        self._serving: _Generation | None = None
        self._candidate: DetectorPool | None = None
        """The pool being started (the first one, or a swap's new one)."""
        self._retiring: set[_Generation] = set()
        self._retire_tasks: set[asyncio.Task[None]] = set()
        self._totals = _Totals()
        self._swapping = False
        self._stopping = False
        self._last: SwapReport | None = None
        self.outcomes: collections.Counter[SwapOutcome] = collections.Counter()
        """Swaps asked for, by outcome."""

    # --- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the first pool on ``settings.model``; raises ``ModelError`` as the pool does.
        Returns without a serving model when :meth:`drain` or :meth:`stop` came first."""
        pool = self._factory(self._settings)
        self._candidate = pool
        t0 = time.monotonic()
        try:
            await pool.start()
        finally:
            self._candidate = None
        if pool.ready() and not self._stopping:
            self._serving = _Generation(pool, self._settings, time.monotonic() - t0)
            self._serving.idle.set()
        else:
            await pool.stop()

    def drain(self) -> None:
        """The service is stopping: no more swaps, and no pool replaces a worker that dies."""
        self._stopping = True
        for pool in self._pools():
            pool.drain()

    async def stop(self) -> None:
        """Stop every pool (the serving one, a swap's new one, old ones still draining)."""
        self._stopping = True
        for task in list(self._retire_tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._retire_tasks, return_exceptions=True)
        for pool in self._pools():
            await pool.stop()

    def _pools(self) -> list[DetectorPool]:
        gens = [g for g in (self._serving, *self._retiring) if g is not None]
        return [g.pool for g in gens] + ([self._candidate] if self._candidate else [])

    # --- AsyncDetector -------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        """The serving model."""
        return self._require().pool.info

    def ready(self) -> bool:
        """True while the serving pool has a worker that takes frames (throughout a swap)."""
        return self._serving is not None and self._serving.pool.ready()

    async def detect(
        self, data: bytes, *, priority: Priority = Priority.PIPELINE
    ) -> FrameDetections:
        with self.lease() as detector:
            return await detector.detect(data, priority=priority)

    @contextlib.contextmanager
    def lease(self) -> Iterator[DetectorPool]:
        """The serving pool, kept running until the ``with`` block ends even if a swap replaces
        it meanwhile (call it on the event loop's thread)."""
        gen = self._require()
        gen.leases += 1
        gen.idle.clear()
        try:
            yield gen.pool
        finally:
            gen.leases -= 1
            if gen.leases == 0:
                gen.idle.set()

    def _require(self) -> _Generation:
        if self._serving is None:
            raise ConfigError("no model is serving yet: await slot.start() first")
        return self._serving

    # --- what /v1/model and /metrics show ------------------------------------------------------

    @property
    def source(self) -> str:
        """The serving model's path or URI (what SIGHUP and polling reload)."""
        gen = self._serving
        return str((gen.settings if gen is not None else self._settings).model)

    @property
    def load_s(self) -> float:
        """Seconds the serving model took to load and warm in every worker (0 before)."""
        return self._serving.load_s if self._serving is not None else 0.0

    @property
    def last_swap(self) -> SwapReport | None:
        """The last swap that ran (not one refused or ``busy``)."""
        return self._last

    @property
    def swapping(self) -> bool:
        return self._swapping

    def stats(self) -> PoolStats:
        """The serving pool's workers; frames in flight at every pool; counters of every pool
        this slot ran."""
        serving = self._serving.pool.stats() if self._serving is not None else None
        others = [g.pool.stats() for g in self._retiring]
        every = [s for s in (serving, *others) if s is not None]
        batches = collections.Counter(self._totals.batches)
        for s in every:
            batches.update(s.batch_sizes)
        return PoolStats(
            workers=serving.workers if serving else 0,
            ready_workers=serving.ready_workers if serving else 0,
            in_flight=sum(s.in_flight for s in every),
            pending=sum(s.pending for s in every),
            completed=self._totals.completed + sum(s.completed for s in every),
            failed=self._totals.failed + sum(s.failed for s in every),
            worker_restarts=self._totals.restarts + sum(s.worker_restarts for s in every),
            batch_sizes=dict(batches),
        )

    @property
    def processes(self) -> int:
        return self._require().pool.processes

    @property
    def threads(self) -> int:
        return self._require().pool.threads

    # --- the swap ------------------------------------------------------------------------------

    async def swap(self, model: str | None = None, *, trigger: str) -> SwapReport:
        """Replace the serving model by ``model`` (a path or ``s3://`` URI; None: the serving
        model's own source, read again). Returns when the new model serves, or when the swap
        failed and the old one serves on; the old pool drains and stops after it returns."""
        attempt = _Attempt(trigger, model if model is not None else self.source)
        requested = attempt.requested
        report = functools.partial(self._record, attempt)

        if self._stopping or self._serving is None:
            why = "the service is stopping" if self._stopping else "no model is serving yet"
            log.warning("model swap (%s) to %s refused: %s", trigger, requested, why)
            return report("refused", error=why)
        if self._swapping:
            log.warning("model swap (%s) to %s refused: another swap is under way", trigger,
                        requested)  # fmt: skip
            return report("busy", error="another model swap is under way; retry when it ends")
        self._swapping = True
        try:
            return await self._swap(model, attempt)
        finally:
            self._swapping = False

    def _record(
        self,
        attempt: _Attempt,
        outcome: SwapOutcome,
        *,
        model: ModelInfo | None = None,
        previous: ModelInfo | None = None,
        stage: str = "",
        error: str = "",
    ) -> SwapReport:
        done = SwapReport(
            outcome,
            attempt.trigger,
            attempt.requested,
            attempt.started_at,
            time.monotonic() - attempt.t0,
            model=model,
            previous=previous,
            stage=stage,
            error=error,
        )
        self.outcomes[outcome] += 1
        if outcome not in ("busy", "refused"):
            self._last = done
        return done

    async def _swap(self, model: str | None, attempt: _Attempt) -> SwapReport:
        trigger, requested = attempt.trigger, attempt.requested
        report = functools.partial(self._record, attempt)
        old = self._require()
        previous = old.pool.info

        def failed(stage: str, exc: BaseException) -> SwapReport:
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ModelError) else str(exc)
            log.error(
                "model swap (%s) to %s failed at %s: %s; %s (sha256 %s…) serves on",
                trigger, requested, stage, error, previous.name, previous.sha256[:12],
            )  # fmt: skip
            return report("failed", stage=stage, error=error, model=previous)

        try:
            settings = with_model(old.settings, model) if model is not None else old.settings
        except ValueError as exc:
            return failed("model", ValueError(f"{env_name('model')}: {exc}"))
        log.info(
            "model swap (%s): starting workers on %s beside %s (sha256 %s…)",
            trigger, requested, previous.name, previous.sha256[:12],
        )  # fmt: skip
        t0 = time.monotonic()
        switched = False
        pool: DetectorPool | None = None
        try:
            pool = self._factory(settings)
            self._candidate = pool
            try:
                await pool.start()
            except Exception as exc:  # a model that cannot serve, whatever the reason
                return failed("load", exc)
            if not pool.ready():
                return report("refused", error="the service is stopping", model=previous)
            load_s = time.monotonic() - t0
            info = pool.info
            try:
                timeout = self._settings.startup_timeout_s or None
                found = await asyncio.wait_for(pool.detect_array(smoke_frame(info)), timeout)
                check_smoke(info, found)
            except Exception as exc:
                return failed("smoke", exc)
            if self._stopping:
                return report("refused", error="the service is stopping", model=previous)
            if info == previous:
                old.settings = settings  # the same model under another name, maybe
                log.info("model swap (%s): %s is the serving model already (sha256 %s…)",
                         trigger, requested, info.sha256[:12])  # fmt: skip
                return report("unchanged", model=previous)
            if info.classes != previous.classes:
                log.warning(
                    "model swap (%s): the new model's classes differ: %d classes, was %d",
                    trigger, len(info.classes), len(previous.classes),
                )  # fmt: skip
            new = _Generation(pool, settings, load_s)
            new.idle.set()
            self._serving = new
            switched = True
            self._retire(old)
            log.info(
                "model swapped (%s): %s (sha256 %s…, %s) serves after %.1f s; %s (sha256 %s…) "
                "drains and stops",
                trigger, info.name, info.sha256[:12], info.runtime, load_s, previous.name,
                previous.sha256[:12],
            )  # fmt: skip
            return report("swapped", model=info, previous=previous)
        finally:
            self._candidate = None
            if not switched and pool is not None:
                await pool.stop()

    def _retire(self, gen: _Generation) -> None:
        self._retiring.add(gen)
        task = asyncio.ensure_future(self._drain_and_stop(gen))
        self._retire_tasks.add(task)
        task.add_done_callback(self._retire_tasks.discard)

    async def _drain_and_stop(self, gen: _Generation) -> None:
        """Stop ``gen``'s pool once no record holds it (those that do finish on it)."""
        try:
            if gen.leases:
                log.info("previous model: %d records still detecting on it", gen.leases)
                await gen.idle.wait()
            await gen.pool.stop()
            log.info("previous model's workers stopped (%s)", gen.pool.info.name)
        finally:
            self._totals.add(gen.pool.stats())
            self._retiring.discard(gen)

    # --- polling -------------------------------------------------------------------------------

    async def watch(self, interval_s: float, version: Callable[[Settings], str]) -> None:
        """Every ``interval_s``, read ``version`` of the serving model's source; swap when it
        changed. A version that failed to swap is not tried again until it changes again."""
        source: str | None = None
        seen = ""
        warned = False
        while not self._stopping:
            gen = self._serving
            if gen is not None and not self._swapping:
                try:
                    current = await asyncio.to_thread(version, gen.settings)
                except Exception as exc:  # an unreadable source must not end the watch
                    if not warned:
                        log.warning(
                            "cannot read the version of the model at %s (%s): %s; retrying "
                            "every %g s", gen.settings.model, env_name("model_poll_s"), exc,
                            interval_s,
                        )  # fmt: skip
                    warned = True
                else:
                    if warned:
                        log.info("the version of the model at %s is readable again",
                                 gen.settings.model)  # fmt: skip
                    warned = False
                    if str(gen.settings.model) != source:
                        source, seen = str(gen.settings.model), current  # a new source: its base
                    elif current != seen:
                        log.info("the model at %s changed (%s → %s): swapping", source, seen,
                                 current)  # fmt: skip
                        seen = current
                        await self.swap(None, trigger="poll")
            await asyncio.sleep(interval_s)
