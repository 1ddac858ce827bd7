"""``at_least_once``: results produced as they finish, offsets committed behind acknowledgements.

The producer is idempotent (no duplicates from its own retries). An offset is committed only up to
the last contiguous record whose messages (result and dead letter) the broker acknowledged
(:class:`~inference_service.pipeline.acks.AckLedger`); a refused message rewinds its partition.
Before a partition is handed over the producer is flushed and that prefix committed, so the new
owner repeats as little as possible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from inference_service.adapters.kafka.config import service_producer_config
from inference_service.adapters.kafka.io import KafkaIO
from inference_service.adapters.kafka.produce import produce_outcome
from inference_service.adapters.kafka.source import KafkaTaskSource
from inference_service.domain import Finished, Partition
from inference_service.metrics import Metrics
from inference_service.pipeline.acks import AckLedger
from inference_service.ports import Published
from inference_service.processing import MessageLimits
from inference_service.settings import Settings

log = logging.getLogger(__name__)

FLUSH_ON_REVOKE_S = 30.0
"""Longest wait for outstanding acknowledgements before revoked partitions are committed."""
FLUSH_ON_CLOSE_S = 10.0


class AcknowledgingSink:
    """:class:`~inference_service.ports.ResultSink` for ``at_least_once``."""

    def __init__(
        self,
        settings: Settings,
        io: KafkaIO,
        source: KafkaTaskSource,
        metrics: Metrics,
        limits: MessageLimits | None = None,
    ) -> None:
        self._s = settings
        self._limits = limits
        self._io = io
        self._source = source
        self._metrics = metrics
        self._ledger = AckLedger()
        self._producer: Producer | None = None

    async def open(self) -> None:
        self._producer = await self._io.call(
            Producer, service_producer_config(self._s, None, self._limits)
        )

    async def publish(self, finished: list[Finished]) -> Published:
        if not finished and self._ledger.idle:
            return Published()
        return await self._io.call(self._publish, finished)

    def revoked(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        if not lost:
            # Commit what the revoked partitions had acknowledged; the others settle as usual at
            # the next publish (a refusal of theirs found by this flush stays in their lane).
            self._settle(flush=True, partitions=partitions)
        self._ledger.forget(partitions)

    async def close(self) -> None:
        if self._producer is not None:
            await self._io.call(self._producer.flush, FLUSH_ON_CLOSE_S)

    # ------------------------------------------------------------------ on the I/O thread
    def _publish(self, finished: list[Finished]) -> Published:
        producer = self._require_producer()
        producer.poll(0)  # serve the delivery reports that arrived since the last cycle
        # Settle first: a partition with a refused message is rewound, and its finished records
        # are not sent (they are consumed again from the rewound offset).
        rewind = self._settle(flush=False)
        sent: list[Finished] = []
        for f in finished:
            if f.partition in rewind:
                continue
            messages = (f.outcome.result is not None) + (f.outcome.dead_letter is not None)
            # The ledger learns the record before its messages can be acknowledged.
            generation = self._ledger.sent(f.partition, f.offset, messages=messages)
            produce_outcome(
                producer, self._s, f, self._on_delivery(f.partition, f.offset, generation)
            )
            sent.append(f)
        producer.poll(0)
        return Published(published=sent, rewind=rewind)

    def _settle(
        self, *, flush: bool, partitions: Sequence[Partition] | None = None
    ) -> dict[Partition, int]:
        """Commit the acknowledged prefix; the partitions to rewind after a refused message."""
        producer = self._require_producer()
        if flush:
            producer.flush(FLUSH_ON_REVOKE_S)
        settlement = self._ledger.settle(partitions)
        # Offsets whose commit failed (e.g. during a rebalance) are tried again every cycle.
        if settlement.commit:
            offsets = [TopicPartition(t, n, o) for (t, n), o in settlement.commit.items()]
            try:
                self._source.consumer.commit(offsets=offsets, asynchronous=False)
                self._metrics.transactions.labels("committed").inc()
                self._ledger.committed(settlement.commit)
            except KafkaException as exc:
                self._metrics.transactions.labels("failed").inc()
                log.warning("offset commit failed (retried next cycle): %s", exc)
        return settlement.rewind

    def _on_delivery(
        self, partition: Partition, offset: int, generation: int
    ) -> Callable[..., None]:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                log.warning("a message of %s@%d was not delivered: %s", partition, offset, err)
            self._ledger.delivered(partition, offset, ok=err is None, generation=generation)

        return on_delivery

    def _require_producer(self) -> Producer:
        if self._producer is None:
            raise RuntimeError("the sink is not open: call open() first")
        return self._producer
