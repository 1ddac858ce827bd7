"""Turning one outcome into producer messages: its result and its dead letter."""

from __future__ import annotations

import json
from collections.abc import Callable

from confluent_kafka import Producer

from inference_service.domain import Finished
from inference_service.settings import Settings

DLQ_MAX_VALUE_BYTES = 512 * 1024
"""A dead letter larger than this keeps only its first bytes (header ``value.truncated``)."""

Headers = list[tuple[str, str | bytes | None]]
DeliveryCallback = Callable[..., None]


def produce_outcome(
    producer: Producer,
    settings: Settings,
    item: Finished,
    on_delivery: DeliveryCallback | None = None,
) -> int:
    """Hand ``item``'s result and dead letter to ``producer``; the number of messages handed."""
    outcome = item.outcome
    sent = 0
    if outcome.result is not None:
        value = json.dumps(outcome.result, separators=(",", ":")).encode()
        _produce(producer, settings.results_topic, outcome.key, value, None, on_delivery)
        sent += 1
    if outcome.dead_letter is not None:
        dl = outcome.dead_letter
        dl_value = dl.value
        headers: Headers = list(dl.headers)
        if dl_value is not None and len(dl_value) > DLQ_MAX_VALUE_BYTES:
            headers.append(("value.truncated", str(len(dl_value)).encode()))
            dl_value = dl_value[:DLQ_MAX_VALUE_BYTES]
        _produce(producer, settings.dlq_topic, dl.key, dl_value, headers, on_delivery)
        sent += 1
    return sent


def _produce(
    producer: Producer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Headers | None,
    on_delivery: DeliveryCallback | None,
) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
            return
        except BufferError:  # the local queue is full: let deliveries drain it
            producer.poll(0.1)
