"""Kafka client configuration, one home for every client of the project.

The service's consumer and producers, ``submit``, ``collect``, ``replay-dlq``, the demo and the
benchmarks all build their librdkafka configuration here, so brokers and security settings
(``INFERENCE_KAFKA_SECURITY_PROTOCOL``, SASL, TLS) apply to each of them alike.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType  # type: ignore[attr-defined]

from inference_service.errors import ConfigError, KafkaUnavailableError
from inference_service.processing import KAFKA_DEFAULT_MAX_MESSAGE_BYTES, MessageLimits
from inference_service.settings import Settings

log = logging.getLogger(__name__)

FETCH_QUEUE_KBYTES = 16384
"""librdkafka's prefetch per consumer is capped here, so memory stays flat under a backlog."""
PRODUCER_MAX_MESSAGE_BYTES = 2 * 1024 * 1024
"""The service producer's ``message.max.bytes``."""
LIBRDKAFKA_BATCH_BYTES = 1_000_000
"""librdkafka's default ``batch.size``; lowered to the smallest output topic's limit."""


def client_config(settings: Settings) -> dict[str, Any]:
    """The brokers and security properties that every Kafka client of the project uses."""
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


def client_id() -> str:
    """``client.id`` of this process's clients (broker logs and quotas name it)."""
    return f"inference-service-{socket.gethostname()}-{os.getpid()}"


def service_consumer_config(settings: Settings) -> dict[str, Any]:
    """The service's group consumer: manual offsets, cooperative rebalancing, read_committed."""
    return {
        **client_config(settings),
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "isolation.level": "read_committed",
        "queued.max.messages.kbytes": FETCH_QUEUE_KBYTES,
        "max.poll.interval.ms": 600000,
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(500, settings.session_timeout_ms // 5),
        "client.id": client_id(),
    }


def service_producer_config(
    settings: Settings, transactional_id: str | None, limits: MessageLimits | None = None
) -> dict[str, Any]:
    """The service's producer: idempotent; transactional when ``transactional_id`` is given.

    A batch never outgrows the smallest output topic's ``max.message.bytes``: the broker refuses
    a whole batch over it, which would abort every transaction holding it.
    """
    smallest = min(limits.result_bytes, limits.dead_letter_bytes) if limits else None
    conf: dict[str, Any] = {
        **writer_config(settings),
        "message.max.bytes": PRODUCER_MAX_MESSAGE_BYTES,
        "batch.size": min(LIBRDKAFKA_BATCH_BYTES, smallest or LIBRDKAFKA_BATCH_BYTES),
        "client.id": client_id(),
    }
    if transactional_id is not None:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = settings.transaction_timeout_ms
    return conf


def writer_config(settings: Settings) -> dict[str, Any]:
    """A producer that loses and repeats nothing it was handed (idempotent, all replicas)."""
    return {
        **client_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
    }


def reader_config(settings: Settings, group_id: str, **extra: Any) -> dict[str, Any]:
    """A consumer that reads committed records only and commits nothing by itself."""
    return {
        **client_config(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        **extra,
    }


def message_limits(settings: Settings, timeout: float = 10.0) -> MessageLimits:
    """The largest result and dead letter the output topics take: the smaller of the producer's
    ``message.max.bytes`` and each topic's ``max.message.bytes`` (the broker's default where a
    topic does not exist yet or cannot be described)."""
    admin = AdminClient(client_config(settings))
    topics = {"result": settings.results_topic, "dead_letter": settings.dlq_topic}
    found: dict[str, int] = {}
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in topics.values()]
    try:
        futures = admin.describe_configs(resources, request_timeout=timeout)
    except KafkaException as exc:
        log.info("topic limits not read (%s); using Kafka's default", exc)
        futures = {}
    for resource, future in futures.items():
        try:
            entry = future.result(timeout=timeout).get("max.message.bytes")
        except KafkaException as exc:
            log.info("topic %s: max.message.bytes not read (%s); using Kafka's default",
                     resource.name, exc)  # fmt: skip
            continue
        if entry is not None and entry.value is not None:
            found[resource.name] = int(entry.value)
    default = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    limits = MessageLimits(
        result_bytes=min(PRODUCER_MAX_MESSAGE_BYTES, found.get(topics["result"], default)),
        dead_letter_bytes=min(
            PRODUCER_MAX_MESSAGE_BYTES, found.get(topics["dead_letter"], default)
        ),
    )
    log.info(
        "largest message: %d bytes to %s, %d bytes to %s",
        limits.result_bytes, topics["result"], limits.dead_letter_bytes, topics["dead_letter"],
    )  # fmt: skip
    return limits


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
