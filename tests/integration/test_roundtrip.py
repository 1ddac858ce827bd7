"""The whole system on the real stack: ``submit`` → ``serve`` → ``collect``, and collect's checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CONF, IOU
from tests.integration.harness import ROOT, Pipeline, render_jpegs, validate_result

CLI_TIMEOUT_S = 180


def cli(
    env: dict[str, str], *args: str, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inference_service.cli", *args],
        env=env, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.kafka
@pytest.mark.s3
@pytest.mark.model
@pytest.mark.slow
def test_submitted_folder_comes_back_complete(pipeline: Pipeline, tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, jpeg in enumerate(render_jpegs(8, seed=5)):
        (frames / f"img_{i:03d}.jpg").write_bytes(jpeg)
    env = pipeline.service_env()
    sub = cli(env, "submit", str(frames), "--video-id", "roundtrip", "--limit", "6")
    assert sub.returncode == 0, sub.stderr
    assert "6 frames" in sub.stdout

    svc = pipeline.service()
    svc.wait_ready()
    out = tmp_path / "roundtrip.json"
    annotated = tmp_path / "annotated"
    col = cli(env, "collect", "--video-id", "roundtrip", "--expect", "6", "--out", str(out),
              "--annotate", str(annotated), "--timeout", "150")  # fmt: skip
    assert col.returncode == 0, col.stdout + col.stderr + svc.log_tail()
    assert "complete: 6/6 frames, 0 duplicated" in col.stdout

    doc: dict[str, Any] = json.loads(out.read_text())
    assert doc["video_id"] == "roundtrip"
    assert [r["frame_id"] for r in doc["frames"]] == list(range(6))
    for i, result in enumerate(doc["frames"]):
        validate_result(result)
        assert result["status"] == "ok"
        assert result["s3_key"] == f"roundtrip/{i:06d}.jpg"
        assert result["meta"] == {"source": f"img_{i:03d}.jpg", "source_index": i}
    s = doc["summary"]
    assert s["complete"] and s["missing"] == [] and s["duplicated"] == []
    assert s["detections"] == sum(len(r["detections"]) for r in doc["frames"]) > 0
    assert s["latency_ms"]["p50"] > 0 and s["latency_ms"]["p95"] >= s["latency_ms"]["p50"]
    assert sorted(p.name for p in annotated.iterdir()) == [f"{i:06d}.jpg" for i in range(6)]


def staged_result(video: str, frame: int) -> bytes:
    return json.dumps({
        "schema_version": 1, "task_id": f"{video}:{frame}", "video_id": video, "frame_id": frame,
        "bucket": "frames", "s3_key": f"{video}/{frame:06d}.jpg", "meta": None, "status": "ok",
        "image": {"width": 64, "height": 48},
        "detections": [{"class_id": 1, "class_name": "square", "confidence": 0.8,
                        "bbox": {"x1": 1.0, "y1": 2.0, "x2": 30.0, "y2": 40.0}}],
        "model": {"name": "best.pt", "sha256": "0" * 64, "imgsz": [320, 320], "conf": CONF,
                  "iou": IOU, "runtime": "openvino/fp32"},
        "timings_ms": {"fetch": 1.0, "decode": 1.0, "inference": 5.0, "total": 10.0 + frame},
    }).encode()  # fmt: skip


@pytest.mark.kafka
def test_collect_reports_missing_and_duplicated_frames(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    tmp_path: Path,
    stack_env: dict[str, str],
) -> None:
    from confluent_kafka import Producer

    topic = unique_topic(2, "results")
    plain = Producer({"bootstrap.servers": kafka_bootstrap})
    for video, frame in [("staged", 0), ("staged", 1), ("other", 2), ("staged", 1), ("staged", 3)]:
        plain.produce(topic, key=video.encode(), value=staged_result(video, frame))
    assert plain.flush(30) == 0
    # Frame 2 of the video exists only in an aborted transaction: a read_committed reader never
    # sees it, so it must count as missing.
    txn = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"staged-{topic}"})
    txn.init_transactions(30)
    txn.begin_transaction()
    txn.produce(topic, key=b"staged", value=staged_result("staged", 2))
    txn.flush(30)
    txn.abort_transaction(30)

    env = {**os.environ, **stack_env, "INFERENCE_RESULTS_TOPIC": topic}
    out = tmp_path / "staged.json"
    col = cli(env, "collect", "--video-id", "staged", "--expect", "4", "--out", str(out),
              "--timeout", "8", "--settle", "0.2")  # fmt: skip
    assert col.returncode == 1, col.stdout + col.stderr
    assert "INCOMPLETE: 3/4 frames, 1 missing [2], 1 duplicated [1]" in col.stdout
    doc = json.loads(out.read_text())
    assert [r["frame_id"] for r in doc["frames"]] == [0, 1, 3]
    s = doc["summary"]
    assert (s["missing"], s["duplicated"], s["records"]) == ([2], [1], 4)
    assert s["detections_by_class"] == {"square": 3}

    # Without --expect, collect stops at the end of the topic and judges nothing missing.
    col = cli(env, "collect", "--video-id", "other", "--timeout", "30")
    assert col.returncode == 0, col.stderr
    assert [r["frame_id"] for r in json.loads(col.stdout)["frames"]] == [2]


@pytest.mark.kafka
def test_replay_dlq_copies_selected_dead_letters_once(
    kafka_bootstrap: str, unique_topic: Callable[..., str], stack_env: dict[str, str]
) -> None:
    from confluent_kafka import Consumer, Producer

    dlq, tasks = unique_topic(1, "dlq"), unique_topic(1, "tasks")
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i, code in enumerate(["frame_not_found", "undecodable_frame", "frame_not_found"]):
        producer.produce(dlq, key=b"vid", value=f'{{"frame_id": {i}}}'.encode(), headers=[
            ("error.code", code.encode()), ("error.message", b"why"),
            ("source.topic", b"inference_tasks"), ("source.partition", b"0"),
            ("source.offset", str(i).encode()),
        ])  # fmt: skip
    assert producer.flush(30) == 0
    env = {**os.environ, **stack_env, "INFERENCE_DLQ_TOPIC": dlq, "INFERENCE_TASKS_TOPIC": tasks}

    def replay(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(env, "replay-dlq", "--group", f"g-{dlq}", *args, timeout=120)

    dry = replay("--dry-run", "--code", "frame_not_found")
    assert dry.returncode == 0 and "dry run: 2 would be replayed" in dry.stdout, dry.stderr
    run = replay("--code", "frame_not_found")
    assert run.returncode == 0 and "replayed 2 dead letters" in run.stdout, run.stderr
    again = replay("--code", "frame_not_found")  # the group's offsets were committed
    assert again.returncode == 0 and "replayed 0 dead letters" in again.stdout, again.stderr

    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"r-{tasks}",
                         "auto.offset.reset": "earliest"})  # fmt: skip
    consumer.subscribe([tasks])
    got: list[tuple[bytes | None, bytes | None, dict[str, bytes]]] = []
    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            raw: Any = msg.headers() or []
            got.append((msg.key(), msg.value(), dict(raw)))
    consumer.close()
    assert [(k, v) for k, v, _h in got] == [
        (b"vid", b'{"frame_id": 0}'),
        (b"vid", b'{"frame_id": 2}'),
    ]
    assert all(h["replayed.from"].startswith(dlq.encode()) for _k, _v, h in got)
