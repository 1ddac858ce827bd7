"""One task record in, one outcome out: parse, fetch, detect, shape the result.

Pure orchestration over the ports (``FrameStore``, ``AsyncDetector``), so unit tests drive it with
fakes. Transient failures (the store unavailable) are retried here with capped exponential backoff,
for as long as it takes; the :class:`Health` object tells the consumer to pause meanwhile.
Poison failures become an error result and a dead-letter copy. Nothing here raises for bad input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

from inference_service import strict_json
from inference_service.budget import FrameBudget
from inference_service.domain import DeadLetter, JsonObject, ModelInfo, Outcome, Record, Task
from inference_service.errors import (
    InferenceError,
    InternalError,
    InvalidTaskError,
    NotJsonError,
    ResultTooLargeError,
    TaskError,
)
from inference_service.ports import Admit, AsyncDetector, FrameStore
from inference_service.results import Identity, build_result, stage_timings
from inference_service.tasks import TaskRules, decode_record, parse_task, partial_identity

log = logging.getLogger(__name__)

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588
"""Kafka's default ``message.max.bytes`` (broker) and ``max.message.bytes`` (topic)."""
MESSAGE_OVERHEAD_BYTES = 512
"""Room kept for a record's framing in its batch (lengths, timestamps, attributes)."""
DLQ_MAX_VALUE_BYTES = 512 * 1024
"""A dead letter keeps at most this many bytes of its record (header ``value.truncated``)."""
MAX_OUT_KEY_BYTES = 4096
"""Longest key a result or dead letter carries; a longer task key is cut (it names no video)."""

DetectorLease = Callable[[], AbstractContextManager[AsyncDetector]]
"""Pins the detector a record uses from its start to its outcome (the model serving when the
record started, kept alive meanwhile): records of a partition start in offset order, so a model
swap gives every record before some offset the old model and every one after it the new one."""


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


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """The largest result and dead letter the output topics take (read from Kafka at start-up)."""

    result_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    dead_letter_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES


