"""The service loop, independent of any broker: consume → process in parallel → publish in order.

::

    TaskSource.poll ─► TaskProcessor.handle (one asyncio task per record) ─► InFlight lanes
         ▲  pause/resume (back-pressure)                                           │ finished
         │                                                                         ▼ prefix
         └──── seek (rewind) ◄── a failed cycle ◄── ResultSink.publish (one commit cycle)

* **Order.** Records of a partition are processed in parallel but leave in consumption order
  (:class:`~inference_service.pipeline.ordering.InFlight`).
* **Back-pressure.** Consumption pauses once ``max_in_flight`` records or ``max_in_flight_bytes``
  are held (or the frame store is down) and resumes at three quarters of the limits: resuming at the
  limit itself toggled on every finished frame, and each resume makes a broker serve the partitions
  again.
* **Cadence.** A commit cycle publishes every ``commit_interval_s``, or sooner once a quarter of
  the in-flight room holds finished outcomes: one cycle per handful of results costs a broker more
  than the frames, while waiting for more starves the detector of room.
* **A failed cycle** holds its partitions (paused, nothing of theirs published) until the group's
  committed offsets of them can be read, final, and the consumer has been sought there: only then
  is their work dropped and are they resumed. A transaction that committed although the client saw
  it fail is therefore never repeated, and a partition whose committed offset cannot be read (a
  broker that does not answer) waits, retried with backoff, rather than resuming anywhere else.
  Where the group has no committed offset yet, the partition continues at the cycle's first
  record. Consumption then backs off.
* **A revoked partition**'s work is dropped and never published; the new owner starts at the
  committed offset.
* **A model swap**: a cycle holds the outcomes of one model only (each outcome names its model's
  sha256); the finished outcomes of the next model wait for the next cycle.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from inference_service.domain import Finished, Outcome, Partition, Record
from inference_service.errors import ConfigError
from inference_service.metrics import Metrics
from inference_service.pipeline.ordering import InFlight
from inference_service.ports import Published, ResultSink, TaskSource
from inference_service.processing import Backoff, TaskProcessor
from inference_service.settings import Settings

log = logging.getLogger(__name__)

RESUME_SHARE = 3 / 4
"""Paused consumption resumes once in-flight work is down to this share of its limits."""
PUBLISH_EARLY_SHARE = 1 / 4
"""A cycle publishes before its interval once this share of the in-flight room is finished."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig:
    """The settings the loop reads (built from :class:`Settings` by :meth:`from_settings`)."""

    max_in_flight: int
    max_in_flight_bytes: int
    max_poll_records: int
    max_task_bytes: int
    commit_interval_s: float
    shutdown_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> PipelineConfig:
        return cls(
            max_in_flight=settings.max_in_flight,
            max_in_flight_bytes=settings.max_in_flight_bytes,
            max_poll_records=settings.max_poll_records,
            max_task_bytes=settings.max_task_bytes,
            commit_interval_s=settings.commit_interval_ms / 1000.0,
            shutdown_timeout_s=settings.shutdown_timeout_s,
        )


def _model_of(outcome: Outcome) -> str:
    """What outcomes of one commit cycle share: the sha256 of the model that produced them."""
    return outcome.model_sha256


def rewind_positions(
    first: dict[Partition, int], committed: dict[Partition, int | None]
) -> dict[Partition, int]:
    """Where each partition whose committed offset was read resumes after a failed cycle: at that
    offset (the broker knows whether a transaction committed after all), or, where the group has
    none, at the first record of the failed cycle. Partitions not read are left out: they wait."""
    out: dict[Partition, int] = {}
    for p, offset in first.items():
        if p in committed:
            known = committed[p]
            out[p] = offset if known is None else known
    return out


