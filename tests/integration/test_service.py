"""The whole service on the real stack: Apache Kafka, SeaweedFS S3, a real exported YOLOv8 model."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    ROOT,
    Pipeline,
    bomb_jpeg,
    render_jpegs,
    task,
    validate_result,
)

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.model, pytest.mark.slow]


def upload_videos(
    pipeline: Pipeline, s3: Any, videos: int, frames: int, seed: int = 1
) -> list[tuple[bytes, bytes]]:
    """Upload ``frames`` frames of each of ``videos`` videos; return their tasks, interleaved."""
    jpegs = render_jpegs(12, seed=seed)
    tasks = []
    for f in range(frames):
        for v in range(videos):
            video = f"video-{v}"
            key = f"{video}/{f:06d}.jpg"
            s3.put_object(Bucket=pipeline.bucket, Key=key, Body=jpegs[(f + v) % len(jpegs)])
            tasks.append(task(video, f, key))
    return tasks


def results_of(records: list[Any]) -> list[dict[str, Any]]:
    out = []
    for key, value, _headers in records:
        assert isinstance(value, dict), value
        validate_result(value)
        assert key == value["video_id"].encode()
        out.append(value)
    return out


def assert_ordered_per_video(results: list[dict[str, Any]]) -> None:
    by_video: dict[str, list[int]] = defaultdict(list)
    for r in results:
        by_video[r["video_id"]].append(r["frame_id"])
    for video, frames in by_video.items():
        assert frames == sorted(frames), f"{video} out of order: {frames[:20]}…"


def wait_metric(svc: Any, name: str, at_least: float, timeout: float = 120.0) -> float:
    deadline = time.monotonic() + timeout
    value = 0.0
    while time.monotonic() < deadline:
        try:
            value = svc.metric(name)
        except OSError:
            value = 0.0
        if value >= at_least:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{name} stayed at {value} < {at_least}:\n{svc.log_tail()}")


def wait_shared(a: Any, b: Any, partitions: int, timeout: float = 60.0) -> None:
    """Wait until the group has settled: both replicas hold partitions, all of them together."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = (
            a.metric("inference_assigned_partitions"),
            b.metric("inference_assigned_partitions"),
        )
        if min(held) > 0 and sum(held) == partitions:
            time.sleep(0.5)  # let the second round of the cooperative rebalance finish
            return
        time.sleep(0.2)
    raise AssertionError(f"partitions not shared after {timeout} s: {held}")


def test_every_task_gets_one_valid_result_in_order(pipeline: Pipeline, s3_client: Any) -> None:
    tasks = upload_videos(pipeline, s3_client, videos=5, frames=60)
    pipeline.produce(tasks)
    svc = pipeline.service()
    svc.wait_ready()
    results = results_of(pipeline.read(pipeline.results_topic, expected=len(tasks)))
    ids = Counter(r["task_id"] for r in results)
    assert len(results) == 300 and len(ids) == 300, ids.most_common(3)
    assert all(r["status"] == "ok" for r in results)
    assert_ordered_per_video(results)
    # The same image gives the same detections wherever it appears (idempotent results).
    jpeg_of: dict[int, list[Any]] = {}
    for r in results:
        v, f = int(r["video_id"].split("-")[1]), r["frame_id"]
        jpeg_of.setdefault((f + v) % 12, []).append(r["detections"])
    assert any(d for d in jpeg_of[0][0]), "the test model finds objects in synthetic frames"
    for dets in jpeg_of.values():
        assert all(d == dets[0] for d in dets)
    assert pipeline.read(pipeline.dlq_topic, expected=0, timeout=3, settle_s=1) == []
    assert svc.metric("inference_results_total") == 300


