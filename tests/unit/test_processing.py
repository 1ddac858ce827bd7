import asyncio
import json

from inference_service.domain import BBox, Detection, FrameDetections, ImageSize, ModelInfo, Record
from inference_service.errors import (
    FrameNotFoundError,
    StoreUnavailableError,
    UndecodableFrameError,
)
from inference_service.processing import Backoff, TaskProcessor
from tests.conftest import CONF, IOU

INFO = ModelInfo("best.pt", "0" * 64, (320, 320), CONF, IOU, "fake/fp32", ("disc",))


class FakeStore:
    def __init__(self, objects, outages=0):
        self.objects = objects
        self.outages = outages
        self.calls = 0

    async def get(self, bucket, key, admit=None):
        self.calls += 1
        if self.outages > 0:
            self.outages -= 1
            raise StoreUnavailableError("connection refused")
        try:
            return self.objects[(bucket, key)]
        except KeyError:
            raise FrameNotFoundError(f"no object s3://{bucket}/{key}") from None

    async def check(self, bucket):
        return None


class FakeDetector:
    info = INFO

    async def detect(self, data, *, priority=None):
        if data == b"garbage":
            raise UndecodableFrameError("not an image")
        det = Detection(0, "disc", 0.9, BBox(1, 2, 3, 4))
        return FrameDetections(ImageSize(640, 480), (det,), 1.0, 0.5, 5.0, 0.2)

    def ready(self):
        return True


def record(value, offset=0):
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return Record("inference_tasks", 2, offset, b"v1", raw)


def processor(store):
    return TaskProcessor(store, FakeDetector(), "frames", backoff=Backoff(0.001, 0.002))


def run(coro):
    return asyncio.run(coro)


def test_ok_result_has_copied_identity_and_timings():
    store = FakeStore({("frames", "v1/0.jpg"): b"jpeg"})
    out = run(
        processor(store).process(
            record({"video_id": "v1", "frame_id": 0, "s3_key": "v1/0.jpg", "meta": {"a": 1}})
        )
    )
    assert out.status == "ok" and out.dead_letter is None
    r = out.result
    assert (r["task_id"], r["video_id"], r["frame_id"], r["meta"]) == ("v1:0", "v1", 0, {"a": 1})
    assert r["image"] == {"width": 640, "height": 480}
    assert r["detections"][0]["class_name"] == "disc"
    assert set(r["timings_ms"]) >= {"fetch", "decode", "inference", "total"}
    assert "error" not in r


def test_missing_frame_gives_error_result_and_dead_letter_with_headers():
    out = run(
        processor(FakeStore({})).process(
            record({"video_id": "v1", "frame_id": 4, "s3_key": "nope.jpg"}, offset=17)
        )
    )
    assert out.status == "frame_not_found"
    assert out.result["status"] == "error"
    assert out.result["error"]["code"] == "frame_not_found"
    assert out.result["frame_id"] == 4
    headers = dict(out.dead_letter.headers)
    assert headers["error.code"] == b"frame_not_found"
    assert headers["source.topic"] == b"inference_tasks"
    assert headers["source.partition"] == b"2"
    assert headers["source.offset"] == b"17"


def test_undecodable_frame():
    store = FakeStore({("frames", "bad.jpg"): b"garbage"})
    out = run(
        processor(store).process(record({"video_id": "v1", "frame_id": 1, "s3_key": "bad.jpg"}))
    )
    assert out.result["error"]["code"] == "undecodable_frame"


def test_not_json_goes_to_dead_letters_only():
    out = run(processor(FakeStore({})).process(record(b"\x00\x01 not json")))
    assert out.result is None
    assert out.dead_letter is not None and out.status == "invalid_task"


def test_invalid_task_result_uses_record_key_for_video():
    out = run(processor(FakeStore({})).process(record({"frame_id": -5, "s3_key": "x.jpg"})))
    assert out.result["error"]["code"] == "invalid_task"
    assert out.result["video_id"] == "v1"
    assert out.result["frame_id"] is None


