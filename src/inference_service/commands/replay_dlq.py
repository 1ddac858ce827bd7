"""``inference-service replay-dlq``: copy dead letters back to the tasks topic (or another topic).

A dead letter is the original task record (key and value as consumed) plus headers that say why it
failed: ``error.code``, ``error.message``, ``source.topic``, ``source.partition``,
``source.offset`` (and ``value.truncated`` when the value was cut). Once the cause is fixed (the
frame uploaded, the task producer corrected), replay them::

    inference-service replay-dlq --dry-run                 # list what would be replayed
    inference-service replay-dlq --code frame_not_found    # replay one kind
    inference-service replay-dlq --to inference_tasks      # replay all, to a topic

It reads the DLQ (``INFERENCE_DLQ_TOPIC``) with the consumer group ``--group`` (default
``inference-dlq-replay``) up to its current end, produces each selected record with its key,
value and headers (plus ``replayed.from``) to ``--to`` (default ``INFERENCE_TASKS_TOPIC``) with an
idempotent producer, and commits the group's offsets only after every copy is acknowledged. A
second run therefore continues after the last replayed record; ``--from-beginning`` starts over.
Truncated dead letters are never replayed. Settings come from the environment (and the settings
flags) as the service's.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from inference_service.settings import add_cli_flags, load_settings, overrides_from_args

log = logging.getLogger(__name__)

HeaderValue = str | bytes | None
"""A Kafka header's value as confluent-kafka gives and takes it."""
DEFAULT_GROUP = "inference-dlq-replay"
"""The consumer group whose committed offsets mark what was replayed."""
TRUNCATED_HEADER = "value.truncated"
"""Set on a dead letter whose value was cut: such a record is never replayed."""
REPLAYED_FROM_HEADER = "replayed.from"
"""Added to each copy: ``topic[partition]@offset`` of the dead letter it copies."""

_POLL_S = 0.5
_MESSAGE_CHARS = 120
_FLUSH_TIMEOUT_S = 30.0
_OFFSET_BEGINNING = -2
_OFFSET_STORED = -1001  # librdkafka: the group's committed offset


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to", default=None, metavar="TOPIC", help="target topic (default: the tasks topic)"
    )
    parser.add_argument(
        "--code", action="append", default=[], metavar="CODE",
        help="replay only dead letters with this error.code (repeatable; default: every code)",
    )  # fmt: skip
    parser.add_argument(
        "--group", default=DEFAULT_GROUP, metavar="GROUP",
        help=f"the replay's own consumer group, not the service's (default {DEFAULT_GROUP})",
    )  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true",
        help="list what would be replayed; produce and commit nothing",
    )  # fmt: skip
    parser.add_argument(
        "--from-beginning", action="store_true",
        help="read the DLQ from its beginning, ignoring the group's committed offsets",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="S",
        help="longest run in seconds (default 60)",
    )  # fmt: skip
    add_cli_flags(parser)


def run(args: argparse.Namespace) -> int:
    from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

    from inference_service.adapters.kafka import reader_config, writer_config

    settings = load_settings(overrides_from_args(args))
    source, target = settings.dlq_topic, args.to or settings.tasks_topic
    consumer = Consumer(reader_config(settings, args.group, **{"enable.partition.eof": True}))
    producer = Producer(writer_config(settings))
    failed: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    replayed = skipped = 0
    next_offsets: dict[int, int] = {}
    try:
        meta = consumer.list_topics(source, timeout=10).topics.get(source)
        if meta is None or meta.error is not None or not meta.partitions:
            print(
                f"inference-service replay-dlq: topic {source!r} does not exist: no dead letters",
                file=sys.stderr,
            )
            return 0
        parts = sorted(meta.partitions)
        start = _OFFSET_BEGINNING if args.from_beginning else _OFFSET_STORED
        consumer.assign([TopicPartition(source, p, start) for p in parts])
        at_end: set[int] = set()
        deadline = time.monotonic() + args.timeout
        while len(at_end) < len(parts) and time.monotonic() < deadline:
            msg = consumer.poll(_POLL_S)
            if msg is None:
                continue
            err = msg.error()
            partition = int(msg.partition() or 0)
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(partition)
                else:
                    log.warning("replay-dlq: %s", err)
                continue
            at_end.discard(partition)
            next_offsets[partition] = int(msg.offset() or 0) + 1
            headers = decode_headers(msg.headers())
            if not selected(headers, args.code):
                skipped += 1
                continue
            print(
                f"{'would replay' if args.dry_run else 'replay'} {origin(headers)} "
                f"key={msg.key()!r} {headers.get('error.code', '?')}: "
                f"{headers.get('error.message', '')[:_MESSAGE_CHARS]}"
            )
            replayed += 1
            if not args.dry_run:
                raw_headers: Any = msg.headers() or []
                out_headers: list[tuple[str, HeaderValue]] = list(raw_headers)
                out_headers.append((REPLAYED_FROM_HEADER, f"{source}[{partition}]@{msg.offset()}"))
                producer.produce(
                    target, key=msg.key(), value=msg.value(), headers=out_headers,
                    on_delivery=on_delivery,
                )  # fmt: skip
                producer.poll(0)
        if args.dry_run:
            print(f"dry run: {replayed} would be replayed to {target}, {skipped} skipped")
            return 0
        if producer.flush(_FLUSH_TIMEOUT_S) or failed:
            print(
                f"inference-service replay-dlq: {len(failed)} copies failed ({failed[:3]}); "
                "offsets NOT committed",
                file=sys.stderr,
            )
            return 1
        if next_offsets:
            consumer.commit(
                offsets=[TopicPartition(source, p, o) for p, o in next_offsets.items()],
                asynchronous=False,
            )
        print(f"replayed {replayed} dead letters from {source} to {target}, {skipped} skipped")
        return 0
    finally:
        consumer.close()


def decode_headers(
    raw: Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]] | None,
) -> dict[str, str]:
    """A record's headers by name, values decoded as UTF-8 (a header without a value reads "")."""
    pairs = raw.items() if isinstance(raw, Mapping) else raw or []
    out: dict[str, str] = {}
    for key, value in pairs:
        if isinstance(value, bytes):
            out[str(key)] = value.decode("utf-8", "replace")
        else:
            out[str(key)] = value or ""
    return out


def selected(headers: dict[str, str], codes: Collection[str]) -> bool:
    """Whether a dead letter is replayed: its ``error.code`` is one of ``codes`` (any code when
    none are given), and its value was not truncated."""
    if TRUNCATED_HEADER in headers:
        return False
    return not codes or headers.get("error.code", "?") in codes


def origin(headers: dict[str, str]) -> str:
    """Where the dead letter's task was consumed: ``topic[partition]@offset``."""
    return (
        f"{headers.get('source.topic')}[{headers.get('source.partition')}]"
        f"@{headers.get('source.offset')}"
    )