def test_two_replicas_share_the_partitions(pipeline: Pipeline, s3_client: Any) -> None:
    tasks = upload_videos(pipeline, s3_client, videos=6, frames=40, seed=2)
    a = pipeline.service()
    b = pipeline.service()
    a.wait_ready()
    b.wait_ready()
    wait_shared(a, b, partitions=3)
    pipeline.produce(tasks)
    results = results_of(pipeline.read(pipeline.results_topic, expected=len(tasks)))
    assert len(results) == len(tasks) == len({r["task_id"] for r in results})
    assert_ordered_per_video(results)
    done_a, done_b = a.metric("inference_results_total"), b.metric("inference_results_total")
    assert done_a > 0 and done_b > 0, (done_a, done_b)
    assert done_a + done_b == len(tasks)


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_replica_killed_mid_stream_loses_nothing(
    pipeline: Pipeline, s3_client: Any, delivery: str
) -> None:
    tasks = upload_videos(pipeline, s3_client, videos=6, frames=70, seed=3)
    opts = {"INFERENCE_DELIVERY": delivery, "INFERENCE_MAX_IN_FLIGHT": "16",
            "INFERENCE_TRANSACTION_TIMEOUT_MS": "10000", "INFERENCE_SESSION_TIMEOUT_MS": "6000"}  # fmt: skip
    victim = pipeline.service(**opts)
    survivor = pipeline.service(**opts)
    victim.wait_ready()
    survivor.wait_ready()
    wait_shared(victim, survivor, partitions=3)
    pipeline.produce(tasks)
    wait_metric(victim, "inference_results_total", 40)
    victim.signal(signal.SIGKILL)
    victim.wait(timeout=30)
    records = pipeline.read(pipeline.results_topic, expected=len(tasks), timeout=240, settle_s=5)
    results = results_of(records)
    counts = Counter(r["task_id"] for r in results)
    expected = {json.loads(v)["video_id"] + ":" + str(json.loads(v)["frame_id"]) for _, v in tasks}
    assert set(counts) == expected, f"lost: {sorted(expected - set(counts))[:10]}"
    duplicates = sum(n - 1 for n in counts.values())
    if delivery == "exactly_once":
        assert duplicates == 0, counts.most_common(5)
    else:
        # Only what was in flight (published, offsets not yet committed) may repeat.
        assert duplicates <= 2 * 16, duplicates
    assert all(r["status"] == "ok" for r in results)


