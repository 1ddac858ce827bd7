"""Turning one outcome into producer messages: its result and its dead letter."""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import Producer

from inference_service import strict_json
from inference_service.domain import Finished
from inference_service.settings import Settings

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
        value = outcome.payload
        if value is None:
            value = strict_json.dumps(outcome.result)
        _produce(producer, settings.results_topic, outcome.key, value, None, on_delivery)
        sent += 1
    if outcome.dead_letter is not None:
        dl = outcome.dead_letter
        headers: Headers = list(dl.headers)
        _produce(producer, settings.dlq_topic, dl.key, dl.value, headers, on_delivery)
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
