"""Kafka behind the pipeline's ports, one job per module.

* ``config``: client configuration (brokers, security) for every client of the project, and the
  start-up probe;
* ``instance``: this replica's instance id, the stable half of its transactional id;
* ``io``: the single I/O thread every librdkafka call runs on, and the hung-call watchdog;
* ``source``: the consumer group as a ``TaskSource`` (rebalances, pause state, lag);
* ``transactional``: the ``exactly_once`` sink (one transaction per commit cycle);
* ``acknowledging``: the ``at_least_once`` sink (offsets behind acknowledgements);
* ``produce``: an outcome's result and dead letter as producer messages.
"""

from __future__ import annotations

import threading

from inference_service.adapters.kafka.acknowledging import AcknowledgingSink
from inference_service.adapters.kafka.config import (
    client_config,
    kafka_ready,
    message_limits,
    reader_config,
    writer_config,
)
from inference_service.adapters.kafka.instance import InstanceId, claim_instance_id
from inference_service.adapters.kafka.io import KafkaIO
from inference_service.adapters.kafka.source import KafkaTaskSource
from inference_service.adapters.kafka.transactional import TransactionalSink
from inference_service.metrics import Metrics
from inference_service.ports import ResultSink
from inference_service.processing import MessageLimits
from inference_service.settings import Settings

__all__ = [
    "AcknowledgingSink",
    "InstanceId",
    "KafkaIO",
    "KafkaTaskSource",
    "TransactionalSink",
    "claim_instance_id",
    "client_config",
    "kafka_ready",
    "message_limits",
    "open_kafka",
    "reader_config",
    "writer_config",
]


def open_kafka(
    settings: Settings, metrics: Metrics, limits: MessageLimits, stopping: threading.Event
) -> tuple[KafkaIO, KafkaTaskSource, ResultSink]:
    """The source and the delivery mode's sink, sharing one I/O thread (nothing connects yet).

    ``limits`` sizes the producer's batches; ``stopping`` ends the sink's start-up retries.
    """
    io = KafkaIO()
    source = KafkaTaskSource(settings, io, metrics)
    sink: ResultSink
    if settings.delivery == "exactly_once":
        instance = claim_instance_id(settings)
        sink = TransactionalSink(settings, io, source, metrics, limits, stopping, instance=instance)
    else:
        sink = AcknowledgingSink(settings, io, source, metrics, limits)
    return io, source, sink