def test_bad_tasks_and_frames_get_error_results_and_dead_letters(
    pipeline: Pipeline, s3_client: Any, kafka_admin: Any
) -> None:
    from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

    # Let the tasks topic carry a record of several MB.
    resource = ConfigResource(
        "topic", pipeline.tasks_topic, set_config={"max.message.bytes": "8388608"}
    )
    for f in kafka_admin.alter_configs([resource]).values():
        f.result(timeout=30)
    good = render_jpegs(1, seed=9)[0]
    put = lambda key, body: s3_client.put_object(Bucket=pipeline.bucket, Key=key, Body=body)  # noqa: E731
    put("ok.jpg", good)
    put("truncated.jpg", good[:200])
    put("text.jpg", b"this is not an image at all")
    put("bomb.jpg", bomb_jpeg(good))
    put("empty.jpg", b"")
    bad: list[tuple[bytes | None, bytes | None, str | None]] = [
        (b"v", b"{not json", None),
        (b"v", b"\x89PNG\r\n\x1a\n binary", None),
        (b"v", json.dumps({"video_id": "v", "frame_id": "seven", "s3_key": "ok.jpg"}).encode(), "invalid_task"),
        (b"v", json.dumps({"video_id": "v", "frame_id": 1}).encode(), "invalid_task"),
        (b"v", json.dumps({"video_id": "v", "frame_id": -3, "s3_key": "ok.jpg"}).encode(), "invalid_task"),
        (b"v", json.dumps({"video_id": "v", "frame_id": 4, "s3_key": "../../etc/passwd"}).encode(), "invalid_task"),
        (b"v", json.dumps({"video_id": "v", "frame_id": 5, "s3_key": "a/./b.jpg"}).encode(), "invalid_task"),
        (b"v", json.dumps({"video_id": "v", "frame_id": 6, "s3_key": "missing.jpg"}).encode(), "frame_not_found"),
        (b"v", json.dumps({"video_id": "v", "frame_id": 7, "s3_key": "s3://no-such-bucket-zz/x.jpg"}).encode(), "frame_not_found"),
        (b"v", json.dumps({"video_id": "v", "frame_id": 8, "s3_key": "truncated.jpg"}).encode(), "undecodable_frame"),
        (b"v", json.dumps({"video_id": "v", "frame_id": 9, "s3_key": "text.jpg"}).encode(), "undecodable_frame"),
        (b"v", json.dumps({"video_id": "v", "frame_id": 10, "s3_key": "empty.jpg"}).encode(), "undecodable_frame"),
        (b"v", json.dumps({"video_id": "v", "frame_id": 11, "s3_key": "bomb.jpg"}).encode(), "frame_too_large"),
        (b"v", json.dumps({"video_id": "v", "frame_id": 12, "s3_key": "ok.jpg", "pad": "x" * 3_000_000}).encode(), "invalid_task"),
    ]  # fmt: skip
    records: list[tuple[bytes | None, bytes | None]] = []
    good_ids = []
    for i, (key, value, _code) in enumerate(bad):
        records.append((key, value))
        good_ids.append(f"g:{i}")
        records.append(task("g", i, "ok.jpg"))
    pipeline.produce(records)
    # The missing bucket is allowed, so that it is looked up (and found missing).
    svc = pipeline.service(INFERENCE_S3_ALLOWED_BUCKETS="no-such-bucket-zz")
    svc.wait_ready()
    n_results = sum(1 for b in bad if b[2] is not None) + len(good_ids)
    results = results_of(pipeline.read(pipeline.results_topic, expected=n_results, settle_s=3))
    assert len(results) == n_results
    ok = [r for r in results if r["status"] == "ok"]
    assert sorted(r["task_id"] for r in ok) == sorted(good_ids)
    errors = [r for r in results if r["status"] == "error"]
    got_codes = Counter(r["error"]["code"] for r in errors)
    assert got_codes == Counter(b[2] for b in bad if b[2] is not None), got_codes
    for r in errors:
        assert r["error"]["message"]
    dlq = pipeline.read(pipeline.dlq_topic, expected=len(bad), settle_s=2)
    assert len(dlq) == len(bad)
    dlq_codes = Counter(dict(h)["error.code"].decode() for _k, _v, h in dlq)
    assert dlq_codes == Counter(b[2] or "invalid_task" for b in bad)
    for _k, _v, headers in dlq:
        h = dict(headers)
        assert h["source.topic"].decode() == pipeline.tasks_topic
        assert int(h["source.offset"]) >= 0 and h["error.message"]
    assert svc.proc is not None and svc.proc.poll() is None, "the service stays up"
    assert svc.get("/healthz")[0] == 200


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_poison_records_never_stop_the_service(
    pipeline: Pipeline, s3_client: Any, kafka_admin: Any, delivery: str
) -> None:
    """Records that crashed the loop or aborted its transactions forever, between good tasks."""
    from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

    resource = ConfigResource(
        "topic", pipeline.tasks_topic, set_config={"max.message.bytes": "8388608"}
    )
    for f in kafka_admin.alter_configs([resource]).values():
        f.result(timeout=30)
    s3_client.put_object(Bucket=pipeline.bucket, Key="ok.jpg", Body=render_jpegs(1, seed=4)[0])
    ids = '"video_id": "p", "frame_id": %d, "s3_key": "ok.jpg"'
    bad: list[tuple[bytes, str | None]] = [
        (("[" * 1000 + "]" * 1000).encode(), None),  # 2 KB nested 1,000 deep
        (("{" + ids % 1 + ', "meta": ' + "[" * 5000 + "]" * 5000 + "}").encode(), "invalid_task"),
        (("{" + ids % 2 + ', "meta": {"x": NaN}}').encode(), "invalid_task"),
        (("{" + ids % 3 + ', "meta": {"x": 1e999}}').encode(), "invalid_task"),
        (("{" + ids % 4 + ', "task_id": "\\ud800"}').encode(), "invalid_task"),
        # 1.6 MB of UTF-8 (under the task limit below), over the results topic's 1 MB
        (json.dumps({"video_id": "p", "frame_id": 5, "s3_key": "ok.jpg",
                     "meta": {"blob": "\U0001f600" * 400_000}},
                    ensure_ascii=False).encode(), "result_too_large"),
    ]  # fmt: skip
    records: list[tuple[bytes | None, bytes | None]] = []
    for i, (value, _code) in enumerate(bad):
        records.append((b"p", value))
        records.append(task("g", i, "ok.jpg"))
    pipeline.produce(records)
    svc = pipeline.service(INFERENCE_DELIVERY=delivery, INFERENCE_MAX_TASK_BYTES=str(4 << 20))
    svc.wait_ready()
    expected = len(bad) + sum(1 for _v, code in bad if code is not None)
    raw = pipeline.read(pipeline.results_topic, expected=expected, settle_s=3)
    results = results_of(raw)  # every one parsed as strict JSON and valid against the schema
    codes = Counter(r["error"]["code"] for r in results if r["status"] == "error")
    assert codes == Counter(code for _v, code in bad if code is not None), codes
    assert sorted(r["frame_id"] for r in results if r["video_id"] == "g") == list(range(len(bad)))
    too_large = next(r for r in results if r["status"] == "error" and r["frame_id"] == 5)
    assert too_large["meta"] is None
    dlq = pipeline.read(pipeline.dlq_topic, expected=len(bad), settle_s=2)
    assert len(dlq) == len(bad)
    assert svc.proc is not None and svc.proc.poll() is None, "the service stays up"
    assert svc.get("/healthz")[0] == 200
    assert svc.get("/readyz")[0] == 200


