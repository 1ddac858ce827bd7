"""Swapping the model of a running service without downtime, on the real stack.

One replica under exactly_once; the model is swapped mid-stream by ``POST /v1/model``, by SIGHUP
after the configured file was replaced, or by the poll of ``INFERENCE_MODEL_POLL_S``. Results are
read ``read_committed`` from the start, each record once by its offset (``test_faults.read_all``),
and matched to their tasks' partitions and offsets, so that "old model up to some offset, the new
one after it" is checked per task partition. ``/readyz`` is sampled every 100 ms meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Pipeline, Service
from tests.integration.test_faults import Stream, Tally, check, read_all, upload
from tests.integration.test_service import wait_metric

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.model, pytest.mark.slow]

TOKEN = "swap-token"


# ------------------------------------------------------------------------------------ models
def cached_onnx(model_env: dict[str, str]) -> Path:
    """The ONNX file the session's model cache made from the test checkpoint."""
    found = sorted(Path(model_env["INFERENCE_CACHE_DIR"]).glob("*/model.onnx"))
    assert found, f"no model.onnx in {model_env['INFERENCE_CACHE_DIR']}"
    return found[0]


def second_model(model_env: dict[str, str], path: Path, note: str = "") -> Path:
    """A second valid model without training: the test model as ONNX (another file, another
    sha256); ``note`` in its doc string makes yet another file of the same network."""
    shutil.copyfile(cached_onnx(model_env), path)
    if note:
        import onnx

        model = onnx.load(str(path))
        model.doc_string = note
        onnx.save(model, str(path))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ probes
