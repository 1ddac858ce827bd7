"""No record can escape its boundary: whatever a record holds, it gets its outcome, strict JSON.

Generated classes of bad input rather than single examples: nesting bombs at every depth and
position, every non-finite number spelling, lone surrogates in every identity field, results over
the topic's limit, and a processor that raises.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from inference_service import strict_json
from inference_service.domain import (
    BBox,
    Detection,
    FrameDetections,
    ImageSize,
    ModelInfo,
    Outcome,
    Priority,
    Record,
)
from inference_service.ports import Admit
from inference_service.processing import Backoff, MessageLimits, TaskProcessor

INFO = ModelInfo("best.pt", "0" * 64, (320, 320), 0.25, 0.45, "fake/fp32", ("disc",))
MAX_TASK_BYTES = 1 << 20


class Store:
    async def get(self, bucket: str, key: str, admit: Admit | None = None) -> bytes:
        return b"frame"

    async def check(self, bucket: str) -> None:
        return None


class Detector:
    info = INFO

    def __init__(self, boxes: int = 1, fail: BaseException | None = None) -> None:
        self.boxes = boxes
        self.fail = fail

    async def detect(
        self, data: bytes, *, priority: Priority = Priority.PIPELINE
    ) -> FrameDetections:
        if self.fail is not None:
            raise self.fail
        dets = tuple(Detection(0, "disc", 0.9, BBox(1, 2, 3, 4)) for _ in range(self.boxes))
        return FrameDetections(ImageSize(64, 48), dets, 0.1, 0.1, 0.1, 0.1)

    def ready(self) -> bool:
        return True


def handle(
    value: bytes, *, detector: Detector | None = None, limits: MessageLimits | None = None
) -> Outcome:
    proc = TaskProcessor(
        Store(), detector or Detector(), "frames", backoff=Backoff(0.001, 0.002), limits=limits
    )
    record = Record("inference_tasks", 0, 7, b"video-key", value)
    return asyncio.run(proc.handle(record, MAX_TASK_BYTES))


def assert_strict(outcome: Outcome) -> None:
    """Result and dead-letter headers are strict RFC 8259 JSON / UTF-8, as published."""
    if outcome.result is not None:
        assert outcome.payload is not None
        strict_json.check(json.loads(outcome.payload))  # parses and is strict
        outcome.payload.decode("utf-8")
        assert json.loads(outcome.payload) == json.loads(json.dumps(outcome.result))
    assert outcome.dead_letter is not None or outcome.status == "ok"
    if outcome.dead_letter is not None:
        for name, value in outcome.dead_letter.headers:
            name.encode("ascii")
            value.decode("utf-8")


def nested(depth: int, opener: str = "[", closer: str = "]", inner: str = "0") -> str:
    return opener * depth + inner + closer * depth


# ------------------------------------------------------------------------------- nesting bombs
@pytest.mark.parametrize("depth", [65, 100, 999, 1000, 5000, 100_000])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_a_nesting_bomb_as_the_whole_record_is_a_dead_letter_not_a_crash(
    depth: int, kind: str
) -> None:
    value = nested(depth) if kind == "array" else '{"a":' * depth + "0" + "}" * depth
    out = handle(value.encode())
    assert out.status == "invalid_task"
    assert out.dead_letter is not None
    if kind == "array":  # not a JSON object: nothing to answer to, a dead letter only
        assert out.result is None
    else:  # an object without usable ids: a result keyed by the record
        assert out.result is not None and out.result["video_id"] == "video-key"
    assert_strict(out)


@pytest.mark.parametrize("depth", [65, 1000, 50_000])
@pytest.mark.parametrize("field", ["meta", "extra", "s3_key"])
def test_a_nesting_bomb_inside_a_task_keeps_the_task_s_identity(depth: int, field: str) -> None:
    task = {"video_id": "cam-1", "frame_id": 4, "s3_key": "cam-1/4.jpg", "meta": {"ok": 1}}
    text = json.dumps(task)
    bomb = nested(depth, "[", "]", '"x\\"]["')  # strings with escaped quotes and brackets inside
    text = text[:-1] + f', "{field}": {bomb}' + "}"
    if field == "meta":
        text = text.replace('"meta": {"ok": 1}, ', "")
    out = handle(text.encode())
    assert out.status == "invalid_task"
    assert out.result is not None
    assert (out.result["video_id"], out.result["frame_id"]) == ("cam-1", 4)
    assert "nests deeper" in out.result["error"]["message"]
    assert out.result["meta"] is None or strict_json.is_strict(out.result["meta"])
    assert_strict(out)


def test_prune_keeps_strings_with_brackets_and_escapes_intact() -> None:
    doc = {"a": 'x]["}{\\', "b": [[[[1]]]], "c": '\\"]'}
    pruned = json.loads(strict_json.prune(json.dumps(doc).encode(), max_depth=3))
    assert pruned == {"a": 'x]["}{\\', "b": [[None]], "c": '\\"]'}


@pytest.mark.parametrize("seed", range(20))
def test_prune_agrees_with_a_reference_on_random_documents(seed: int) -> None:
    rng = random.Random(seed)

    def gen(depth: int) -> object:
        r = rng.random()
        if depth > 8 or r < 0.3:
            return rng.choice([1, 's]{\\"', None, True, 2.5, '"[', "é😀"])
        if r < 0.65:
            return [gen(depth + 1) for _ in range(rng.randint(0, 3))]
        return {f"k{i}[": gen(depth + 1) for i in range(rng.randint(0, 3))}

    def cut(value: object, depth: int, limit: int) -> object:
        if isinstance(value, list | dict) and depth > limit:
            return None
        if isinstance(value, list):
            return [cut(v, depth + 1, limit) for v in value]
        if isinstance(value, dict):
            return {k: cut(v, depth + 1, limit) for k, v in value.items()}
        return value

    doc = {"root": gen(0)}
    for limit in (1, 2, 4, 6):
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        assert json.loads(strict_json.prune(text, limit)) == cut(doc, 1, limit)


# ------------------------------------------------------------------------ non-strict numbers
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400"])
@pytest.mark.parametrize("where", ["meta", "frame_id", "top"])
def test_non_finite_numbers_make_an_invalid_task_and_never_reach_a_result(
    number: str, where: str
) -> None:
    fields = {"video_id": '"v"', "frame_id": "3", "s3_key": '"v/3.jpg"'}
    if where == "meta":
        fields["meta"] = '{"score": ' + number + "}"
    elif where == "frame_id":
        fields["frame_id"] = number
    else:
        fields["weird"] = number
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    out = handle(text.encode())
    assert out.status == "invalid_task"
    assert out.result is not None and out.result["video_id"] == "v"
    assert_strict(out)


# -------------------------------------------------------------------------- lone surrogates
@pytest.mark.parametrize("surrogate", ["\\ud800", "\\udfff", "\\udbff", "x\\ud83dy"])
@pytest.mark.parametrize(
    "field", ["video_id", "task_id", "s3_key", "bucket", "meta_value", "meta_key"]
)
def test_lone_surrogates_make_an_invalid_task_with_a_strict_result(
    surrogate: str, field: str
) -> None:
    fields = {"video_id": '"v"', "frame_id": "3", "s3_key": '"v/3.jpg"'}
    bad = f'"{surrogate}"'
    if field == "meta_value":
        fields["meta"] = '{"a": ' + bad + "}"
    elif field == "meta_key":
        fields["meta"] = "{" + bad + ": 1}"
    else:
        fields[field] = bad
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    out = handle(text.encode())
    assert out.status == "invalid_task"
    assert "surrogate" in out.dead_letter.headers[1][1].decode()  # type: ignore[union-attr]
    assert out.result is not None
    if field == "video_id":
        assert out.result["video_id"] == "video-key"  # falls back to the record key
    assert_strict(out)


def test_a_valid_non_ascii_task_is_published_as_utf8_not_escapes() -> None:
    task = {
        "video_id": "камера-7",
        "frame_id": 1,
        "s3_key": "k/1.jpg",
        "meta": {"note": "🦊" * 100},
    }
    out = handle(json.dumps(task).encode())
    assert out.status == "ok"
    assert out.payload is not None
    assert "🦊".encode() in out.payload and b"\\ud83e" not in out.payload
    assert_strict(out)


# ------------------------------------------------------------------------- oversized results
@pytest.mark.parametrize("limit", [2_000, 50_000, 1_048_588])
def test_a_result_over_the_topic_limit_becomes_result_too_large_without_the_bulk(
    limit: int,
) -> None:
    meta = {"blob": "😀" * (limit // 2)}  # ~2x the limit in UTF-8, ~6x as \\u escapes
    task = {"video_id": "v", "frame_id": 2, "s3_key": "v/2.jpg", "meta": meta}
    value = json.dumps(task).encode()
    out = handle(value, limits=MessageLimits(result_bytes=limit, dead_letter_bytes=limit))
    assert out.status == "result_too_large"
    assert out.result is not None and out.result["meta"] is None
    assert (out.result["video_id"], out.result["frame_id"]) == ("v", 2)
    assert out.payload is not None and len(out.payload) < limit
    dl = out.dead_letter
    assert dl is not None and dl.value is not None
    size = len(dl.value) + len(dl.key or b"") + sum(len(k) + len(v) for k, v in dl.headers)
    assert size < limit
    assert dict(dl.headers)["value.truncated"] == str(len(value)).encode()
    assert_strict(out)


def test_many_detections_over_the_limit_also_become_result_too_large() -> None:
    task = {"video_id": "v", "frame_id": 2, "s3_key": "v/2.jpg"}
    out = handle(
        json.dumps(task).encode(),
        detector=Detector(boxes=300),
        limits=MessageLimits(20_000, 20_000),
    )
    assert out.status == "result_too_large"
    assert out.result is not None and out.result["detections"] == []
    assert_strict(out)


# ------------------------------------------------------------------------- unexpected errors
@pytest.mark.parametrize(
    "exc",
    [RuntimeError("boom"), KeyError("x"), RecursionError(), MemoryError(), ZeroDivisionError()],
)
def test_an_unexpected_error_becomes_internal_error_for_that_record(exc: BaseException) -> None:
    task = {"video_id": "v", "frame_id": 2, "s3_key": "v/2.jpg"}
    out = handle(json.dumps(task).encode(), detector=Detector(fail=exc))
    assert out.status == "internal_error"
    assert out.result is not None and out.result["error"]["code"] == "internal_error"
    assert out.result["video_id"] == "video-key"
    assert out.dead_letter is not None
    assert_strict(out)


@pytest.mark.parametrize("seed", range(300))
def test_random_bytes_and_mutated_tasks_always_get_one_strict_outcome(seed: int) -> None:
    rng = random.Random(seed)
    good = json.dumps(
        {"video_id": "v", "frame_id": seed, "s3_key": f"v/{seed}.jpg", "meta": {"a": [1, 2.5, "é"]}}
    ).encode()
    choice = rng.random()
    if choice < 0.3:
        value = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    elif choice < 0.7:
        data = bytearray(good)
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.choice(b'[]{}"\\:,0eE-+.\xff\xc3\x00 ')
        value = bytes(data)
    else:
        value = good[: rng.randint(0, len(good))]
    out = handle(value)
    assert out.status in {"ok", "invalid_task"}
    assert_strict(out)


@pytest.mark.parametrize("where", ["key", "video_id", "task_id", "s3_key", "bucket"])
def test_a_huge_identity_field_is_not_repeated_and_costs_no_time(where: str) -> None:
    import time

    huge = "v" * 900_000
    task: dict[str, object] = {"video_id": "v", "frame_id": "bad", "s3_key": "v/1.jpg"}
    key = b"video-key"
    if where == "key":
        key = huge.encode()
        del task["video_id"]
    else:
        task[where] = huge
    proc = TaskProcessor(Store(), Detector(), "frames", backoff=Backoff(0.001, 0.002))
    record = Record("inference_tasks", 0, 7, key, json.dumps(task).encode())
    started = time.perf_counter()
    out = asyncio.run(proc.handle(record, MAX_TASK_BYTES * 2))
    assert time.perf_counter() - started < 2.0
    assert out.status == "invalid_task"
    assert out.result is not None and out.payload is not None
    assert len(out.payload) < 4096
    assert_strict(out)