def stack(*args: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "stack"), *args], check=True, stdout=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip


def test_s3_outage_and_broker_restart_recover_without_error_results(
    pipeline: Pipeline, s3_client: Any
) -> None:
    tasks = upload_videos(pipeline, s3_client, videos=4, frames=50, seed=5)
    svc = pipeline.service(INFERENCE_TRANSACTION_TIMEOUT_MS="15000")
    svc.wait_ready()
    try:
        stack("down", "--only", "s3")
        pipeline.produce(tasks[:100])
        time.sleep(4)  # the service meets a dead S3 and retries
        assert svc.metric("inference_results_total") == 0
    finally:
        stack("up")
    wait_metric(svc, "inference_results_total", 100, timeout=120)
    stack("down", "--only", "kafka")
    time.sleep(2)
    stack("up")
    pipeline.produce(tasks[100:])
    results = results_of(
        pipeline.read(pipeline.results_topic, expected=len(tasks), timeout=240, settle_s=3)
    )
    assert {r["task_id"] for r in results} == {
        f"{json.loads(v)['video_id']}:{json.loads(v)['frame_id']}" for _, v in tasks
    }
    assert len(results) == len(tasks), "exactly once across the outage"
    assert all(r["status"] == "ok" for r in results)
    assert svc.proc is not None and svc.proc.poll() is None