class TaskProcessor:
    """Turns records into outcomes; never raises for a record, whatever it holds."""

    def __init__(
        self,
        store: FrameStore,
        detector: AsyncDetector,
        default_bucket: str,
        health: Health | None = None,
        backoff: Backoff | None = None,
        limits: MessageLimits | None = None,
        budget: FrameBudget | None = None,
        *,
        allowed_buckets: frozenset[str] | None = frozenset(),
        lease: DetectorLease | None = None,
    ) -> None:
        """``allowed_buckets``: the buckets a task may name besides ``default_bucket``
        (``INFERENCE_S3_ALLOWED_BUCKETS``); None: any. A task naming another gets
        ``invalid_task``. ``lease``: where each record takes its detector (a swappable model's
        slot); by default always ``detector``."""
        self._store = store
        self._detector = detector
        self._lease: DetectorLease = lease or (lambda: contextlib.nullcontext(detector))
        self._default_bucket = default_bucket
        self._rules = TaskRules.of(default_bucket, allowed_buckets)
        self.health = health or Health()
        self._backoff = backoff or Backoff()
        self.limits = limits or MessageLimits()
        self._budget = budget
        """Bounds the frame bytes fetched and held at once (none in unit tests by default)."""
        self.held_bytes = 0
        """Bytes of fetched frames held until the detector is done with them."""

    async def handle(self, record: Record, max_task_bytes: int) -> Outcome:
        """The outcome of ``record``. A failure of this code itself stays within the record: it
        becomes an ``internal_error`` result and dead letter, logged with its traceback.

        The detector is leased before anything is awaited: the pipeline starts records in offset
        order, so their leases follow that order."""
        with self._lease() as detector:
            try:
                if record.size > max_task_bytes:
                    return self.oversized(record, max_task_bytes, detector.info)
                return await self.process(record, detector)
            except Exception as exc:  # the record's boundary: nothing may escape into the loop
                log.exception(
                    "internal error on %s[%d]@%d", record.topic, record.partition, record.offset
                )
                return self.internal_error(record, exc, detector.info)

    def oversized(self, record: Record, limit: int, model: ModelInfo | None = None) -> Outcome:
        """The outcome of a record over ``limit`` bytes: an ``invalid_task`` error result
        (carrying ``model``, by default the detector's)."""
        model = model or self._detector.info
        exc = InvalidTaskError(
            f"the task record is {record.size} bytes, over the limit of {limit} "
            "(INFERENCE_MAX_TASK_BYTES)"
        )
        try:
            obj: JsonObject | None = decode_record(record.value)
        except NotJsonError:
            return self._dead_letter_only(record, exc, model)
        except InvalidTaskError as bad:
            obj = bad.readable
        identity = partial_identity(obj, record.key, self._default_bucket)
        return self._failed(record, identity, exc, stage_timings(None, total_ms=0.0), model)

    def internal_error(
        self, record: Record, exc: BaseException, model: ModelInfo | None = None
    ) -> Outcome:
        """The outcome of a record whose handling raised ``exc`` unexpectedly."""
        model = model or self._detector.info
        error = InternalError(f"internal error while handling the task: {type(exc).__name__}")
        identity = partial_identity(None, record.key, self._default_bucket)
        try:
            timings = stage_timings(None, total_ms=0.0)
            return self._failed(record, identity, error, timings, model)
        except Exception:
            log.exception("the internal_error result itself failed; dead letter only")
            return self._dead_letter_only(record, error, model)

    async def process(self, record: Record, detector: AsyncDetector | None = None) -> Outcome:
        """The outcome of ``record``, detected by ``detector`` (by default the processor's)."""
        detector = detector or self._detector
        model = detector.info
        started = time.perf_counter()
        obj: JsonObject | None = None
        try:
            obj = decode_record(record.value)
            task = parse_task(obj, self._rules)
        except NotJsonError as exc:
            return self._dead_letter_only(record, exc, model)
        except InvalidTaskError as exc:
            readable = obj if obj is not None else exc.readable
            identity = partial_identity(readable, record.key, self._default_bucket)
            timings = stage_timings(None, total_ms=_ms_since(started))
            return self._failed(record, identity, exc, timings, model)
        return await self._run(record, task, started, detector)

    async def _run(
        self, record: Record, task: Task, started: float, detector: AsyncDetector
    ) -> Outcome:
        model = detector.info
        identity = Identity.of_task(task)
        fetch_ms = 0.0
        reservation = self._budget.reservation() if self._budget is not None else None
        try:
            t0 = time.perf_counter()
            if reservation is not None:
                await reservation.start()  # a fetch starts only when the budget has room
            data = await self._fetch(task, reservation.admit if reservation else None)
            fetch_ms = _ms_since(t0)
            t1 = time.perf_counter()
            self.held_bytes += len(data)
            try:
                found = await detector.detect(data)
            finally:
                self.held_bytes -= len(data)
                del data
                if reservation is not None:
                    await reservation.close()
                    reservation = None
        except TaskError as exc:
            timings = stage_timings(None, fetch_ms=fetch_ms, total_ms=_ms_since(started))
            return self._failed(record, identity, exc, timings, model)
        finally:
            if reservation is not None:  # the fetch failed or the task was cancelled
                await reservation.close()
        worked_ms = (
            found.decode_ms + found.preprocess_ms + found.inference_ms + found.postprocess_ms
        )
        timings = stage_timings(
            found,
            fetch_ms=fetch_ms,
            queue_ms=max(0.0, _ms_since(t1) - worked_ms),
            total_ms=_ms_since(started),
        )
        result = build_result(identity, model, timings, found=found).to_dict()
        payload = strict_json.dumps(result)
        if not self._fits(record, payload):
            return self._too_large(record, identity, timings, len(payload), model)
        return Outcome(
            key=_out_key(record),
            result=result,
            dead_letter=None,
            status="ok",
            timings_ms=timings,
            payload=payload,
            model_sha256=model.sha256,
        )

    async def _fetch(self, task: Task, admit: Admit | None) -> bytes:
        attempt = 0
        while True:
            try:
                data = await self._store.get(task.bucket, task.s3_key, admit)
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
        model: ModelInfo,
    ) -> Outcome:
        result = build_result(identity, model, timings, error=exc).to_dict()
        payload = strict_json.dumps(result)
        if not self._fits(record, payload):
            return self._too_large(record, identity, timings, len(payload), model)
        return self._error_outcome(record, exc, result, payload, timings, model)

    def _error_outcome(
        self,
        record: Record,
        exc: TaskError,
        result: JsonObject,
        payload: bytes,
        timings: dict[str, float],
        model: ModelInfo,
    ) -> Outcome:
        """An error result that fits its topic, with the record's dead letter."""
        log.info(
            "task at %s[%d]@%d failed: %s: %s",
            record.topic, record.partition, record.offset, exc.code, exc.message,
        )  # fmt: skip
        return Outcome(
            key=_out_key(record),
            result=result,
            dead_letter=self._dead_letter(record, exc),
            status=str(exc.code),
            timings_ms=timings,
            payload=payload,
            model_sha256=model.sha256,
        )

    def _too_large(
        self,
        record: Record,
        identity: Identity,
        timings: dict[str, float],
        size: int,
        model: ModelInfo,
    ) -> Outcome:
        """A ``result_too_large`` error result without the copied bulk (``meta``, detections);
        a dead letter alone if even that does not fit."""
        exc = ResultTooLargeError(
            f"the result would be {size} bytes, over the {self.limits.result_bytes} bytes the "
            "results topic takes (its max.message.bytes or the producer's message.max.bytes); "
            "meta and detections are left out"
        )
        slim = replace(identity, meta=None)
        result = build_result(slim, model, timings, error=exc).to_dict()
        payload = strict_json.dumps(result)
        if not self._fits(record, payload):
            return self._dead_letter_only(record, exc, model)
        return self._error_outcome(record, exc, result, payload, timings, model)

    def _fits(self, record: Record, payload: bytes) -> bool:
        """Whether ``payload`` fits the results topic with the record's key and framing."""
        key = _out_key(record) or b""
        return len(payload) + len(key) + MESSAGE_OVERHEAD_BYTES <= self.limits.result_bytes

    def _dead_letter_only(self, record: Record, exc: TaskError, model: ModelInfo) -> Outcome:
        log.info(
            "record %s[%d]@%d has no usable task: %s",
            record.topic, record.partition, record.offset, exc.message,
        )  # fmt: skip
        return Outcome(
            key=_out_key(record),
            result=None,
            dead_letter=self._dead_letter(record, exc),
            status=str(exc.code),
            model_sha256=model.sha256,
        )

    def _dead_letter(self, record: Record, exc: TaskError) -> DeadLetter:
        """The record's copy with headers saying why; its value cut to fit the DLQ topic."""
        key = _out_key(record)
        headers: list[tuple[str, bytes]] = [
            ("error.code", str(exc.code).encode()),
            ("error.message", _header_text(exc.message)),
            ("source.topic", record.topic.encode()),
            ("source.partition", str(record.partition).encode()),
            ("source.offset", str(record.offset).encode()),
        ]
        room = (
            self.limits.dead_letter_bytes
            - MESSAGE_OVERHEAD_BYTES
            - len(key or b"")
            - sum(len(k) + len(v) + 64 for k, v in headers)
        )
        value = record.value
        room = max(0, min(room, DLQ_MAX_VALUE_BYTES))
        if value is not None and len(value) > room:
            headers.append(("value.truncated", str(len(value)).encode()))
            value = value[:room]
        return DeadLetter(key=key, value=value, headers=headers)


def _out_key(record: Record) -> bytes | None:
    """The key of a record's result and dead letter: the task's own, cut when absurdly long."""
    key = record.key
    return key if key is None or len(key) <= MAX_OUT_KEY_BYTES else key[:MAX_OUT_KEY_BYTES]


def _header_text(message: str) -> bytes:
    """A header value in valid UTF-8 (lone surrogates replaced), at most 4 KiB."""
    return message.encode("utf-8", "replace")[:4096].decode("utf-8", "ignore").encode()


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
