"""The exactly_once sink on the real broker never commits offsets with group metadata that the
group coordinator would not check.

A consumer between losing its membership and rejoining carries librdkafka's generation -1 and no
member id; a transactional offset commit with that metadata is what a producer outside any group
sends, and the broker accepts it even while another member owns the partitions (the first test
shows this broker doing so). The sink must refuse such a cycle instead of committing it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from inference_service.adapters.kafka import InstanceId, KafkaIO, KafkaTaskSource, TransactionalSink
from inference_service.domain import Finished, Outcome
from inference_service.metrics import Metrics
from inference_service.ports import PartitionListener
from inference_service.settings import Settings

pytestmark = [pytest.mark.kafka]


class _Listener(PartitionListener):
    def assigned(self, partitions: Any) -> None: ...

    def revoked(self, partitions: Any, *, lost: bool) -> None: ...


def _live_member(bootstrap: str, group: str, topic: str) -> Consumer:
    """A consumer that has joined ``group`` and owns ``topic``'s partition."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "partition.assignment.strategy": "cooperative-sticky",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "log_level": 0})  # fmt: skip
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    while not consumer.assignment():
        assert time.monotonic() < deadline, "the member never got its assignment"
        consumer.poll(0.2)
    return consumer


def _committed(bootstrap: str, group: str, topic: str) -> int:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                      "isolation.level": "read_committed", "log_level": 0})  # fmt: skip
    try:
        return int(probe.committed([TopicPartition(topic, 0)], timeout=10)[0].offset)
    finally:
        probe.close()


def _outcome() -> Outcome:
    return Outcome(key=b"video-1", result={"task_id": "video-1:0"}, dead_letter=None,
                   status="ok", timings_ms={}, payload=b'{"task_id": "video-1:0"}')  # fmt: skip


def test_this_broker_takes_offsets_from_outside_the_group(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    """The premise: metadata with generation -1 and no member id commits offsets of a partition
    a live member owns (librdkafka's not-joined consumer carries exactly that)."""
    topic = unique_topic(1, "zombie")
    group = f"group-{uuid.uuid4().hex[:8]}"
    member = _live_member(kafka_bootstrap, group, topic)
    outsider = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group,
                         "log_level": 0})  # fmt: skip
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "log_level": 0,
                         "transactional.id": f"zombie-{uuid.uuid4().hex[:8]}"})  # fmt: skip
    try:
        producer.init_transactions(30)
        producer.begin_transaction()
        producer.send_offsets_to_transaction(
            [TopicPartition(topic, 0, 5)], outsider.consumer_group_metadata(), 10
        )
        producer.commit_transaction(10)
        assert _committed(kafka_bootstrap, group, topic) == 5
    finally:
        outsider.close()
        member.close()


def test_the_sink_refuses_a_cycle_while_its_consumer_is_not_a_member(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    """The sink's consumer has not joined (generation -1, no member id) while another member owns
    the partition: the cycle is rewound, nothing is committed, no result becomes visible."""
    tasks, results, dlq = unique_topic(1, "tasks"), unique_topic(1, "results"), unique_topic(1)
    group = f"group-{uuid.uuid4().hex[:8]}"
    member = _live_member(kafka_bootstrap, group, tasks)
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, tasks_topic=tasks,
                        results_topic=results, dlq_topic=dlq, group_id=group)  # fmt: skip
    io = KafkaIO()
    source = KafkaTaskSource(settings, io, Metrics())
    sink = TransactionalSink(settings, io, source, Metrics(),
                             instance=InstanceId(f"zombie-{uuid.uuid4().hex[:8]}"))  # fmt: skip

    async def go() -> Any:
        await sink.open()
        await source.open(_Listener())  # subscribed, not polled: not a member yet
        try:
            return await sink.publish([Finished((tasks, 0), 0, _outcome())])
        finally:
            await source.close()
            await sink.close()

    try:
        outcome = asyncio.run(go())
    finally:
        io.shutdown()
    try:
        assert outcome.rewind == {(tasks, 0): 0}
        assert outcome.published == []
        assert _committed(kafka_bootstrap, group, tasks) < 0  # no offset committed
        reader = Consumer({"bootstrap.servers": kafka_bootstrap, "log_level": 0,
                           "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                           "auto.offset.reset": "earliest",
                           "isolation.level": "read_committed"})  # fmt: skip
        reader.subscribe([results])
        seen = [m for m in reader.consume(10, 5.0) if m.error() is None]
        reader.close()
        assert seen == []
    finally:
        member.close()
