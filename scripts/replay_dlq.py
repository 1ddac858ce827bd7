"""Replay dead letters: copy tasks from the DLQ back to the tasks topic (or another topic).

A dead letter is the original task record (key and value as consumed) plus headers that say why it
failed: ``error.code``, ``error.message``, ``source.topic``, ``source.partition``,
``source.offset`` (and ``value.truncated`` when the value was cut). Once the cause is fixed (the
frame uploaded, the task producer corrected), replay them::

    .venv/bin/python scripts/replay_dlq.py --dry-run                 # list what would be replayed
    .venv/bin/python scripts/replay_dlq.py --code frame_not_found    # replay one kind
    .venv/bin/python scripts/replay_dlq.py --to inference_tasks      # replay all, to a topic

It reads the DLQ (``INFERENCE_DLQ_TOPIC``) with the consumer group ``--group`` (default
``inference-dlq-replay``) up to its current end, produces each selected record with its key,
value and headers (plus ``replayed.from``) to ``--to`` (default ``INFERENCE_TASKS_TOPIC``) with an
idempotent producer, and commits the group's offsets only after every copy is acknowledged. A
second run therefore continues after the last replayed record; ``--from-beginning`` starts over.
Truncated dead letters are never replayed. Settings come from the environment as the service's.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from inference_service.adapters.kafka import client_config
from inference_service.settings import load_settings

log = logging.getLogger("replay_dlq")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", default=None, help="target topic (default: the tasks topic)")
    parser.add_argument("--code", action="append", default=[], help="replay only this error code")
    parser.add_argument("--group", default="inference-dlq-replay", help="consumer group")
    parser.add_argument("--dry-run", action="store_true", help="list, do not produce or commit")
    parser.add_argument("--from-beginning", action="store_true", help="ignore committed offsets")
    parser.add_argument("--timeout", type=float, default=60.0, help="longest run in seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s replay_dlq: %(message)s")
    settings = load_settings()
    source, target = settings.dlq_topic, args.to or settings.tasks_topic
    consumer = Consumer({
        **client_config(settings),
        "group.id": args.group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    })  # fmt: skip
    producer = Producer({**client_config(settings), "enable.idempotence": True,
                         "acks": "all"})  # fmt: skip
    failed: list[str] = []
    replayed = skipped = 0
    next_offsets: dict[int, int] = {}
    try:
        meta = consumer.list_topics(source, timeout=10).topics.get(source)
        if meta is None or meta.error is not None or not meta.partitions:
            print(f"replay_dlq: topic {source!r} does not exist: no dead letters", file=sys.stderr)
            return 0
        parts = sorted(meta.partitions)
        start = -2 if args.from_beginning else -1001  # beginning / the group's committed offset
        consumer.assign([TopicPartition(source, p, start) for p in parts])
        at_end: set[int] = set()
        deadline = time.monotonic() + args.timeout
        while len(at_end) < len(parts) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            partition = int(msg.partition() or 0)
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(partition)
                else:
                    log.warning("%s", err)
                continue
            at_end.discard(partition)
            next_offsets[partition] = int(msg.offset() or 0) + 1
            headers = _headers(msg.headers())
            code = headers.get("error.code", "?")
            where = (f"{headers.get('source.topic')}[{headers.get('source.partition')}]"
                     f"@{headers.get('source.offset')}")  # fmt: skip
            if (args.code and code not in args.code) or "value.truncated" in headers:
                skipped += 1
                continue
            print(f"{'would replay' if args.dry_run else 'replay'} {where} key={msg.key()!r} "
                  f"{code}: {headers.get('error.message', '')[:120]}")  # fmt: skip
            replayed += 1
            if not args.dry_run:
                raw_headers: Any = msg.headers() or []
                out_headers: list[tuple[str, str | bytes | None]] = list(raw_headers)
                out_headers.append(("replayed.from", f"{source}[{partition}]@{msg.offset()}"))

                def on_delivery(e: Any, _m: Any) -> None:
                    if e is not None:
                        failed.append(str(e))

                producer.produce(target, key=msg.key(), value=msg.value(), headers=out_headers,
                                 on_delivery=on_delivery)  # fmt: skip
                producer.poll(0)
        if args.dry_run:
            print(f"dry run: {replayed} would be replayed to {target}, {skipped} skipped")
            return 0
        if producer.flush(30) or failed:
            print(f"replay_dlq: {len(failed)} copies failed ({failed[:3]}); offsets NOT committed",
                  file=sys.stderr)  # fmt: skip
            return 1
        if next_offsets:
            consumer.commit(offsets=[TopicPartition(source, p, o) for p, o in next_offsets.items()],
                            asynchronous=False)  # fmt: skip
        print(f"replayed {replayed} dead letters from {source} to {target}, {skipped} skipped")
        return 0
    finally:
        consumer.close()


def _headers(raw: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in raw or []:
        out[str(key)] = value.decode("utf-8", "replace") if isinstance(value, bytes) else ""
    return out


if __name__ == "__main__":
    sys.exit(main())