@dataclass
class Probe:
    """Samples ``/readyz`` and the published results of a service every 100 ms from a thread."""

    svc: Service
    readyz: list[tuple[float, int]] = field(default_factory=list)
    published: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Probe:
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                status, _ = self.svc.get("/readyz", timeout=2)
            except OSError:
                status = 0  # no answer within 2 s counts as down
            self.readyz.append((t0, status))
            with contextlib.suppress(OSError):
                count = self.svc.metric("inference_results_total")
                self.published.append((time.monotonic(), count))
            self._stop.wait(max(0.0, 0.1 - (time.monotonic() - t0)))

    def assert_always_ready(self, during: tuple[float, float]) -> None:
        """Every sample 200, and samples all through ``during`` (the swap), ones before it and
        after it included."""
        bad = [(round(t, 1), s) for t, s in self.readyz if s != 200]
        times = [t for t, _ in self.readyz]
        start, end = during
        assert times and times[0] < start and times[-1] > end, "the probe missed the swap"
        inside = [t for t in times if start <= t <= end]
        # At least one a second; a swap that fails at once (0.1 s) may fall between two samples.
        assert len(inside) >= int(end - start), f"{len(inside)} samples in {end - start:.1f} s"
        assert not bad, f"/readyz not 200 at {bad[:10]} ({len(bad)} of {len(self.readyz)})"

    def rate(self, start: float, end: float) -> float:
        """Results published per second between two moments (from the samples)."""
        inside = [(t, n) for t, n in self.published if start <= t <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def longest_pause(self, start: float, end: float) -> float:
        """The longest time between moments, from ``start`` to ``end``, without a new result."""
        inside = [(t, n) for t, n in self.published if start <= t <= end]
        longest, since = 0.0, start
        for (_t0, n0), (t1, n1) in itertools.pairwise(inside):
            if n1 > n0:
                longest, since = max(longest, t1 - since), t1
        return max(longest, (inside[-1][0] if inside else end) - since)

    def longest_gap(self) -> float:
        """The longest time between two ``/readyz`` samples."""
        times = [t for t, _ in self.readyz]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


# ------------------------------------------------------------------------------------ helpers
def post_model(
    svc: Service, body: dict[str, Any] | None, token: str | None = TOKEN
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(f"http://127.0.0.1:{svc.port}/v1/model", data=data,
                                     method="POST")  # fmt: skip
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"{}")


def model_of(svc: Service) -> dict[str, Any]:
    status, body = svc.get("/v1/model")
    assert status == 200
    parsed: dict[str, Any] = json.loads(body)
    return parsed


def metric_sample(svc: Service, metric: str, **labels: str) -> float | None:
    """One sample's value on ``/metrics`` (None when absent)."""
    _status, body = svc.get("/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in body.decode().splitlines():
        head, _, value = line.rpartition(" ")
        if not head.startswith(metric + "{") and head != metric:
            continue
        inner = head[len(metric) :].strip("{}")
        given = ",".join(sorted(p for p in inner.split(",") if p))
        if given == want:
            return float(value)
    return None


def info_sample(svc: Service, model: dict[str, Any]) -> float | None:
    """``inference_model_info`` of ``model`` (as ``GET /v1/model`` describes it)."""
    keys = ("name", "sha256", "runtime", "precision")
    return metric_sample(svc, "inference_model_info", **{k: model[k] for k in keys})


def task_positions(pipeline: Pipeline) -> dict[str, tuple[int, int]]:
    """task id → (partition, offset) of its record in the tasks topic (the first, if sent twice)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": pipeline.bootstrap, "group.id": "swap-positions",
                         "enable.auto.commit": False, "log_level": 0})  # fmt: skip
    out: dict[str, tuple[int, int]] = {}
    try:
        meta = consumer.list_topics(pipeline.tasks_topic, timeout=10)
        for n in meta.topics[pipeline.tasks_topic].partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(pipeline.tasks_topic, n), timeout=10
            )
            consumer.assign([TopicPartition(pipeline.tasks_topic, n, low)])
            seen, deadline = low, time.monotonic() + 60
            while seen < high and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                body = json.loads(msg.value() or b"")
                offset = msg.offset() or 0
                out.setdefault(f"{body['video_id']}:{body['frame_id']}", (n, offset))
                seen = offset + 1
    finally:
        consumer.close()
    return out


def shas_per_task_partition(pipeline: Pipeline, tally: Tally) -> dict[int, list[str]]:
    """Per task partition, the sha256 every result carries, in the order of the tasks."""
    positions = task_positions(pipeline)
    lanes: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for result in tally.by_offset.values():
        partition, offset = positions[result["task_id"]]
        lanes[partition].append((offset, result["model"]["sha256"]))
    return {p: [sha for _offset, sha in sorted(lane)] for p, lane in lanes.items()}


def assert_old_then_new(lanes: dict[int, list[str]], old: str, new: str) -> dict[int, int]:
    """Each lane is old…old new…new; returns how many results of each lane came from old."""
    olds: dict[int, int] = {}
    for partition, shas in lanes.items():
        n_old = shas.count(old)
        assert set(shas) <= {old, new}, (partition, set(shas))
        assert shas == [old] * n_old + [new] * (len(shas) - n_old), (
            f"partition {partition}: the models interleave: "
            + "".join("o" if s == old else "n" for s in shas)
        )
        olds[partition] = n_old
    return olds


def service(pipeline: Pipeline, **env: str) -> Service:
    svc = pipeline.service(INFERENCE_HTTP_TOKEN=TOKEN, INFERENCE_DELIVERY="exactly_once", **env)
    svc.wait_ready()
    return svc


# ------------------------------------------------------------------------------------ the tests
def test_a_swap_mid_stream_loses_nothing_repeats_nothing_and_never_goes_unready(
    pipeline: Pipeline, s3_client: Any, model_env: dict[str, str], tmp_path: Path
) -> None:
    tasks = upload(pipeline, s3_client, videos=6, frames=100)
    assert len(tasks) == 600
    new_model = second_model(model_env, tmp_path / "second.onnx")
    svc = service(pipeline)
    old = model_of(svc)
    assert old["last_swap"] is None and info_sample(svc, old) == 1
    assert post_model(svc, {"model": str(new_model)}, token=None)[0] == 401
    with Probe(svc) as probe, Stream(pipeline, tasks, per_s=150):
        wait_metric(svc, "inference_results_total", 200, timeout=300)
        t_swap = time.monotonic()
        status, report = post_model(svc, {"model": str(new_model)})
        t_done = time.monotonic()
        assert status == 200, report
        wait_metric(svc, "inference_results_total", 600, timeout=300)
        time.sleep(0.5)
    tally = read_all(pipeline, 600)
    check(tally, tasks, "exactly_once", 0, pipeline)  # nothing lost, no duplicate, all ok, order

    assert report["outcome"] == "swapped" and report["previous"]["sha256"] == old["sha256"]
    new_sha = report["model"]["sha256"]
    assert new_sha == sha256_of(new_model) != old["sha256"]
    lanes = shas_per_task_partition(pipeline, tally)
    olds = assert_old_then_new(lanes, old["sha256"], new_sha)
    assert 0 < sum(olds.values()) < 600, olds
    probe.assert_always_ready((t_swap, t_done))

    now = model_of(svc)
    assert now["sha256"] == new_sha and now["source"] == str(new_model)
    assert now["last_swap"]["outcome"] == "swapped"
    assert metric_sample(svc, "inference_model_swaps_total", outcome="swapped") == 1
    assert info_sample(svc, now) == 1 and info_sample(svc, old) is None
    assert (metric_sample(svc, "inference_model_load_seconds") or 0) > 0

    before = probe.rate(t_swap - 10, t_swap)
    during = probe.rate(t_swap, t_done)
    after = probe.rate(t_done + 2, t_done + 12)
    print(
        f"\nswap: {t_done - t_swap:.1f} s (the new model's load and warm-up, "
        f"{report['seconds']:.1f} s by the service); results/s before {before:.1f}, during "
        f"{during:.1f} (longest pause without a result {probe.longest_pause(t_swap, t_done + 2):.2f}"
        f" s), after {after:.1f}; results of the old model per partition {olds}; "
        f"{len(probe.readyz)} /readyz samples, all 200, at most {probe.longest_gap():.2f} s apart"
    )


def test_a_swap_to_a_broken_model_leaves_the_old_one_serving(
    pipeline: Pipeline, s3_client: Any, tmp_path: Path
) -> None:
    tasks = upload(pipeline, s3_client, videos=3, frames=50)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(os.urandom(4096))
    svc = service(pipeline)
    old = model_of(svc)
    with Probe(svc) as probe, Stream(pipeline, tasks, per_s=50):
        wait_metric(svc, "inference_results_total", 40, timeout=300)
        t_swap = time.monotonic()
        status, report = post_model(svc, {"model": str(broken)})
        t_done = time.monotonic()
        wait_metric(svc, "inference_results_total", len(tasks), timeout=300)
        time.sleep(0.5)
    tally = read_all(pipeline, len(tasks))
    check(tally, tasks, "exactly_once", 0, pipeline)
    assert status == 422, report
    assert (report["outcome"], report["stage"]) == ("failed", "load"), report
    assert report["error"] and report["model"]["sha256"] == old["sha256"]
    assert {r["model"]["sha256"] for r in tally.by_offset.values()} == {old["sha256"]}
    now = model_of(svc)
    assert now["sha256"] == old["sha256"] and now["source"] == old["source"]
    assert now["last_swap"]["outcome"] == "failed" and now["last_swap"]["error"]
    assert metric_sample(svc, "inference_model_swaps_total", outcome="failed") == 1
    assert metric_sample(svc, "inference_model_swaps_total", outcome="swapped") is None
    probe.assert_always_ready((t_swap, t_done))
    assert "failed at load" in svc.log_tail(400)


@pytest.mark.parametrize("trigger", ["sighup", "poll"])
def test_replacing_the_configured_file_swaps_to_its_new_sha(
    pipeline: Pipeline, s3_client: Any, model_env: dict[str, str], tmp_path: Path, trigger: str
) -> None:
    configured = second_model(model_env, tmp_path / "model.onnx")
    tasks = upload(pipeline, s3_client, videos=3, frames=40)
    first, second = tasks[:60], tasks[60:]
    env = {"INFERENCE_MODEL": str(configured)}
    if trigger == "poll":
        env["INFERENCE_MODEL_POLL_S"] = "0.5"
    svc = service(pipeline, **env)
    old = model_of(svc)
    assert old["sha256"] == sha256_of(configured)
    pipeline.produce(first)
    wait_metric(svc, "inference_results_total", len(first), timeout=300)
    replacement = second_model(model_env, tmp_path / "retrained.onnx", note="retrained")
    replacement.replace(configured)  # as a deployment replaces the file: atomically
    new_sha = sha256_of(configured)
    assert new_sha != old["sha256"]
    if trigger == "sighup":
        svc.signal(signal.SIGHUP)
    deadline = time.monotonic() + 180
    while model_of(svc)["sha256"] != new_sha:
        assert time.monotonic() < deadline, f"no swap to {new_sha[:12]}:\n{svc.log_tail()}"
        time.sleep(0.3)
    swap = model_of(svc)["last_swap"]
    assert (swap["outcome"], swap["trigger"]) == ("swapped", trigger)
    pipeline.produce(second)
    tally = read_all(pipeline, len(tasks))
    check(tally, tasks, "exactly_once", 0, pipeline)
    lanes = shas_per_task_partition(pipeline, tally)
    olds = assert_old_then_new(lanes, old["sha256"], new_sha)
    assert sum(olds.values()) == len(first)  # produced before the swap: all of the old model