def test_store_outage_is_retried_not_failed():
    store = FakeStore({("frames", "a.jpg"): b"jpeg"}, outages=3)
    proc = processor(store)
    out = run(proc.process(record({"video_id": "v1", "frame_id": 0, "s3_key": "a.jpg"})))
    assert out.status == "ok"
    assert store.calls == 4
    assert proc.health.healthy


def test_oversized_record():
    big = json.dumps(
        {"video_id": "v1", "frame_id": 9, "s3_key": "a.jpg", "pad": "x" * 5000}
    ).encode()
    out = processor(FakeStore({})).oversized(record(big), 1024)
    assert out.result["error"]["code"] == "invalid_task"
    assert "INFERENCE_MAX_TASK_BYTES" in out.result["error"]["message"]
    assert out.result["frame_id"] == 9


def test_a_frame_past_its_deadline_gives_a_schema_valid_inference_timeout_result():
    import jsonschema

    from inference_service import schemas
    from inference_service.errors import InferenceTimeoutError
    from inference_service.http_api import STATUS_BY_CODE

    class TimingOut(FakeDetector):
        async def detect(self, data, *, priority=None):
            raise InferenceTimeoutError("took longer than 30 s")

    store = FakeStore({("frames", "v1/9.jpg"): b"jpeg"})
    proc = TaskProcessor(store, TimingOut(), "frames", backoff=Backoff(0.001, 0.002))
    out = run(proc.process(record({"video_id": "v1", "frame_id": 9, "s3_key": "v1/9.jpg"})))
    assert out.result["error"]["code"] == "inference_timeout"
    jsonschema.validate(out.result, schemas.load("result"))
    assert dict(out.dead_letter.headers)["error.code"] == b"inference_timeout"
    assert STATUS_BY_CODE[InferenceTimeoutError.code] == 504


def test_forbidden_frame_is_final_and_never_pauses():
    from inference_service.errors import FrameForbiddenError

    class Forbidding(FakeStore):
        async def get(self, bucket, key, admit=None):
            self.calls += 1
            raise FrameForbiddenError(f"S3 refused to read s3://{bucket}/{key} (403 AccessDenied)")

    store = Forbidding({})
    proc = processor(store)
    out = run(proc.process(record({"video_id": "v1", "frame_id": 2, "s3_key": "a.jpg"})))
    assert out.status == "frame_forbidden" and out.result["error"]["code"] == "frame_forbidden"
    assert dict(out.dead_letter.headers)["error.code"] == b"frame_forbidden"
    assert store.calls == 1 and proc.health.healthy  # tried once; consumption never paused


def test_other_buckets_are_refused_before_any_fetch_unless_allowed():
    objects = {("frames", "a.jpg"): b"jpeg", ("cams", "a.jpg"): b"jpeg", ("x-1", "a.jpg"): b"jpeg"}
    uri = {"video_id": "v1", "frame_id": 0, "s3_key": "s3://cams/a.jpg", "task_id": "t-0"}
    field = {"video_id": "v1", "frame_id": 1, "s3_key": "a.jpg", "bucket": "x-1"}
    own = {"video_id": "v1", "frame_id": 2, "s3_key": "a.jpg"}

    def outcome(task, **rules):
        store = FakeStore(objects)
        proc = TaskProcessor(
            store, FakeDetector(), "frames", backoff=Backoff(0.001, 0.002), **rules
        )
        return run(proc.process(record(task))), store.calls

    for task in (uri, field):  # by default, the default bucket alone
        out, calls = outcome(task)
        assert out.result["error"]["code"] == "invalid_task" and calls == 0
        assert "INFERENCE_S3_ALLOWED_BUCKETS" in out.result["error"]["message"]
        assert out.dead_letter is not None
    out, _ = outcome(uri)
    assert (out.result["task_id"], out.result["frame_id"]) == ("t-0", 0)  # identity kept
    assert outcome(own)[0].status == "ok"
    assert outcome(uri, allowed_buckets=frozenset({"cams"}))[0].status == "ok"
    assert outcome(field, allowed_buckets=frozenset({"cams"}))[0].status == "invalid_task"
    assert outcome(own, allowed_buckets=frozenset({"cams"}))[0].status == "ok"
    assert outcome(field, allowed_buckets=None)[0].status == "ok"  # "*"
