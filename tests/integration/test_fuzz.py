"""A seeded fuzz run of the real service: over a thousand generated bad records and frames, mixed
with good frames and odd but valid ones, on the real broker, S3 server and model.

Each record carries a unique key (``fz-<n>``) that is also its video id, so every result and dead
letter can be matched to the record that caused it whatever the record held: an invalid task's
result falls back to the record key for its video id.
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.integration.harness import Pipeline, bomb_jpeg, render_jpegs, task, validate_result

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.model, pytest.mark.slow]

SEED = 20261201
DLQ_ONLY = "dlq-only"
MAX_TASK_BYTES = 4 << 20
"""The service's INFERENCE_MAX_TASK_BYTES here: room for a task whose result outgrows the topic."""


@dataclass
class Case:
    key: bytes
    value: bytes | None
    expect: str
    """``ok``, an error code, or :data:`DLQ_ONLY` (not a JSON object: a dead letter, no result)."""


# ------------------------------------------------------------------------------ frames in S3
def odd_but_valid_frames(rng: random.Random) -> dict[str, bytes]:
    """Frames every client of the service may send: they must come back ``ok``."""
    decoded = cv2.imdecode(
        np.frombuffer(render_jpegs(1, seed=7, width=640, height=480)[0], np.uint8), cv2.IMREAD_COLOR
    )
    assert decoded is not None
    base: np.ndarray[Any, Any] = decoded
    out: dict[str, bytes] = {}

    def pil(img: Image.Image, fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    rgb = Image.fromarray(cv2.cvtColor(base, cv2.COLOR_BGR2RGB))
    out["grey.jpg"] = pil(rgb.convert("L"), "JPEG", quality=85)
    out["rgba.png"] = pil(rgb.convert("RGBA"), "PNG")
    ok16, png16 = cv2.imencode(".png", base.astype(np.uint16) * 257)
    assert ok16
    out["deep16.png"] = png16.tobytes()
    out["one.png"] = pil(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")
    out["one.jpg"] = pil(Image.new("RGB", (1, 1), (200, 10, 10)), "JPEG")
    big = cv2.resize(base, (4000, 3000))  # 12 MP
    out["12mp.jpg"] = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    out["progressive.jpg"] = pil(rgb, "JPEG", quality=85, progressive=True)
    out["frame.webp"] = pil(rgb, "WEBP", quality=80)
    out["frame.bmp"] = pil(rgb, "BMP")
    out["portrait.jpg"] = pil(rgb.resize((360, 1280)), "JPEG", quality=85)
    out["panorama.jpg"] = pil(rgb.resize((3000, 300)), "JPEG", quality=85)
    return out


def bad_frames(rng: random.Random, good: bytes) -> dict[str, tuple[bytes, str]]:
    """Objects that are not frames, with the error each must give."""
    out: dict[str, tuple[bytes, str]] = {
        "empty.jpg": (b"", "undecodable_frame"),
        "text.jpg": (b"GET / HTTP/1.1\r\n\r\n", "undecodable_frame"),
        "noise.bin": (bytes(rng.randrange(256) for _ in range(4096)), "undecodable_frame"),
        "bomb.jpg": (bomb_jpeg(good), "frame_too_large"),
    }
    for n in range(6):
        cut = rng.randrange(20, len(good) // 3)
        out[f"truncated-{n}.jpg"] = (good[:cut], "undecodable_frame")
    png_bomb = bytearray(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR") + (100000).to_bytes(4, "big") * 2
    out["bomb.png"] = (bytes(png_bomb + b"\x08\x02\x00\x00\x00" + b"\x00" * 64), "frame_too_large")
    return out


# ------------------------------------------------------------------------------ task records
WRONG_TYPES: list[Any] = [None, True, 0, -1, 1.5, "", "x", [], [1], {}, {"a": 1}]


def generate(rng: random.Random, odd: list[str], bad: dict[str, tuple[bytes, str]]) -> list[Case]:
    cases: list[Case] = []

    def add(value: bytes | None, expect: str) -> None:
        cases.append(Case(f"fz-{len(cases)}".encode(), value, expect))

    def obj(fields: dict[str, Any], expect: str, raw: str | None = None) -> None:
        key = f"fz-{len(cases)}"
        body = {"video_id": key, **fields}
        text = raw if raw is not None else json.dumps(body, ensure_ascii=rng.random() < 0.5)
        cases.append(Case(key.encode(), text.replace("@KEY@", key).encode(), expect))

    good = {"frame_id": 0, "s3_key": "good.jpg"}
    # not JSON objects at all
    for _ in range(400):
        add(bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))), DLQ_ONLY)
    for text in [
        "",
        "null",
        "[]",
        "1",
        '"s"',
        "true",
        "{",
        '{"video_id": ',
        "[" * 3000 + "]" * 3000,
    ]:
        add(text.encode(), DLQ_ONLY)
    add(None, DLQ_ONLY)  # a tombstone
    for _ in range(150):
        full = json.dumps({"video_id": "v", **good})
        add(full[: rng.randrange(1, len(full) - 1)].encode(), DLQ_ONLY)
    # every field with every wrong type
    for field in ("frame_id", "s3_key", "bucket", "meta", "task_id"):
        for wrong in WRONG_TYPES:
            fields = dict(good)
            fields[field] = wrong
            valid = (
                (field == "meta" and (wrong is None or isinstance(wrong, dict)))
                or (field == "frame_id" and type(wrong) is int and wrong >= 0)
                or (field == "bucket" and wrong is None)
                or (field == "task_id" and (wrong is None or wrong == "x"))
            )
            expect = "ok" if valid else "invalid_task"
            if field == "s3_key" and wrong == "x":
                expect = "frame_not_found"  # a valid key that names no object
            for _ in range(4):
                obj(fields, expect)
    for wrong in WRONG_TYPES:  # video_id of the wrong type: the result answers to the record key
        if wrong == "x":
            continue  # a valid video id
        for _ in range(4):
            key = f"fz-{len(cases)}"
            cases.append(
                Case(key.encode(), json.dumps({"video_id": wrong, **good}).encode(), "invalid_task")
            )
    # missing fields, path tricks, other and invalid buckets
    missing: list[dict[str, Any]] = [{"frame_id": 1}, {"s3_key": "good.jpg"}, {}]
    for fields in missing:
        for _ in range(10):
            obj(fields, "invalid_task")
    tricks = ["../good.jpg", "a/../good.jpg", "./good.jpg", "/good.jpg", "good.jpg/", "a//b.jpg",
              "a\x00b.jpg", "a\nb.jpg", "x" * 1100, "s3://", "s3://bucket-only", "s3:///key"]  # fmt: skip
    for trick in tricks:
        for _ in range(5):
            obj({"frame_id": 1, "s3_key": trick}, "invalid_task")
    for bucket in ["UPPER", "a", "has_underscore", "x" * 70, "ünï", "sp ace", "slash/ed"]:
        for _ in range(5):
            obj({"frame_id": 1, "s3_key": "good.jpg", "bucket": bucket}, "invalid_task")
    for _ in range(20):
        obj({"frame_id": 1, "s3_key": f"missing-{rng.randrange(10**9)}.jpg"}, "frame_not_found")
    # nesting bombs, non-finite numbers, lone surrogates, oversized meta
    for depth in (65, 200, 999, 1000, 3000, 20000):
        bomb = "[" * depth + "]" * depth
        for _ in range(5):
            obj(
                {},
                "invalid_task",
                raw='{"video_id": "@KEY@", "frame_id": 2, "s3_key": "good.jpg", "meta": {"x": '
                + bomb
                + "}}",
            )
    for number in ("NaN", "Infinity", "-Infinity", "1e999", "-1E400"):
        for where in ("meta", "frame_id", "extra"):
            for _ in range(4):
                value = '{"x": ' + number + "}" if where == "meta" else number
                obj(
                    {},
                    "invalid_task",
                    raw='{"video_id": "@KEY@", "frame_id": 3, "s3_key": "good.jpg", "'
                    + where
                    + '": '
                    + value
                    + "}",
                )
    for surrogate in ("\\ud800", "\\udfff", "a\\ud83db"):
        for field in ("task_id", "s3_key", "meta", "bucket"):
            for _ in range(4):
                value = '{"k": "' + surrogate + '"}' if field == "meta" else '"' + surrogate + '"'
                obj(
                    {},
                    "invalid_task",
                    raw='{"video_id": "@KEY@", "frame_id": 4, "s3_key": "good.jpg", "'
                    + field
                    + '": '
                    + value
                    + "}",
                )
    blob = "\U0001f600" * 400_000  # 1.6 MB of UTF-8: under the task limit here, over the topic's
    for _ in range(3):
        obj(
            {},
            "result_too_large",
            raw='{"video_id": "@KEY@", "frame_id": 5, "s3_key": "good.jpg", "meta": {"blob": "'
            + blob
            + '"}}',
        )
    for _ in range(3):
        obj(
            {"frame_id": 6, "s3_key": "good.jpg", "pad": "x" * (MAX_TASK_BYTES + 1000)},
            "invalid_task",
        )
    # frames that are not frames, and odd but valid ones
    for name, (_data, code) in bad.items():
        for _ in range(3):
            obj({"frame_id": 7, "s3_key": name}, code)
    for name in odd:
        for _ in range(4):
            obj({"frame_id": 8, "s3_key": name}, "ok")
    # and plenty of plain good tasks in between
    for _ in range(150):
        obj({"frame_id": rng.randrange(10**6), "s3_key": "good.jpg"}, "ok")
    rng.shuffle(cases)
    return cases


def test_a_thousand_bad_records_and_frames_never_stop_the_service(
    pipeline: Pipeline, s3_client: Any, kafka_admin: Any
) -> None:
    from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

    rng = random.Random(SEED)
    resource = ConfigResource(
        "topic", pipeline.tasks_topic, set_config={"max.message.bytes": "8388608"}
    )
    for f in kafka_admin.alter_configs([resource]).values():
        f.result(timeout=30)
    good = render_jpegs(1, seed=3)[0]
    odd = odd_but_valid_frames(rng)
    bad = bad_frames(rng, good)
    put = lambda key, body: s3_client.put_object(Bucket=pipeline.bucket, Key=key, Body=body)  # noqa: E731
    put("good.jpg", good)
    for name, data in odd.items():
        put(name, data)
    for name, (data, _code) in bad.items():
        put(name, data)
    cases = generate(rng, list(odd), bad)
    bad_records = sum(c.expect != "ok" for c in cases)
    assert bad_records >= 1000, bad_records
    pipeline.produce([(c.key, c.value) for c in cases])

    svc = pipeline.service(INFERENCE_MAX_TASK_BYTES=str(MAX_TASK_BYTES))
    svc.wait_ready()
    not_ready: list[tuple[float, int]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                status = svc.get("/readyz", timeout=5)[0]
            except OSError:
                status = -1
            if status != 200:
                not_ready.append((time.monotonic(), status))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    expect_results = [c for c in cases if c.expect != DLQ_ONLY]
    pipeline.read(pipeline.results_topic, expected=len(expect_results), timeout=600, settle_s=3)

    # afterwards a clean video comes back all ok
    clean = render_jpegs(12, seed=11)
    for i, frame in enumerate(clean):
        put(f"clean/{i:06d}.jpg", frame)
    pipeline.produce([task("clean", i, f"clean/{i:06d}.jpg") for i in range(len(clean))])
    raw_all = pipeline.read(
        pipeline.results_topic, expected=len(expect_results) + len(clean), timeout=300, settle_s=2
    )
    done.set()
    watcher.join(5)

    by_video: dict[str, list[dict[str, Any]]] = {}
    for _key, value, _headers in raw_all:
        assert isinstance(value, dict), f"a result that is not strict JSON: {value[:200]!r}"
        validate_result(value)
        by_video.setdefault(value["video_id"], []).append(value)
    assert [r["status"] for r in by_video.pop("clean")] == ["ok"] * len(clean)
    wrong: list[str] = []
    for case in cases:
        got = by_video.pop(case.key.decode(), [])
        if case.expect == DLQ_ONLY:
            if got:
                wrong.append(f"{case.key!r}: expected no result, got {len(got)}")
            continue
        statuses = [r["status"] if r["status"] == "ok" else r["error"]["code"] for r in got]
        if statuses != [case.expect]:
            wrong.append(
                f"{case.key!r} {case.value[:120] if case.value else None!r}: expected {case.expect}, got {statuses}"
            )
    assert not wrong, f"{len(wrong)} of {len(cases)} records wrong:\n" + "\n".join(wrong[:30])
    assert not by_video, f"results for no record: {list(by_video)[:10]}"

    dlq = pipeline.read(pipeline.dlq_topic, expected=bad_records, timeout=120, settle_s=2)
    dlq_keys = Counter(k for k, _v, _h in dlq)
    expected_dlq = Counter(c.key for c in cases if c.expect != "ok")
    assert dlq_keys == expected_dlq
    assert svc.proc is not None and svc.proc.poll() is None, "the service stays up"
    assert not not_ready, f"/readyz not 200 at {len(not_ready)} samples: {not_ready[:5]}"
    print(
        f"fuzz: {len(cases)} records ({bad_records} bad), {len(dlq)} dead letters, all as expected"
    )
