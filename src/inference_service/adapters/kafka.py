"""The Kafka side of the service: consume tasks, publish ordered results, commit offsets.

``KafkaPipeline`` owns one consumer (group ``inference-group``, cooperative-sticky) and one
producer.
Every call into librdkafka runs on a single I/O thread, so polling, rebalance callbacks and commits
never interleave; the asyncio loop only awaits that thread.

Delivery modes (SPEC.md, Guarantees):

* ``exactly_once``: every commit cycle is one Kafka transaction holding the finished results (and
  dead letters) of the cycle plus the consumer offsets after them, sent with the consumer's group
  metadata so that a zombie instance is fenced. An abortable failure aborts the transaction and
  rewinds the partitions of the cycle to the group's committed offsets (read as stable offsets, so
  a transaction that committed although the client saw it fail is not repeated).
* ``at_least_once``: results are produced (idempotent producer) as they finish; offsets are
  committed only up to the last contiguous record whose result the broker acknowledged.

On a revocation the in-flight work of the revoked partitions is dropped and never published (the
new owner starts from the committed offset); under ``at_least_once`` the acknowledged prefix is
committed first. Nothing is lost either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from inference_service.errors import ConfigError, TransientError
from inference_service.metrics import Metrics
from inference_service.ordering import Finished, InFlight, Partition
from inference_service.processing import Backoff, Health, Outcome, Record, TaskProcessor
from inference_service.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

TXN_CALL_TIMEOUT_S = 10.0
"""Longest wait of one transactional call (send offsets, commit, abort)."""
TXN_WATCHDOG_S = 25.0
"""A transactional call still running after this long is treated as hung (librdkafka can ignore
the call's own timeout when the coordinator moves or restarts: librdkafka issues #5456, #5511); the
producer is then abandoned and replaced, and the partitions rewound."""
TXN_COMMIT_ATTEMPTS = 3
"""Tries of a commit that fails retriably before the transaction is aborted and rewound."""

DLQ_MAX_VALUE_BYTES = 512 * 1024
"""A dead letter larger than this keeps only its first bytes (header ``value.truncated``)."""


class KafkaUnavailableError(TransientError):
    """The broker cannot be reached."""


class _HungCallError(Exception):
    """A librdkafka call did not return within :data:`TXN_WATCHDOG_S`."""


def _bounded(what: str, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on a helper thread; raise ``_HungCallError`` if it outlives the watchdog."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"kafka-{what}", daemon=True)
    thread.start()
    thread.join(TXN_WATCHDOG_S)
    if thread.is_alive():
        raise _HungCallError(f"{what} did not return within {TXN_WATCHDOG_S:.0f} s")
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


def client_config(settings: Settings) -> dict[str, Any]:
    """The brokers and security properties that every Kafka client of the service uses."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "security.protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username
        conf["sasl.password"] = password.get_secret_value() if password is not None else None
    if settings.kafka_ssl_ca_location is not None:
        conf["ssl.ca.location"] = str(settings.kafka_ssl_ca_location.expanduser())
    return conf


def kafka_ready(settings: Settings, timeout: float = 5.0) -> None:
    """Raise ``KafkaUnavailableError`` unless a metadata request answers within ``timeout``.

    Credentials the brokers refuse raise :class:`ConfigError` at once: waiting would not help.
    """
    errors: list[KafkaError] = []
    conf: dict[str, Any] = {
        **client_config(settings),
        "socket.connection.setup.timeout.ms": 3000,
        "error_cb": errors.append,
    }
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout
    failure: KafkaException | None = None
    refused: KafkaError | None = None
    while True:
        try:
            admin.list_topics(timeout=max(0.1, min(0.5, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            failure = exc
        admin.poll(0)  # serves error_cb
        refused = next((e for e in errors if e.code() == KafkaError._AUTHENTICATION), None)
        if refused is not None or time.monotonic() >= deadline:
            break
    del admin  # stop its connection attempts now, not when the traceback is collected
    bootstrap = settings.kafka_bootstrap_servers
    if refused is not None:
        raise ConfigError(
            f"Kafka at {bootstrap} refused the credentials ({refused.str()}); check "
            "INFERENCE_KAFKA_SECURITY_PROTOCOL, INFERENCE_KAFKA_SASL_MECHANISM, "
            "INFERENCE_KAFKA_SASL_USERNAME and INFERENCE_KAFKA_SASL_PASSWORD"
        )
    raise KafkaUnavailableError(f"Kafka at {bootstrap} does not answer: {failure}")


@dataclass(slots=True)
class _AckLane:
    """at_least_once: offsets of one partition published and not yet committed, in order."""

    pending: deque[int] = field(default_factory=deque)
    acked: set[int] = field(default_factory=set)
    failed: int | None = None

    def committable(self) -> int | None:
        """Offset to commit (last contiguous acked + 1), removing that prefix; None if none."""
        last: int | None = None
        while self.pending and self.pending[0] in self.acked:
            last = self.pending.popleft()
            self.acked.discard(last)
        return None if last is None else last + 1


class KafkaPipeline:
    """Consume → process in parallel → publish in order → commit."""

    def __init__(self, settings: Settings, processor: TaskProcessor, metrics: Metrics) -> None:
        self._s = settings
        self._processor = processor
        self._metrics = metrics
        self._health: Health = processor.health
        self._exactly_once = settings.delivery == "exactly_once"
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-io")
        self._inflight = InFlight()
        self._assigned: set[Partition] = set()
        self._next_offset: dict[Partition, int] = {}
        """Per partition, the offset after the last record started: a record below it is one the
        client delivered twice (seen once in a run of the replica tests), and is skipped."""
        self._paused = False
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._acks: dict[Partition, _AckLane] = {}
        self._uncommitted: dict[Partition, int] = {}
        self._reapply_pause: list[TopicPartition] = []
        self._backoff = Backoff(initial_s=0.2, max_s=5.0)
        self._last_lag = 0.0
        self._commit_failures = 0
        self._generation = 0
        self._abandoned: list[Producer] = []
        self.ready = False
        """True once the consumer has joined the group (for ``/readyz``)."""

    # ------------------------------------------------------------------ life cycle
    async def run(self) -> None:
        """Run until :meth:`stop`; then finish in-flight work, commit and leave the group."""
        self._loop = asyncio.get_running_loop()
        await self._call(self._open)
        commit_every = self._s.commit_interval_ms / 1000.0
        next_commit = time.monotonic() + commit_every
        publish_early = max(1, self._s.max_in_flight // 4)
        try:
            while not self._stopping.is_set():
                await self._apply_backpressure()
                # Never take more than the in-flight room left: the bound is exact, not one
                # poll's worth of records over it (paused partitions deliver nothing).
                room = max(1, self._s.max_in_flight - self._inflight.count)
                messages = await self._call(self._poll, min(room, self._s.max_poll_records))
                for msg in messages:
                    self._start(msg)
                now = time.monotonic()
                # Publish every commit interval, or earlier once a quarter of the in-flight room
                # holds results ready to go (one transaction per handful of results would cost the
                # broker more than the frames; waiting for more starved the detector, whose next
                # frames could not be consumed while finished ones held the room).
                if now >= next_commit or self._inflight.ready() >= publish_early:
                    await self._publish_finished()
                    next_commit = now + commit_every
                if not messages and self._inflight.count:
                    # Nothing new: wait briefly for work to finish instead of spinning.
                    await asyncio.sleep(min(0.01, commit_every))
            await self._drain()
        finally:
            await self._call(self._close)
            self._io.shutdown(wait=True)

    def stop(self) -> None:
        """Ask :meth:`run` to stop consuming, finish and commit."""
        self._stopping.set()

    async def _drain(self) -> None:
        timeout = self._s.shutdown_timeout_s
        log.info(
            "stopping: finishing %d in-flight tasks (up to %.0f s)", self._inflight.count, timeout
        )
        finished = await self._inflight.wait_all(timeout)
        await self._publish_finished()
        if not finished or self._inflight.count:
            dropped = self._inflight.drop()
            log.warning(
                "shutdown timeout: %d partitions handed back uncommitted: %s",
                len(dropped),
                dropped,
            )

    # ------------------------------------------------------------------ I/O thread
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, fn, *args)

    def _consumer_config(self) -> dict[str, Any]:
        return {
            **client_config(self._s),
            "group.id": self._s.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "isolation.level": "read_committed",
            "queued.max.messages.kbytes": 16384,
            "max.poll.interval.ms": 600000,
            "session.timeout.ms": self._s.session_timeout_ms,
            "heartbeat.interval.ms": max(500, self._s.session_timeout_ms // 5),
            "client.id": f"inference-service-{socket.gethostname()}-{os.getpid()}",
        }

    def _producer_config(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            **client_config(self._s),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.max.bytes": 2 * 1024 * 1024,
            "client.id": f"inference-service-{socket.gethostname()}-{os.getpid()}",
        }
        if self._exactly_once:
            conf["transactional.id"] = (
                f"{self._s.transactional_id_prefix}-{socket.gethostname()}-{os.getpid()}"
                f"-{self._generation}"
            )
            conf["transaction.timeout.ms"] = self._s.transaction_timeout_ms
        return conf

    def _open(self) -> None:
        self._producer = self._new_producer()
        consumer = Consumer(self._consumer_config())
        consumer.subscribe(
            [self._s.tasks_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._consumer = consumer
        log.info(
            "consuming %s as group %s (%s), publishing to %s",
            self._s.tasks_topic,
            self._s.group_id,
            self._s.delivery,
            self._s.results_topic,
        )

    def _new_producer(self) -> Producer:
        producer = Producer(self._producer_config())
        if self._exactly_once:
            attempt = 0
            while True:
                try:
                    _bounded("init_transactions", producer.init_transactions, 30)
                    break
                except _HungCallError as exc:
                    log.error("%s; trying a new producer", exc)
                    self._abandoned.append(producer)
                    self._generation += 1
                    producer = Producer(self._producer_config())
                    continue
                except KafkaException as exc:
                    err: KafkaError = exc.args[0]
                    if not err.retriable() or self._stopping.is_set():
                        raise
                    delay = self._backoff.delay(attempt)
                    log.warning("init_transactions failed (%s); retrying in %.1f s", err, delay)
                    time.sleep(delay)
                    attempt += 1
        return producer

    def _close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except KafkaException as exc:
                log.warning("closing the consumer: %s", exc)
        if self._producer is not None:
            self._producer.flush(10)

    def _poll(self, limit: int) -> list[Message]:
        assert self._consumer is not None
        self._maybe_update_lag()
        if self._producer is not None and not self._exactly_once:
            self._producer.poll(0)
        messages: list[Message] = self._consumer.consume(
            num_messages=limit if not self._paused else 1, timeout=0.05
        )
        if self._reapply_pause:
            fresh = [TopicPartition(tp.topic, tp.partition) for tp in self._reapply_pause]
            self._reapply_pause.clear()
            if self._paused:
                self._consumer.pause(fresh)
            else:
                self._consumer.resume(fresh)
        out: list[Message] = []
        for msg in messages:
            err = msg.error()
            if err is None:
                if self._first_delivery(msg):
                    out.append(msg)
            elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                log.warning("topic %s does not exist yet: %s", self._s.tasks_topic, err)
            else:
                log.warning("consumer error: %s", err)
        return out

    def _first_delivery(self, msg: Message) -> bool:
        """Track each partition's next offset; False for a record delivered before."""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        if topic is None or partition is None or offset is None:
            return True
        key = (topic, partition)
        expected = self._next_offset.get(key)
        if expected is not None and offset < expected:
            log.warning(
                "%s[%d]@%d delivered again (next expected %d): skipped", topic, partition, offset,
                expected,
            )  # fmt: skip
            self._metrics.redelivered.inc()
            return False
        self._next_offset[key] = offset + 1
        return True

    # ------------------------------------------------------------------ rebalances
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.ready = True
        self._metrics.rebalances.labels("assigned").inc()
        for tp in partitions:
            self._assigned.add((tp.topic, tp.partition))
            self._next_offset.pop((tp.topic, tp.partition), None)  # starts where the group says
        self._metrics.assigned_partitions.set(len(self._assigned))
        log.info("assigned %s", _names(partitions))
        # librdkafka keeps a partition's pause flag across a loss and re-assignment: set it
        # explicitly once the assignment is in place (see _poll).
        self._reapply_pause.extend(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._metrics.rebalances.labels("revoked").inc()
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        if not self._exactly_once:
            self._commit_acked(revoked, flush=True)
        self._forget(revoked)
        log.info("revoked %s", _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._metrics.rebalances.labels("lost").inc()
        self._forget([(tp.topic, tp.partition) for tp in partitions])
        log.warning("lost %s (session expired); their work is dropped", _names(partitions))

    def _forget(self, partitions: list[Partition]) -> None:
        for p in partitions:
            self._assigned.discard(p)
            self._next_offset.pop(p, None)
            self._acks.pop(p, None)
            self._uncommitted.pop(p, None)
        self._metrics.assigned_partitions.set(len(self._assigned))
        self._on_loop(lambda: self._inflight.drop(partitions))

    def _on_loop(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the event loop and wait for it (called from the I/O thread)."""
        assert self._loop is not None

        async def call() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=30)

    # ------------------------------------------------------------------ processing
    def _start(self, msg: Message) -> None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        assert topic is not None and partition is not None and offset is not None
        key = msg.key()
        value = msg.value()
        size = len(value or b"") + len(key or b"")
        record = Record(
            topic=topic,
            partition=partition,
            offset=offset,
            key=key if isinstance(key, bytes) else None,
            value=value if isinstance(value, bytes) else None,
        )
        if size > self._s.max_task_bytes:
            work = asyncio.ensure_future(self._processor.oversized(record, self._s.max_task_bytes))
        else:
            work = asyncio.ensure_future(self._processor.process(record))
        self._inflight.add((topic, partition), offset, work, size)

    async def _apply_backpressure(self) -> None:
        # Hysteresis: pause at the limits, resume once in-flight work is down to three quarters of
        # them (one early publish frees a quarter). Resuming at the limit itself toggled
        # pause/resume on every finished frame, and each resume re-fetches from the broker
        # (librdkafka drops a paused partition's fetched queue).
        count_limit, bytes_limit = self._s.max_in_flight, self._s.max_in_flight_bytes
        if self._paused:
            count_limit = max(1, count_limit * 3 // 4 + 1)
            bytes_limit = bytes_limit * 3 // 4 + 1
        full = (
            self._inflight.count >= count_limit
            or self._inflight.nbytes >= bytes_limit
            or self._processor.held_bytes >= bytes_limit
            or not self._health.healthy
        )
        if full != self._paused:
            await self._call(self._set_paused, full)
        self._metrics.in_flight.set(self._inflight.count)
        self._metrics.in_flight_bytes.set(self._inflight.nbytes)
        if full:
            # Let work finish; run() publishes it (commit interval or enough ready).
            await asyncio.sleep(0.005)

    def _set_paused(self, paused: bool) -> None:
        assert self._consumer is not None
        parts = [TopicPartition(t, p) for t, p in self._assigned]
        if parts:
            if paused:
                self._consumer.pause(parts)
            else:
                self._consumer.resume(parts)
        self._paused = paused
        self._metrics.paused.set(1 if paused else 0)
        log.debug("consumption %s", "paused" if paused else "resumed")

    # ------------------------------------------------------------------ publishing
    async def _publish_finished(self) -> None:
        finished = self._inflight.take_finished()
        if not finished and (self._exactly_once or not self._acks):
            return
        if self._exactly_once:
            if await self._call(self._commit_transaction, finished):
                self._commit_failures = 0
            else:
                # Kafka is unwell: back off before consuming again (the rewound records wait).
                delay = self._backoff.delay(self._commit_failures)
                self._commit_failures += 1
                log.warning("pausing %.1f s before consuming again", delay)
                await asyncio.sleep(delay)
        else:
            await self._call(self._produce_and_commit, finished)

    def _produce(self, item: Finished, on_delivery: Callable[..., None] | None = None) -> None:
        assert self._producer is not None
        outcome: Outcome = item.outcome
        if outcome.result is not None:
            self._produce_retrying(
                self._s.results_topic,
                outcome.key,
                json.dumps(outcome.result, separators=(",", ":")).encode(),
                None,
                on_delivery,
            )
        if outcome.dead_letter is not None:
            dl = outcome.dead_letter
            value = dl.value
            headers: list[tuple[str, str | bytes | None]] = list(dl.headers)
            if value is not None and len(value) > DLQ_MAX_VALUE_BYTES:
                headers.append(("value.truncated", str(len(value)).encode()))
                value = value[:DLQ_MAX_VALUE_BYTES]
            self._produce_retrying(
                self._s.dlq_topic,
                dl.key,
                value,
                headers,
                on_delivery if outcome.result is None else None,
            )

    def _produce_retrying(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, str | bytes | None]] | None,
        on_delivery: Callable[..., None] | None,
    ) -> None:
        assert self._producer is not None
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=on_delivery
                )
                return
            except BufferError:
                self._producer.poll(0.1)

    def _commit_transaction(self, finished: list[Finished]) -> bool:
        """exactly_once: one transaction with the results and the offsets after them.

        On failure the transaction is aborted (or the producer replaced when fenced), the
        partitions are rewound to their first unpublished record, and False is returned so that
        the caller backs off before consuming again. The I/O thread is never held for long, so
        rebalances keep being served while Kafka is unwell.
        """
        assert self._producer is not None and self._consumer is not None
        items = [f for f in finished if f.partition in self._assigned]
        if not items:
            return True
        offsets: dict[Partition, int] = {}
        first: dict[Partition, int] = {}
        for f in items:
            offsets[f.partition] = f.offset + 1
            first.setdefault(f.partition, f.offset)
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        started = time.monotonic()
        try:
            self._producer.begin_transaction()
            for f in items:
                self._produce(f)
            _bounded(
                "send_offsets_to_transaction",
                self._producer.send_offsets_to_transaction,
                tps,
                self._consumer.consumer_group_metadata(),
                TXN_CALL_TIMEOUT_S,
            )
            self._commit_with_retries()
        except _HungCallError as exc:
            self._metrics.transactions.labels("aborted").inc()
            log.error("%s; abandoning the producer, replacing it and rewinding", exc)
            self._abandon_producer()
            self._rewind(first)
            return False
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            self._metrics.transactions.labels("aborted").inc()
            if err.fatal():
                log.error("fatal producer error, replacing the producer: %s", err)
                self._replace_producer()
            else:
                log.warning("transaction failed (%s); aborting and rewinding", err)
                self._abort_quietly()
            self._rewind(first)
            return False
        self._metrics.transactions.labels("committed").inc()
        self._count(items)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "committed %d results in %.0f ms, offsets %s",
                len(items),
                (time.monotonic() - started) * 1000,
                {f"{t}[{p}]": (first[(t, p)], o) for (t, p), o in offsets.items()},
            )
        return True

    def _commit_with_retries(self) -> None:
        assert self._producer is not None
        for attempt in range(TXN_COMMIT_ATTEMPTS):
            try:
                _bounded(
                    "commit_transaction", self._producer.commit_transaction, TXN_CALL_TIMEOUT_S
                )
                return
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                last = attempt == TXN_COMMIT_ATTEMPTS - 1
                if not err.retriable() or err.txn_requires_abort() or last:
                    raise
                log.warning("commit failed (%s); retrying", err)
                time.sleep(self._backoff.delay(attempt))

    def _abandon_producer(self) -> None:
        """Replace a producer stuck inside librdkafka, keeping the old one referenced.

        Destroying it would block on the stuck call; its open transaction is aborted by the broker
        after ``transaction.timeout.ms``, and group-metadata fencing keeps it from committing.
        """
        if self._producer is not None:
            self._abandoned.append(self._producer)
        self._generation += 1
        self._producer = self._new_producer()

    def _replace_producer(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.flush(0)
        self._producer = self._new_producer()

    def _abort_quietly(self) -> None:
        assert self._producer is not None
        try:
            _bounded("abort_transaction", self._producer.abort_transaction, TXN_CALL_TIMEOUT_S)
        except _HungCallError as exc:
            log.error("%s; abandoning the producer", exc)
            self._abandon_producer()
        except KafkaException as exc:
            log.warning("abort failed (%s); replacing the producer", exc)
            self._replace_producer()

    def _rewind(self, first: dict[Partition, int]) -> None:
        """Seek each partition back to where the group's committed offset says and drop its work.

        A failed or abandoned transaction may still have committed (the broker took the commit
        but the answer was lost or late): the committed offsets, fetched as stable offsets
        (``read_committed`` makes librdkafka wait out a transaction still pending on them), say
        which. ``first`` (the first record of the failed cycle) serves where they cannot be read.
        """
        assert self._consumer is not None
        owned = [p for p in first if p in self._assigned]
        self._on_loop(lambda: self._inflight.drop(owned))
        positions = rewind_positions({p: first[p] for p in owned}, self._committed(owned))
        for (topic, partition), offset in positions.items():
            if offset != first[(topic, partition)]:
                log.warning(
                    "%s[%d]: the group's committed offset is %d, not %d: the failed transaction "
                    "had committed after all; resuming there (no result repeated)",
                    topic, partition, offset, first[(topic, partition)],
                )  # fmt: skip
            self._next_offset[(topic, partition)] = offset
            try:
                self._consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                log.warning("seek %s[%d]@%d failed: %s", topic, partition, offset, exc)
        log.warning("rewound %s", {f"{t}[{p}]": o for (t, p), o in positions.items()})

    def _committed(self, partitions: list[Partition]) -> dict[Partition, int]:
        """The group's committed offsets of ``partitions`` (those it has), or {} if unreadable."""
        assert self._consumer is not None
        if not partitions:
            return {}
        timeout = self._s.transaction_timeout_ms / 1000 + 10
        try:
            got = self._consumer.committed(
                [TopicPartition(t, p) for t, p in partitions], timeout=timeout
            )
        except KafkaException as exc:
            log.warning("could not read the committed offsets (%s); rewinding to the cycle", exc)
            return {}
        return {
            (tp.topic, tp.partition): tp.offset for tp in got if tp.error is None and tp.offset >= 0
        }

    def _produce_and_commit(self, finished: list[Finished]) -> None:
        """at_least_once: produce now; commit the acknowledged contiguous prefix."""
        assert self._producer is not None
        for f in finished:
            if f.partition not in self._assigned:
                continue
            lane = self._acks.setdefault(f.partition, _AckLane())
            lane.pending.append(f.offset)
            self._produce(f, self._ack_callback(f.partition, f.offset))
        self._count([f for f in finished if f.partition in self._assigned])
        self._producer.poll(0)
        self._commit_acked(list(self._acks))

    def _ack_callback(self, partition: Partition, offset: int) -> Callable[..., None]:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            lane = self._acks.get(partition)
            if lane is None:
                return
            if err is None:
                lane.acked.add(offset)
            else:
                log.warning("result of %s@%d not delivered: %s", partition, offset, err)
                lane.failed = offset if lane.failed is None else min(lane.failed, offset)

        return on_delivery

    def _commit_acked(self, partitions: list[Partition], flush: bool = False) -> None:
        assert self._consumer is not None and self._producer is not None
        if flush:
            self._producer.flush(30)
        rewind: dict[Partition, int] = {}
        for p in partitions:
            lane = self._acks.get(p)
            if lane is None:
                continue
            offset = lane.committable()
            if offset is not None:
                self._uncommitted[p] = offset
            if lane.failed is not None:
                rewind[p] = lane.failed
                self._acks.pop(p)
        # Offsets whose commit failed (e.g. during a rebalance) are tried again every cycle.
        todo = {p: o for p, o in self._uncommitted.items() if p in self._assigned}
        if todo:
            try:
                self._consumer.commit(
                    offsets=[TopicPartition(t, n, o) for (t, n), o in todo.items()],
                    asynchronous=False,
                )
                self._metrics.transactions.labels("committed").inc()
                for p, o in todo.items():
                    if self._uncommitted.get(p) == o:
                        del self._uncommitted[p]
            except KafkaException as exc:
                self._metrics.transactions.labels("failed").inc()
                log.warning("offset commit failed (retried next cycle): %s", exc)
        if rewind:
            self._rewind(rewind)

    def _count(self, items: list[Finished]) -> None:
        for f in items:
            oc = f.outcome
            if oc.result is not None:
                self._metrics.results.labels(oc.status).inc()
            if oc.dead_letter is not None:
                self._metrics.dead_letters.labels(oc.status).inc()
            self._metrics.observe_timings(oc.timings_ms)

    # ------------------------------------------------------------------ lag
    def _maybe_update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < 5.0 or self._consumer is None or not self._assigned:
            return
        self._last_lag = now
        parts = [TopicPartition(t, p) for t, p in self._assigned]
        try:
            positions = self._consumer.position(parts)
            for tp in positions:
                # The watermarks the last fetch brought, not a broker query: a query per partition
                # on this thread held consumption and commits up for a second at a time.
                _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    continue
                pos = tp.offset if tp.offset >= 0 else _low
                self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, high - pos)
                )
        except KafkaException as exc:
            log.debug("lag not updated: %s", exc)


def rewind_positions(
    first: dict[Partition, int], committed: dict[Partition, int]
) -> dict[Partition, int]:
    """Where each partition resumes after a failed transaction: at the group's committed offset
    where it has one (the broker knows whether the transaction committed after all), else at the
    first record of the failed cycle."""
    return {p: committed.get(p, offset) for p, offset in first.items()}


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
