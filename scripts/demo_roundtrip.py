"""Round trip through the local stack: a JPEG frame to S3 and back, a keyed task to Kafka and back.

Run with the stack's environment (``make demo``, or ``eval "$(scripts/stack up)"`` first). It reads
the same settings as the service (``INFERENCE_KAFKA_BOOTSTRAP_SERVERS``,
``INFERENCE_S3_ENDPOINT_URL``, ``INFERENCE_S3_BUCKET``, ``AWS_*``). The task goes to a topic of its
own (``--topic``), so that no service picks it up.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from typing import Any

import cv2
import numpy as np

from inference_service.settings import load_settings

log = logging.getLogger("demo")


def make_jpeg(width: int = 320, height: int = 240) -> bytes:
    """A small synthetic frame: a gradient with a filled rectangle and a circle."""
    x = np.linspace(0, 255, width, dtype=np.uint8)
    frame = np.dstack([np.tile(x, (height, 1))] * 3).copy()
    cv2.rectangle(frame, (40, 60), (140, 180), (0, 0, 255), thickness=-1)
    cv2.circle(frame, (230, 120), 45, (0, 200, 0), thickness=-1)
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return bytes(buf.tobytes())


def s3_roundtrip(endpoint: str | None, region: str, bucket: str, key: str, body: bytes) -> None:
    import boto3
    from botocore.config import Config

    s3: Any = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        config=Config(s3={"addressing_style": "path"}),
    )
    t0 = time.perf_counter()
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="image/jpeg")
    t1 = time.perf_counter()
    got = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    t2 = time.perf_counter()
    if got != body:
        raise RuntimeError(f"s3://{bucket}/{key}: read {len(got)} bytes that differ from the put")
    image = cv2.imdecode(np.frombuffer(got, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RuntimeError(f"s3://{bucket}/{key}: not a decodable JPEG")
    log.info(
        "S3: put s3://%s/%s (%d bytes, %.1f ms), got it back identical (%.1f ms), %dx%d pixels",
        bucket,
        key,
        len(body),
        (t1 - t0) * 1000,
        (t2 - t1) * 1000,
        image.shape[1],
        image.shape[0],
    )


def kafka_roundtrip(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

    delivered: list[Message] = []

    def on_delivery(err: Any, msg: Message) -> None:
        if err is not None:
            raise KafkaException(err)
        delivered.append(msg)

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    t0 = time.perf_counter()
    producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    if producer.flush(30) != 0 or not delivered:
        raise RuntimeError(f"Kafka: record to {topic} not delivered within 30 s")
    sent = delivered[0]
    partition, offset = sent.partition(), sent.offset()
    if partition is None or offset is None:
        raise RuntimeError("Kafka: delivery report without partition or offset")
    log.info(
        "Kafka: produced key=%s to %s[%d] at offset %d (%.1f ms)",
        key.decode(),
        topic,
        partition,
        offset,
        (time.perf_counter() - t0) * 1000,
    )

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"demo-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if (err := msg.error()) is not None:
                raise KafkaException(err)
            if msg.key() != key or msg.value() != value:
                raise RuntimeError(f"Kafka: read back a different record at offset {offset}")
            log.info(
                "Kafka: consumed it back from %s[%d] at offset %d, key and value identical",
                topic,
                partition,
                msg.offset(),
            )
            return
    finally:
        consumer.close()
    raise RuntimeError(f"Kafka: record at {topic}[{partition}]@{offset} not read within 30 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topic", default="demo.roundtrip", help="topic for the demo task")
    parser.add_argument("--video-id", default="demo-video", help="video id (the record's key)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("botocore").setLevel(logging.WARNING)

    settings = load_settings()
    frame_id = int(time.time())
    key = f"demo/{args.video_id}/{frame_id:012d}.jpg"
    s3_roundtrip(settings.s3_endpoint_url, settings.s3_region, settings.s3_bucket, key, make_jpeg())

    task = {
        "video_id": args.video_id,
        "frame_id": frame_id,
        "s3_key": key,
        "bucket": settings.s3_bucket,
        "meta": {"source": "scripts/demo_roundtrip.py"},
    }
    log.info("task: %s", json.dumps(task))
    kafka_roundtrip(
        settings.kafka_bootstrap_servers,
        args.topic,
        args.video_id.encode(),
        json.dumps(task).encode(),
    )
    log.info("round trip OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
