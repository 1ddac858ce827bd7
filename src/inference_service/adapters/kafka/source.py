"""The service's consumer as a :class:`~inference_service.ports.TaskSource`.

Consumer group ``settings.group_id`` on ``settings.tasks_topic``, cooperative-sticky assignment,
offsets committed only by the sinks. Every librdkafka call runs on the shared :class:`KafkaIO`
thread; rebalance callbacks therefore run there too, inside :meth:`KafkaTaskSource.poll`, and tell
the pipeline's listener before they return.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from inference_service.adapters.kafka.config import service_consumer_config
from inference_service.adapters.kafka.io import KafkaIO
from inference_service.domain import Partition, Record
from inference_service.metrics import Metrics
from inference_service.ports import PartitionListener
from inference_service.settings import Settings

log = logging.getLogger(__name__)

POLL_WAIT_S = 0.05
"""How long one poll waits for records (short: the loop also publishes and applies pressure)."""
LAG_EVERY_S = 5.0
"""How often the consumer-lag gauge is refreshed."""
COMMITTED_TIMEOUT_S = 10.0
"""Longest wait for committed offsets; one that cannot be read is asked again later, while its
partition stays paused, instead of holding the I/O thread for a whole transaction timeout."""


class KafkaTaskSource:
    """Consume task records; pause, resume, seek; report assignment changes."""

    def __init__(self, settings: Settings, io: KafkaIO, metrics: Metrics) -> None:
        self._s = settings
        self._io = io
        self._metrics = metrics
        self._consumer: Consumer | None = None
        self._listener: PartitionListener | None = None
        self._assigned: set[Partition] = set()
        self._paused = False
        self._held: set[Partition] = set()
        """Partitions kept paused whatever :meth:`set_paused` says (see :meth:`hold`)."""
        self._reapply_pause: list[TopicPartition] = []
        self._next_offset: dict[Partition, int] = {}
        """Per partition, the offset after the last record returned: a record below it is one the
        client delivered twice, and is skipped."""
        self._last_lag = 0.0
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def consumer(self) -> Consumer:
        """The librdkafka consumer, for the sinks (offsets, group metadata); I/O thread only."""
        if self._consumer is None:
            raise RuntimeError("the Kafka source is not open: call open() first")
        return self._consumer

    # ------------------------------------------------------------------ TaskSource
    async def open(self, listener: PartitionListener) -> None:
        self._listener = listener
        await self._io.call(self._open)

    async def poll(self, max_records: int) -> list[Record]:
        return await self._io.call(self._poll, max_records)

    async def set_paused(self, paused: bool) -> None:
        await self._io.call(self._set_paused, paused)

    async def committed(self, partitions: Sequence[Partition]) -> dict[Partition, int | None]:
        return await self._io.call(self._committed, list(partitions))

    async def seek(self, positions: dict[Partition, int]) -> set[Partition]:
        return await self._io.call(self._seek, positions)

    async def hold(self, partitions: Sequence[Partition]) -> None:
        await self._io.call(self._hold, list(partitions), True)

    async def release(self, partitions: Sequence[Partition]) -> None:
        await self._io.call(self._hold, list(partitions), False)

    async def close(self) -> None:
        await self._io.call(self._close)

    # ------------------------------------------------------------------ on the I/O thread
    def _open(self) -> None:
        consumer = Consumer(service_consumer_config(self._s))
        consumer.subscribe(
            [self._s.tasks_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._consumer = consumer
        log.info(
            "consuming %s as group %s (%s), publishing to %s",
            self._s.tasks_topic, self._s.group_id, self._s.delivery, self._s.results_topic,
        )  # fmt: skip

    def _close(self) -> None:
        if self._consumer is None:
            return
        try:
            self._consumer.close()  # revocations are served from inside close()
        except KafkaException as exc:
            log.warning("closing the consumer: %s", exc)

    def _poll(self, limit: int) -> list[Record]:
        consumer = self.consumer
        self._maybe_update_lag()
        messages: list[Message] = consumer.consume(
            num_messages=limit if not self._paused else 1, timeout=POLL_WAIT_S
        )
        if self._reapply_pause:
            # librdkafka keeps a partition's pause flag across a loss and re-assignment: set it
            # explicitly once the assignment is in place.
            fresh = [TopicPartition(tp.topic, tp.partition) for tp in self._reapply_pause]
            self._reapply_pause.clear()
            if self._paused:
                consumer.pause(fresh)
            else:  # a fresh assignment is never held: holds end with the revocation
                consumer.resume(fresh)
        out: list[Record] = []
        for msg in messages:
            err = msg.error()
            if err is None:
                record = _record(msg)
                # A record fetched before its partition was revoked (inside this very consume)
                # belongs to the partition's next owner.
                if (
                    record is not None
                    and record.source in self._assigned
                    and self._first_delivery(record)
                ):
                    out.append(record)
            elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                log.warning("topic %s does not exist yet: %s", self._s.tasks_topic, err)
            else:
                log.warning("consumer error: %s", err)
        return out

    def _first_delivery(self, record: Record) -> bool:
        """Track each partition's next offset; False for a record delivered before."""
        expected = self._next_offset.get(record.source)
        if expected is not None and record.offset < expected:
            log.warning(
                "%s[%d]@%d delivered again (next expected %d): skipped",
                record.topic, record.partition, record.offset, expected,
            )  # fmt: skip
            self._metrics.redelivered.inc()
            return False
        self._next_offset[record.source] = record.offset + 1
        return True

    def _set_paused(self, paused: bool) -> None:
        if paused:
            parts = [TopicPartition(t, p) for t, p in self._assigned]
        else:  # held partitions stay paused until released
            parts = [TopicPartition(t, p) for t, p in self._assigned - self._held]
        if parts:
            if paused:
                self.consumer.pause(parts)
            else:
                self.consumer.resume(parts)
        self._paused = paused

    def _committed(self, partitions: list[Partition]) -> dict[Partition, int | None]:
        """The group's committed offsets of the ``partitions`` it could read (None: the group has
        none); a partition left out could not be read.

        Read as stable offsets (``read_committed``): while a transaction on them is pending the
        broker answers "unstable", which librdkafka retries until this call's timeout.
        """
        if not partitions:
            return {}
        try:
            got = self.consumer.committed(
                [TopicPartition(t, p) for t, p in partitions], timeout=COMMITTED_TIMEOUT_S
            )
        except KafkaException as exc:
            log.warning("could not read the committed offsets of %s (%s)", partitions, exc)
            return {}
        out: dict[Partition, int | None] = {}
        for tp in got:
            if tp.error is not None:
                log.warning("could not read the committed offset of %s[%d] (%s)",
                            tp.topic, tp.partition, tp.error)  # fmt: skip
                continue
            out[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else None
        return out

    def _seek(self, positions: dict[Partition, int]) -> set[Partition]:
        sought: set[Partition] = set()
        for (topic, partition), offset in positions.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                log.warning("seek %s[%d]@%d failed: %s", topic, partition, offset, exc)
                continue
            self._next_offset[(topic, partition)] = offset
            sought.add((topic, partition))
        return sought

    def _hold(self, partitions: list[Partition], held: bool) -> None:
        parts = [p for p in partitions if p in self._assigned]
        if held:
            self._held.update(parts)
            if parts:
                self.consumer.pause([TopicPartition(t, p) for t, p in parts])
            return
        self._held.difference_update(partitions)
        if parts and not self._paused:
            self.consumer.resume([TopicPartition(t, p) for t, p in parts])

    # ------------------------------------------------------------------ rebalance callbacks
    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._ready = True
        self._metrics.rebalances.labels("assigned").inc()
        added = [(tp.topic, tp.partition) for tp in partitions]
        for p in added:
            self._assigned.add(p)
            self._next_offset.pop(p, None)  # starts where the group says
        self._metrics.assigned_partitions.set(len(self._assigned))
        log.info("assigned %s", _names(partitions))
        self._reapply_pause.extend(partitions)
        if self._listener is not None:
            self._listener.assigned(added)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._metrics.rebalances.labels("revoked").inc()
        self._forget(partitions, lost=False)
        log.info("revoked %s", _names(partitions))

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._metrics.rebalances.labels("lost").inc()
        self._forget(partitions, lost=True)
        log.warning("lost %s (session expired); their work is dropped", _names(partitions))

    def _forget(self, partitions: list[TopicPartition], *, lost: bool) -> None:
        gone = [(tp.topic, tp.partition) for tp in partitions]
        if self._listener is not None:
            self._listener.revoked(gone, lost=lost)
        for p in gone:
            self._assigned.discard(p)
            self._held.discard(p)
            self._next_offset.pop(p, None)
        self._metrics.assigned_partitions.set(len(self._assigned))

    # ------------------------------------------------------------------ lag
    def _maybe_update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < LAG_EVERY_S or not self._assigned:
            return
        self._last_lag = now
        parts = [TopicPartition(t, p) for t, p in self._assigned]
        try:
            for tp in self.consumer.position(parts):
                # The watermarks the last fetch brought, not a broker query: a query per partition
                # on this thread would hold consumption and commits up meanwhile.
                low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    continue
                pos = tp.offset if tp.offset >= 0 else low
                self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, high - pos)
                )
        except KafkaException as exc:
            log.debug("lag not updated: %s", exc)


def _record(msg: Message) -> Record | None:
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        return None
    key: Any = msg.key()
    value: Any = msg.value()
    return Record(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key if isinstance(key, bytes) else None,
        value=value if isinstance(value, bytes) else None,
    )


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
