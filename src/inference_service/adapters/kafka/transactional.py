"""``exactly_once``: each commit cycle is one Kafka transaction (results, dead letters, offsets).

The consumed offsets go into the transaction with the consumer's group metadata, so an instance
that lost its partitions (a zombie) is fenced by the group coordinator. A transaction that fails
is aborted (the producer replaced when the error is fatal); a call that hangs past the watchdog
abandons the producer and starts a new one. Either way the cycle is reported failed, with the first
offset of each of its partitions, and the pipeline rewinds them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from inference_service.adapters.kafka.config import service_producer_config
from inference_service.adapters.kafka.io import KafkaIO, bounded
from inference_service.adapters.kafka.produce import produce_outcome
from inference_service.adapters.kafka.source import KafkaTaskSource
from inference_service.domain import Finished, Partition
from inference_service.errors import HungCallError, KafkaUnavailableError
from inference_service.metrics import Metrics
from inference_service.ports import Published
from inference_service.processing import Backoff, MessageLimits
from inference_service.settings import Settings

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0
"""Longest wait of one transactional call (send offsets, commit, abort)."""
INIT_TIMEOUT_S = 30.0
"""``init_transactions``' own timeout."""
COMMIT_ATTEMPTS = 3
"""Tries of a commit that fails retriably before the transaction is aborted and rewound."""
FLUSH_ON_CLOSE_S = 10.0


class TransactionalSink:
    """:class:`~inference_service.ports.ResultSink` for ``exactly_once``."""

    def __init__(
        self,
        settings: Settings,
        io: KafkaIO,
        source: KafkaTaskSource,
        metrics: Metrics,
        limits: MessageLimits | None = None,
        stopping: threading.Event | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._s = settings
        self._limits = limits
        self._stopping = stopping or threading.Event()
        self._io = io
        self._source = source
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self._producer: Producer | None = None
        self._generation = 0
        self._abandoned: list[Producer] = []
        """Producers stuck inside librdkafka, kept referenced: destroying one blocks on its call."""

    async def open(self) -> None:
        await self._io.call(self._open)

    async def publish(self, finished: list[Finished]) -> Published:
        if not finished:
            return Published()
        return await self._io.call(self._commit_transaction, finished)

    def revoked(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        """Nothing to settle: only committed transactions count, and none is open between cycles."""

    async def close(self) -> None:
        if self._producer is not None:
            await self._io.call(self._producer.flush, FLUSH_ON_CLOSE_S)

    # ------------------------------------------------------------------ on the I/O thread
    def _transactional_id(self) -> str:
        """Unique per process and producer generation (two replicas on one host differ)."""
        host, pid = socket.gethostname(), os.getpid()
        return f"{self._s.transactional_id_prefix}-{host}-{pid}-{self._generation}"

    def _open(self) -> None:
        self._producer = self._new_producer()

    def _make_producer(self) -> Producer:
        return Producer(service_producer_config(self._s, self._transactional_id(), self._limits))

    def _new_producer(self) -> Producer:
        producer = Producer(
            service_producer_config(self._s, self._transactional_id(), self._limits)
        )
        attempt = 0
        while True:
            try:
                bounded("init_transactions", producer.init_transactions, INIT_TIMEOUT_S)
                return producer
            except HungCallError as exc:
                log.error("%s; trying a new producer", exc)
                self._abandoned.append(producer)
                self._generation += 1
                producer = Producer(
                    service_producer_config(self._s, self._transactional_id(), self._limits)
                )
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if not err.retriable():
                    raise
                if self._stopping.is_set():
                    raise KafkaUnavailableError(
                        f"stopping while the transactional producer could not start: {err}"
                    ) from exc
                delay = self._backoff.delay(attempt)
                log.warning("init_transactions failed (%s); retrying in %.1f s", err, delay)
                time.sleep(delay)
                attempt += 1

    def _commit_transaction(self, items: list[Finished]) -> Published:
        """One transaction with the results and the offsets after them."""
        producer = self._require_producer()
        offsets: dict[Partition, int] = {}
        first: dict[Partition, int] = {}
        for f in items:
            offsets[f.partition] = f.offset + 1
            first.setdefault(f.partition, f.offset)
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        started = time.monotonic()
        try:
            producer.begin_transaction()
            for f in items:
                produce_outcome(producer, self._s, f)
            bounded(
                "send_offsets_to_transaction",
                producer.send_offsets_to_transaction,
                tps,
                self._source.consumer.consumer_group_metadata(),
                CALL_TIMEOUT_S,
            )
            self._commit_with_retries(producer)
        except HungCallError as exc:
            self._metrics.transactions.labels("aborted").inc()
            log.error("%s; abandoning the producer, replacing it and rewinding", exc)
            self._abandon_producer()
            return Published(rewind=first)
        except Exception as exc:
            self._metrics.transactions.labels("aborted").inc()
            if not isinstance(exc, KafkaException):
                # Not the broker: a bug while producing. Abort, so no half cycle stays open.
                log.exception("transaction failed unexpectedly; aborting and rewinding")
                self._abort_quietly()
                return Published(rewind=first)
            err: KafkaError = exc.args[0]
            if err.fatal():
                log.error("fatal producer error, replacing the producer: %s", err)
                self._replace_producer()
            else:
                log.warning("transaction failed (%s); aborting and rewinding", err)
                self._abort_quietly()
            return Published(rewind=first)
        self._metrics.transactions.labels("committed").inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "committed %d results in %.0f ms, offsets %s",
                len(items),
                (time.monotonic() - started) * 1000,
                {f"{t}[{p}]": (first[(t, p)], o) for (t, p), o in offsets.items()},
            )
        return Published(published=items)

    def _commit_with_retries(self, producer: Producer) -> None:
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                bounded("commit_transaction", producer.commit_transaction, CALL_TIMEOUT_S)
                return
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                last = attempt == COMMIT_ATTEMPTS - 1
                if not err.retriable() or err.txn_requires_abort() or last:
                    raise
                log.warning("commit failed (%s); retrying", err)
                time.sleep(self._backoff.delay(attempt))

    def _abandon_producer(self) -> None:
        """Replace a producer stuck inside librdkafka, keeping the old one referenced.

        Its open transaction is aborted by the broker after ``transaction.timeout.ms``.
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
        producer = self._require_producer()
        try:
            bounded("abort_transaction", producer.abort_transaction, CALL_TIMEOUT_S)
        except HungCallError as exc:
            log.error("%s; abandoning the producer", exc)
            self._abandon_producer()
        except KafkaException as exc:
            log.warning("abort failed (%s); replacing the producer", exc)
            self._replace_producer()

    def _require_producer(self) -> Producer:
        if self._producer is None:
            raise RuntimeError("the sink is not open: call open() first")
        return self._producer