def test_sigterm_during_backlog_exits_0_and_restart_finishes(
    pipeline: Pipeline, s3_client: Any
) -> None:
    tasks = upload_videos(pipeline, s3_client, videos=4, frames=100, seed=6)
    pipeline.produce(tasks)
    first = pipeline.service()
    first.wait_ready()
    wait_metric(first, "inference_results_total", 30)
    t0 = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    assert time.monotonic() - t0 < 40
    done_first = len(pipeline.read(pipeline.results_topic, expected=1, timeout=20, settle_s=2))
    assert 0 < done_first < len(tasks)
    second = pipeline.service()
    second.wait_ready()
    results = results_of(pipeline.read(pipeline.results_topic, expected=len(tasks), settle_s=3))
    counts = Counter(r["task_id"] for r in results)
    assert len(counts) == len(tasks) and max(counts.values()) == 1
    assert_ordered_per_video(results)


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux ``/proc``), in MB."""
    total_kb, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
            for thread in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (thread / "children").read_text().split()]
        except OSError:  # exited meanwhile
            continue
    return total_kb / 1024


def test_backlog_keeps_in_flight_bounded_and_memory_flat(
    pipeline: Pipeline, s3_client: Any
) -> None:
    """A backlog 50× the in-flight bound: consumption pauses and resumes, the bound holds, and the
    service's memory (main process and workers) does not grow with the work done."""
    limit = 24
    tasks = upload_videos(pipeline, s3_client, videos=4, frames=300, seed=8)
    svc = pipeline.service(INFERENCE_MAX_IN_FLIGHT=str(limit))
    svc.wait_ready()
    assert svc.proc is not None
    pipeline.produce(tasks)
    in_flight, paused, rss = [], [], []
    quarter = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = svc.metric("inference_results_total")
        in_flight.append(svc.metric("inference_in_flight"))
        paused.append(svc.metric("inference_consumption_paused"))
        rss.append(rss_mb(svc.proc.pid))
        if quarter is None and done >= len(tasks) / 4:
            quarter = len(rss) - 1
        if done >= len(tasks):
            break
        time.sleep(0.1)
    assert svc.metric("inference_results_total") == len(tasks), svc.log_tail()
    assert max(in_flight) <= limit, max(in_flight)
    assert 1.0 in paused and 0.0 in paused[paused.index(1.0) :], "paused and resumed"
    assert quarter is not None
    # From a quarter of the backlog on, memory stays within a few MB of where it was (allocator
    # noise), although three times as many frames go through afterwards.
    growth = max(rss[quarter:]) - rss[quarter]
    print(f"\nRSS at 1/4: {rss[quarter]:.0f} MB, max after: {max(rss[quarter:]):.0f} MB")
    assert growth < 40, f"memory grew {growth:.0f} MB over the backlog: {rss[quarter::10]}"
    results = results_of(pipeline.read(pipeline.results_topic, expected=len(tasks), settle_s=1))
    assert len({r["task_id"] for r in results}) == len(tasks)
    assert_ordered_per_video(results)


def test_http_endpoints(pipeline: Pipeline) -> None:
    import urllib.request

    svc = pipeline.service()
    svc.wait_ready()
    assert svc.get("/healthz")[0] == 200
    status, body = svc.get("/readyz")
    assert status == 200 and json.loads(body) == {
        "ready": True,
        "checks": {"kafka": True, "s3": True, "model": True},
    }
    model = json.loads(svc.get("/v1/model")[1])
    assert model["classes"] == {"0": "disc", "1": "square", "2": "triangle", "3": "star"}
    assert len(model["sha256"]) == 64

    def post(body: bytes) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{svc.port}/v1/detect", data=body, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, result = post(render_jpegs(1, seed=11)[0])
    assert status == 200
    validate_result(result)
    assert result["status"] == "ok" and result["image"] == {"width": 320, "height": 240}
    status, result = post(b"garbage")
    assert status == 422 and result["error"]["code"] == "undecodable_frame"
    validate_result(result)
    metrics = svc.get("/metrics")[1].decode()
    for name in ("inference_results_total", "inference_stage_seconds_bucket", "inference_in_flight",
                 "inference_consumer_lag", "inference_rebalances_total", "inference_batch_size"):  # fmt: skip
        assert name in metrics, name


