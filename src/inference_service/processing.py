"""One task record in, one outcome out: parse, fetch, detect, shape the result.

Pure orchestration over the ports (``FrameStore``, ``AsyncDetector``), so unit tests drive it with
fakes. Transient failures (the store unavailable) are retried here with capped exponential backoff,
for as long as it takes; the :class:`Health` object tells the consumer to pause meanwhile.
Poison failures become an error result and a dead-letter copy. Nothing here raises for bad input.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

from inference_service.domain import DeadLetter, JsonObject, Outcome, Record, Task
from inference_service.errors import InferenceError, InvalidTaskError, NotJsonError, TaskError
from inference_service.ports import AsyncDetector, FrameStore
from inference_service.results import Identity, build_result, stage_timings
from inference_service.tasks import decode_record, parse_task, partial_identity

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Health:
    """Shared view of the dependencies' health; consumption pauses while anything is down."""

    store_down_since: float | None = None
    store_error: str = ""

    def store_failed(self, message: str) -> None:
        if self.store_down_since is None:
            self.store_down_since = time.monotonic()
            log.warning("S3 unavailable, pausing consumption and retrying: %s", message)
        self.store_error = message

    def store_ok(self) -> None:
        if self.store_down_since is not None:
            log.info("S3 is back after %.1f s, resuming", time.monotonic() - self.store_down_since)
        self.store_down_since = None
        self.store_error = ""

    @property
    def healthy(self) -> bool:
        return self.store_down_since is None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter."""

    initial_s: float = 0.2
    max_s: float = 5.0
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        base: float = min(self.max_s, self.initial_s * self.factor**attempt)
        return base * (0.5 + random.random() / 2)


class TaskProcessor:
    """Turns records into outcomes."""

    def __init__(
        self,
        store: FrameStore,
        detector: AsyncDetector,
        default_bucket: str,
        health: Health | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._store = store
        self._detector = detector
        self._default_bucket = default_bucket
        self.health = health or Health()
        self._backoff = backoff or Backoff()
        self.held_bytes = 0
        """Bytes of fetched frames held until the detector is done with them."""

    async def oversized(self, record: Record, limit: int) -> Outcome:
        """The outcome of a record over ``limit`` bytes: an ``invalid_task`` error result."""
        size = len(record.value or b"")
        exc = InvalidTaskError(
            f"the task record is {size} bytes, over the limit of {limit} (INFERENCE_MAX_TASK_BYTES)"
        )
        try:
            obj = decode_record(record.value)
        except NotJsonError:
            return Outcome(
                key=record.key,
                result=None,
                dead_letter=self._dead_letter(record, exc),
                status=str(exc.code),
            )
        identity = partial_identity(obj, record.key, self._default_bucket)
        return self._failed(record, identity, exc, stage_timings(None, total_ms=0.0))

    async def process(self, record: Record) -> Outcome:
        started = time.perf_counter()
        obj: JsonObject | None = None
        try:
            obj = decode_record(record.value)
            task = parse_task(obj, self._default_bucket)
        except NotJsonError as exc:
            return Outcome(
                key=record.key,
                result=None,
                dead_letter=self._dead_letter(record, exc),
                status=str(exc.code),
            )
        except InvalidTaskError as exc:
            identity = partial_identity(obj, record.key, self._default_bucket)
            timings = stage_timings(None, total_ms=_ms_since(started))
            return self._failed(record, identity, exc, timings)
        return await self._run(record, task, started)

    async def _run(self, record: Record, task: Task, started: float) -> Outcome:
        identity = Identity.of_task(task)
        fetch_ms = 0.0
        try:
            t0 = time.perf_counter()
            data = await self._fetch(task)
            fetch_ms = _ms_since(t0)
            t1 = time.perf_counter()
            self.held_bytes += len(data)
            try:
                found = await self._detector.detect(data)
            finally:
                self.held_bytes -= len(data)
        except TaskError as exc:
            timings = stage_timings(None, fetch_ms=fetch_ms, total_ms=_ms_since(started))
            return self._failed(record, identity, exc, timings)
        worked_ms = (
            found.decode_ms + found.preprocess_ms + found.inference_ms + found.postprocess_ms
        )
        timings = stage_timings(
            found,
            fetch_ms=fetch_ms,
            queue_ms=max(0.0, _ms_since(t1) - worked_ms),
            total_ms=_ms_since(started),
        )
        result = build_result(identity, self._detector.info, timings, found=found)
        return Outcome(
            key=record.key,
            result=result.to_dict(),
            dead_letter=None,
            status="ok",
            timings_ms=timings,
        )

    async def _fetch(self, task: Task) -> bytes:
        attempt = 0
        while True:
            try:
                data = await self._store.get(task.bucket, task.s3_key)
            except InferenceError as exc:
                if not exc.retriable:
                    raise
                self.health.store_failed(str(exc))
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1
                continue
            self.health.store_ok()
            return data

    def _failed(
        self,
        record: Record,
        identity: Identity,
        exc: TaskError,
        timings: dict[str, float],
    ) -> Outcome:
        result = build_result(identity, self._detector.info, timings, error=exc)
        log.info(
            "task at %s[%d]@%d failed: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            exc.code,
            exc.message,
        )
        return Outcome(
            key=record.key,
            result=result.to_dict(),
            dead_letter=self._dead_letter(record, exc),
            status=str(exc.code),
            timings_ms=timings,
        )

    @staticmethod
    def _dead_letter(record: Record, exc: TaskError) -> DeadLetter:
        return DeadLetter(
            key=record.key,
            value=record.value,
            headers=[
                ("error.code", str(exc.code).encode()),
                ("error.message", exc.message.encode("utf-8", "replace")[:4096]),
                ("source.topic", record.topic.encode()),
                ("source.partition", str(record.partition).encode()),
                ("source.offset", str(record.offset).encode()),
            ],
        )


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
