"""``inference-service collect --video-id ID``: gather one video's results, the runner's way.

Reads the results topic from its beginning with ``isolation.level=read_committed`` (only committed
transactions, as a downstream runner must read under ``exactly_once``), through a throwaway group
id that never commits. Keeps the records of the video, stops once ``--expect`` frames are in (after
a short settle, so that late duplicates are seen too), at the end of the topic when no count is
expected, or on ``--timeout``. Writes one JSON document (``collecting.VideoCollector.document``),
prints a completeness line and exits 1 when frames are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from inference_service.commands.collecting import VideoCollector, describe
from inference_service.errors import TopicMissingError
from inference_service.settings import (
    Settings,
    add_cli_flags,
    env_name,
    load_settings,
    overrides_from_args,
)

log = logging.getLogger(__name__)

_POLL_S = 0.2
_LOG_EVERY_S = 5.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video-id", required=True, help="the video whose results to collect")
    parser.add_argument(
        "--expect", type=int, default=None, metavar="N",
        help="frames the video has (ids 0..N-1); without it, read to the end of the topic",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None, metavar="FILE",
        help="write the video's JSON document here (default: stdout)",
    )  # fmt: skip
    parser.add_argument(
        "--annotate", type=Path, default=None, metavar="DIR",
        help="fetch each frame from S3 and write it with its detections drawn to DIR",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=300.0, metavar="S",
        help="give up after S seconds (default 300)",
    )  # fmt: skip
    parser.add_argument(
        "--settle", type=float, default=1.0, metavar="S",
        help="keep reading S seconds after the last expected frame, for duplicates (default 1)",
    )  # fmt: skip
    add_cli_flags(parser)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(overrides_from_args(args))
    if args.expect is not None and args.expect < 0:
        print("inference-service collect: --expect must be >= 0", file=sys.stderr)
        return 2
    collector = VideoCollector(args.video_id, args.expect)
    try:
        read_results(settings, collector, timeout_s=args.timeout, settle_s=args.settle)
    except TopicMissingError as exc:
        print(f"inference-service collect: {exc}", file=sys.stderr)
        return 2
    document = collector.document()
    if args.annotate is not None:
        written = asyncio.run(annotate_frames(settings, document["frames"], args.annotate))
        log.info("collect: %d annotated frames in %s", written, args.annotate)
    text = json.dumps(document, ensure_ascii=False, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    else:
        sys.stdout.write(text + "\n")
    line = f"{args.video_id}: {describe(document['summary'])}"
    print(line, file=sys.stderr if args.out is None else sys.stdout)
    return 0 if collector.complete() else 1


def read_results(
    settings: Settings,
    collector: VideoCollector,
    *,
    timeout_s: float,
    settle_s: float = 1.0,
) -> None:
    """Feed ``collector`` from the results topic until it is done, the topic ends, or timeout."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    from inference_service.adapters.kafka import reader_config

    topic = settings.results_topic
    group = f"collect-{uuid.uuid4().hex[:12]}"
    consumer = Consumer(reader_config(settings, group, **{"enable.partition.eof": True}))
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        partitions = _partitions(consumer, topic, deadline)
        consumer.assign([TopicPartition(topic, p, -2) for p in partitions])  # -2: beginning
        at_end: set[int] = set()
        settle_until: float | None = None
        last_log = started
        key = collector.video_id.encode()
        while True:
            now = time.monotonic()
            if collector.done() and settle_until is None:
                settle_until = now + settle_s
            if settle_until is not None and now >= settle_until:
                break
            if collector.expected is None and len(at_end) == len(partitions):
                break
            if now >= deadline:
                log.warning(
                    "collect: timeout after %.0f s with %d of %s frames",
                    timeout_s, collector.received, collector.expected,
                )  # fmt: skip
                break
            if now - last_log >= _LOG_EVERY_S:
                last_log = now
                log.info("collect: %d of %s frames so far", collector.received, collector.expected)
            msg = consumer.poll(_POLL_S)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(int(msg.partition() or 0))
                else:
                    log.warning("collect: %s", err)
                continue
            at_end.discard(int(msg.partition() or 0))
            if msg.key() not in (key, None):
                continue
            try:
                value: Any = json.loads(msg.value() or b"")
            except ValueError:
                continue
            if isinstance(value, dict):
                _ts_type, ts = msg.timestamp()
                collector.add(value, ts if ts and ts > 0 else None)
    finally:
        consumer.close()


def _partitions(consumer: Any, topic: str, deadline: float) -> list[int]:
    while True:
        meta = consumer.list_topics(topic=topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            return sorted(meta.partitions)
        if time.monotonic() >= deadline:
            raise TopicMissingError(
                f"topic {topic!r} does not exist ({env_name('results_topic')}); "
                "has the service published anything yet?"
            )
        time.sleep(0.5)


async def annotate_frames(settings: Settings, frames: list[dict[str, Any]], out_dir: Path) -> int:
    """Fetch each ok frame from S3, draw its detections, write ``out_dir/<frame_id:06d>.jpg``."""
    from inference_service.adapters.s3 import S3FrameStore
    from inference_service.errors import InferenceError

    out_dir.mkdir(parents=True, exist_ok=True)
    store = S3FrameStore(settings)
    written = 0

    async def one(result: dict[str, Any]) -> bool:
        bucket, key = result.get("bucket"), result.get("s3_key")
        if not isinstance(bucket, str) or not isinstance(key, str):
            return False
        try:
            data = await store.get(bucket, key)
        except InferenceError as exc:
            log.warning("collect: frame %s not annotated: %s", result.get("frame_id"), exc)
            return False
        path = out_dir / f"{int(result['frame_id']):06d}.jpg"
        return await asyncio.to_thread(_draw, data, result.get("detections") or [], path)

    for ok in await asyncio.gather(*(one(r) for r in frames if r.get("status") == "ok")):
        written += int(ok)
    return written


def _draw(data: bytes, detections: list[dict[str, Any]], path: Path) -> bool:
    import cv2
    import numpy as np

    from inference_service.domain import BBox, Detection
    from inference_service.vision.draw import annotate

    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        return False
    dets = [
        Detection(
            class_id=int(d["class_id"]),
            class_name=str(d["class_name"]),
            confidence=float(d["confidence"]),
            bbox=BBox(**{k: float(v) for k, v in d["bbox"].items()}),
        )
        for d in detections
    ]
    return bool(
        cv2.imwrite(
            str(path),
            annotate(decoded.astype(np.uint8, copy=False), dets),
            [cv2.IMWRITE_JPEG_QUALITY, 90],
        )
    )