def test_sasl_credentials_reach_the_broker_and_refused_ones_stop_start_up(
    pipeline: Pipeline, s3_client: Any, stack_env: dict[str, str]
) -> None:
    """Through the stack's SASL/PLAIN listener: a wrong password stops start-up with a message
    naming the settings; the right one serves every task."""
    tasks = upload_videos(pipeline, s3_client, videos=2, frames=5)
    pipeline.produce(tasks)
    sasl = {
        "INFERENCE_KAFKA_BOOTSTRAP_SERVERS": stack_env["STACK_KAFKA_SASL_BOOTSTRAP"],
        "INFERENCE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "INFERENCE_KAFKA_SASL_MECHANISM": "PLAIN",
        "INFERENCE_KAFKA_SASL_USERNAME": stack_env["STACK_KAFKA_SASL_USERNAME"],
    }
    refused = pipeline.service(**sasl, INFERENCE_KAFKA_SASL_PASSWORD="not-the-password")
    assert refused.wait(timeout=90) == 2, refused.log_tail()
    log = refused.log_tail()
    assert "refused the credentials" in log and "INFERENCE_KAFKA_SASL_PASSWORD" in log, log
    assert "not-the-password" not in log
    svc = pipeline.service(
        **sasl, INFERENCE_KAFKA_SASL_PASSWORD=stack_env["STACK_KAFKA_SASL_PASSWORD"]
    )
    svc.wait_ready()
    results = results_of(pipeline.read(pipeline.results_topic, expected=len(tasks)))
    assert len(results) == len(tasks) and all(r["status"] == "ok" for r in results)
    assert_ordered_per_video(results)


def test_forbidden_and_unlisted_buckets_are_final_and_consumption_goes_on(
    pipeline: Pipeline, s3_client: Any, s3_bucket: Callable[..., str], stack_env: dict[str, str]
) -> None:
    """As the stack's ``limited`` S3 identity (it may read ``frames*`` buckets only): a task on a
    bucket it may not read gets one ``frame_forbidden`` result and dead letter, also for a key
    that does not exist there (a 403, as on AWS without s3:ListBucket); a bucket missing from
    INFERENCE_S3_ALLOWED_BUCKETS is ``invalid_task`` before any GET. The good task behind each,
    in the same partition, is ``ok`` at once: nothing pauses, nothing is retried."""
    good = render_jpegs(1, seed=5)[0]
    private = s3_bucket("private")  # exists; the limited identity may not read it
    unlisted = s3_bucket("frames")  # the identity may read it; the service is not told to
    for bucket in (pipeline.bucket, private, unlisted):
        s3_client.put_object(Bucket=bucket, Key="ok.jpg", Body=good)
    bad = [
        (f"s3://{private}/ok.jpg", "frame_forbidden"),
        (f"s3://{private}/missing.jpg", "frame_forbidden"),
        (f"s3://{unlisted}/ok.jpg", "invalid_task"),
    ]
    records: list[tuple[bytes | None, bytes | None]] = []
    for i, (key, _code) in enumerate(bad):
        records.append(task("v", 2 * i, key))  # one video: the good task waits behind the bad
        records.append(task("v", 2 * i + 1, "ok.jpg"))
    pipeline.produce(records)
    svc = pipeline.service(
        AWS_ACCESS_KEY_ID=stack_env["STACK_S3_LIMITED_ACCESS_KEY_ID"],
        AWS_SECRET_ACCESS_KEY=stack_env["STACK_S3_LIMITED_SECRET_ACCESS_KEY"],
        INFERENCE_S3_ALLOWED_BUCKETS=private,
    )
    svc.wait_ready()
    started = time.monotonic()
    raw = pipeline.read(pipeline.results_topic, expected=len(records), timeout=60, settle_s=0)
    took = time.monotonic() - started
    results = results_of(raw)
    assert [r["frame_id"] for r in results] == list(range(len(records))), svc.log_tail()
    assert took < 30, f"{took:.1f} s for {len(records)} tasks: something was retried"
    for i, (key, code) in enumerate(bad):
        failed, after = results[2 * i], results[2 * i + 1]
        assert failed["status"] == "error" and failed["error"]["code"] == code, failed
        assert key.split("/")[2] in failed["error"]["message"], failed  # names the bucket
        assert after["status"] == "ok" and after["detections"], after
    assert "INFERENCE_S3_ALLOWED_BUCKETS" in results[4]["error"]["message"]
    dlq = pipeline.read(pipeline.dlq_topic, expected=len(bad), settle_s=2)
    assert [dict(h)["error.code"].decode() for _k, _v, h in dlq] == [c for _k, c in bad]
    assert svc.proc is not None and svc.proc.poll() is None, "the service stays up"
    assert svc.get("/readyz")[0] == 200
    assert "pausing consumption" not in svc.log_tail(400)