class Pipeline:
    """Runs records from a :class:`TaskSource` through a :class:`TaskProcessor` into a
    :class:`ResultSink`; also the source's :class:`~inference_service.ports.PartitionListener`."""

    def __init__(
        self,
        config: PipelineConfig,
        source: TaskSource,
        sink: ResultSink,
        processor: TaskProcessor,
        metrics: Metrics,
        backoff: Backoff | None = None,
    ) -> None:
        self._config = config
        self._source = source
        self._sink = sink
        self._processor = processor
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self._inflight = InFlight()
        self._assigned: set[Partition] = set()
        self._paused = False
        self._failures = 0
        self._unsettled: dict[Partition, int] = {}
        """Held partitions of failed cycles (first offset of each) not yet sought to their
        committed offsets: their work is neither published nor dropped meanwhile."""
        self._settle_at = 0.0
        self._settle_attempts = 0
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    @property
    def ready(self) -> bool:
        """True once the source has joined its group (for ``/readyz``)."""
        return self._source.ready

    @property
    def in_flight(self) -> int:
        """Records consumed and not yet published."""
        return self._inflight.count

    # ------------------------------------------------------------------ life cycle
    async def run(self) -> None:
        """Run until :meth:`stop`; then finish in-flight work, publish it and close the ports."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        cfg = self._config
        await self._sink.open()
        try:
            await self._source.open(self)
            next_cycle = time.monotonic() + cfg.commit_interval_s
            publish_early = max(1, int(cfg.max_in_flight * PUBLISH_EARLY_SHARE))
            while not self._stopping.is_set():
                await self._apply_backpressure()
                # Never take more than the in-flight room left: the bound is exact.
                room = max(1, cfg.max_in_flight - self._inflight.count)
                if self._unsettled and time.monotonic() >= self._settle_at:
                    await self._settle()
                records = await self._source.poll(min(room, cfg.max_poll_records))
                for record in records:
                    self._start(record)
                now = time.monotonic()
                if now >= next_cycle or self._inflight.ready() >= publish_early:
                    await self._publish_finished()
                    next_cycle = now + cfg.commit_interval_s
                if not records and self._inflight.count:
                    # Nothing new: wait briefly for work to finish instead of spinning.
                    await asyncio.sleep(min(0.01, cfg.commit_interval_s))
            await self._drain()
        finally:
            try:
                await self._source.close()
            finally:
                await self._sink.close()

    def stop(self) -> None:
        """Ask :meth:`run` to stop consuming, finish, publish and return."""
        self._stopping.set()

    async def _drain(self) -> None:
        timeout = self._config.shutdown_timeout_s
        log.info(
            "stopping: finishing %d in-flight tasks (up to %.0f s)", self._inflight.count, timeout
        )
        finished = await self._inflight.wait_all(timeout)
        # One cycle per model: outcomes of a model swapped in meanwhile take further cycles.
        while await self._publish_finished():
            pass
        if not finished or self._inflight.count:
            dropped = self._inflight.drop()
            log.warning(
                "shutdown timeout: %d partitions handed back uncommitted: %s", len(dropped), dropped
            )

    # ------------------------------------------------------------------ records in
    def _start(self, record: Record) -> None:
        work = asyncio.ensure_future(self._processor.handle(record, self._config.max_task_bytes))
        self._inflight.add(record.source, record.offset, work, record.size)

    async def _apply_backpressure(self) -> None:
        count_limit = self._config.max_in_flight
        bytes_limit = self._config.max_in_flight_bytes
        if self._paused:
            count_limit = max(1, int(count_limit * RESUME_SHARE) + 1)
            bytes_limit = int(bytes_limit * RESUME_SHARE) + 1
        full = (
            self._inflight.count >= count_limit
            or self._inflight.nbytes >= bytes_limit
            or self._processor.held_bytes >= bytes_limit
            or not self._processor.health.healthy
        )
        if full != self._paused:
            await self._source.set_paused(full)
            self._paused = full
            self._metrics.paused.set(1 if full else 0)
            log.debug("consumption %s", "paused" if full else "resumed")
        self._metrics.in_flight.set(self._inflight.count)
        self._metrics.in_flight_bytes.set(self._inflight.nbytes)
        if full:
            # Let work finish; the loop publishes it (interval or enough finished).
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ outcomes out
    async def _publish_finished(self) -> int:
        """Publish one commit cycle: the finished outcomes of one model (a cycle never mixes the
        results of two, see :meth:`InFlight.take_finished`). Returns how many were taken."""
        taken = self._inflight.take_finished(skip=self._unsettled, same=_model_of)
        finished = [f for f in taken if f.partition in self._assigned]
        try:
            outcome = await self._sink.publish(finished)
        except ConfigError:
            raise  # a setting to fix (e.g. a transactional id shared by two replicas): stop
        except Exception:
            # A sink that fails in a way it did not foresee must not end the service: the cycle
            # counts as failed and its records are consumed again.
            log.exception("publishing %d outcomes failed unexpectedly", len(finished))
            first: dict[Partition, int] = {}
            for f in finished:
                first.setdefault(f.partition, f.offset)
            outcome = Published(rewind=first)
        self._count(outcome.published)
        if not outcome.failed:
            self._failures = 0
            return len(taken)
        await self._hold(outcome.rewind)
        # The broker is unwell: back off before consuming again (the rewound records wait).
        delay = self._backoff.delay(self._failures)
        self._failures += 1
        log.warning("pausing %.1f s before consuming again", delay)
        await asyncio.sleep(delay)
        return len(taken)

    async def _hold(self, first: dict[Partition, int]) -> None:
        """Hold ``first``'s partitions (those still assigned) until :meth:`_settle` has sought
        them to where the group says; try that at once."""
        owned = {p: offset for p, offset in first.items() if p in self._assigned}
        if not owned:
            return
        for p, offset in owned.items():
            self._unsettled[p] = min(offset, self._unsettled.get(p, offset))
        await self._source.hold(list(owned))
        self._settle_attempts = 0
        await self._settle()

    async def _settle(self) -> None:
        """Seek each held partition to its committed offset once that can be read; drop its work
        and release it only after the seek succeeded. What remains is tried again with backoff."""
        for p in [p for p in self._unsettled if p not in self._assigned]:
            del self._unsettled[p]  # revoked meanwhile: the new owner starts where the group says
        if not self._unsettled:
            return
        held = dict(self._unsettled)
        positions = rewind_positions(held, await self._source.committed(list(held)))
        for (topic, partition), offset in positions.items():
            if offset != held[(topic, partition)]:
                log.warning(
                    "%s[%d]: the group's committed offset is %d, not %d: the failed cycle had "
                    "committed after all; resuming there (no result repeated)",
                    topic, partition, offset, held[(topic, partition)],
                )  # fmt: skip
        sought = await self._source.seek(positions) if positions else set()
        sought &= set(self._unsettled)
        if sought:
            self._inflight.drop(list(sought))
            for p in sought:
                del self._unsettled[p]
            await self._source.release(list(sought))
            log.warning("rewound %s", {f"{t}[{n}]": positions[(t, n)] for t, n in sought})
        if self._unsettled:
            delay = self._backoff.delay(self._settle_attempts)
            self._settle_attempts += 1
            self._settle_at = time.monotonic() + delay
            log.warning(
                "%s held: committed offset unreadable or seek failed; trying again in %.1f s",
                sorted(self._unsettled), delay,
            )  # fmt: skip
        else:
            self._settle_attempts = 0

    def _count(self, items: list[Finished]) -> None:
        for f in items:
            oc = f.outcome
            if oc.result is not None:
                self._metrics.results.labels(oc.status).inc()
            if oc.dead_letter is not None:
                self._metrics.dead_letters.labels(oc.status).inc()
            self._metrics.observe_timings(oc.timings_ms)

    # ------------------------------------------------------------------ PartitionListener
    def assigned(self, partitions: Sequence[Partition]) -> None:
        self._on_loop(lambda: self._assigned.update(partitions))

    def revoked(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        # The sink settles first, on the source's thread (it may commit the acknowledged prefix);
        # then the partitions' work is dropped: none of it is published after this returns.
        self._sink.revoked(partitions, lost=lost)

        def forget() -> None:
            self._assigned.difference_update(partitions)
            self._inflight.drop(list(partitions))
            for p in partitions:
                self._unsettled.pop(p, None)

        self._on_loop(forget)

    def _on_loop(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the event loop's thread and wait for it (the source may call from its own
        I/O thread while the loop awaits the poll)."""
        if self._loop is None or threading.get_ident() == self._loop_thread:
            fn()
            return

        async def call() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=30)
