"""End-to-end throughput through Kafka and S3, against the detector alone and the original design.

Usage (the local stack must run; ``make bench-pipeline`` does that)::

    scripts/stack run -- .venv/bin/python bench/pipeline_bench.py [--frames 240] [--model yolov8n]

Measured in one run, on the same 1280x720 JPEG frames:

* ``detector alone``: :class:`inference_service.pool.DetectorPool` fed the frames' bytes from
  memory (no Kafka, no S3) — the ceiling the service can reach;
* ``service``: ``inference-service serve`` (exactly_once, default settings) on fresh topics; the
  clock runs from the first task produced to the last result read with ``read_committed``;
* ``reference``: the original specification's design wired into the same loop — a consumer, S3
  GETs, ultralytics ``predict`` in a ``ProcessPoolExecutor`` of 2 workers with one model each,
  results produced to Kafka.

Writes ``bench/results/pipeline.md`` and ``pipeline.json`` with the command line (``--report``
names them otherwise). ``--precision int8`` runs the detector and the service in int8, calibrated
on the detector benchmark's frames (``bench/out/frames``, the same cache entry as
``bench/detector_bench.py``'s); ``bf16`` likewise.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import json
import multiprocessing
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from inference_devtools import bench as db
from inference_devtools import reference_design
from inference_devtools.paths import REPO_ROOT as ROOT

RESULTS = db.RESULTS
INT8_CALIBRATION_FRAMES = 64
"""As ``bench/detector_bench.py`` calibrates: the same quantized model, cached once."""


def log_line(text: str) -> None:
    print(f"[pipeline-bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(
            f"{name} is not set: run under `scripts/stack run --` (make bench-pipeline)"
        )
    return value


def _client(bootstrap: str) -> dict[str, Any]:
    """Brokers and security as every client of the project has them (adapters.kafka.config)."""
    from inference_service.adapters.kafka import client_config
    from inference_service.settings import load_settings

    return client_config(load_settings({"kafka_bootstrap_servers": bootstrap}))


def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({**_client(bootstrap)})
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
    )
    for future in futures.values():
        future.result(timeout=30)


def upload(bucket: str, frames: list[bytes], count: int, prefix: str) -> list[tuple[bytes, bytes]]:
    """Store ``count`` frame objects (cycling through ``frames``); return their tasks."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=_env("INFERENCE_S3_ENDPOINT_URL"),
        config=Config(s3={"addressing_style": "path"}),
    )
    tasks = []
    for i in range(count):
        video = f"{prefix}-v{i % 4}"
        key = f"{video}/{i // 4:06d}.jpg"
        s3.put_object(Bucket=bucket, Key=key, Body=frames[i % len(frames)])
        body = {"video_id": video, "frame_id": i // 4, "s3_key": key, "bucket": bucket}
        tasks.append((video.encode(), json.dumps(body).encode()))
    return tasks


def produce(bootstrap: str, topic: str, tasks: list[tuple[bytes, bytes]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({**_client(bootstrap), "linger.ms": 5})
    for key, value in tasks:
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    producer.flush(30)


def read_until(
    bootstrap: str, topic: str, count: int, timeout: float
) -> tuple[float, list[dict[str, Any]]]:
    """Read ``count`` results (read_committed); return the monotonic time of the last one."""
    from confluent_kafka import Consumer

    consumer = Consumer({
        **_client(bootstrap),
        "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    })  # fmt: skip
    consumer.subscribe([topic])
    results: list[dict[str, Any]] = []
    last = time.monotonic()
    deadline = time.monotonic() + timeout
    try:
        while len(results) < count and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None:
                    results.append(json.loads(msg.value() or b"{}"))
                    last = time.monotonic()
    finally:
        consumer.close()
    if len(results) < count:
        raise RuntimeError(f"only {len(results)} of {count} results within {timeout} s")
    return last, results


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(f) for f in fields[11:15]) / ticks


def precision_settings(precision: str) -> dict[str, str]:
    """The settings of a ``precision`` run (int8: calibrated on the benchmark's frames)."""
    if precision == "fp32":
        return {}
    out = {"precision": precision}
    if precision == "int8":
        out["calibration"] = str(db.OUT / "frames")
        out["calibration_frames"] = str(INT8_CALIBRATION_FRAMES)
    return out


def stack_pids() -> dict[str, int]:
    """The local stack's server pids (``$STACK_DIR/<name>/pid``), when it runs here."""
    out = {}
    state = Path(os.environ.get("STACK_DIR") or ROOT / ".stack")
    for name in ("kafka", "s3"):
        path = state / name / "pid"
        if path.exists():
            out[name] = int(path.read_text().strip())
    return out


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


# --------------------------------------------------------------------------------------------


def bench_detector(
    model: Path, frames: list[bytes], count: int, precision: str = "fp32"
) -> dict[str, Any]:
    from inference_service.pool import DetectorPool
    from inference_service.settings import load_settings

    settings = load_settings(
        {"model": str(model), "cache_dir": str(db.OUT / "cache"), **precision_settings(precision)}
    )

    async def run() -> dict[str, Any]:
        async with DetectorPool(settings) as pool:
            await asyncio.gather(*(pool.detect(f) for f in frames[: pool.processes * 2]))
            latencies: list[float] = []

            async def one(data: bytes) -> None:
                t0 = time.perf_counter()
                await pool.detect(data)
                latencies.append((time.perf_counter() - t0) * 1000)

            t0 = time.perf_counter()
            await asyncio.gather(*(one(frames[i % len(frames)]) for i in range(count)))
            wall = time.perf_counter() - t0
            p50, p95 = _percentiles(latencies)
            return {"design": "detector alone (pool, no Kafka/S3)", "fps": count / wall,
                    "p50_ms": p50, "p95_ms": p95, "runtime": pool.info.runtime,
                    "layout": f"{pool.processes}×{pool.threads}"}  # fmt: skip

    return asyncio.run(run())


def bench_service(
    model: Path, tasks: list[tuple[bytes, bytes]], bootstrap: str, precision: str = "fp32"
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    tasks_topic, results_topic = f"bench-tasks-{run}", f"bench-results-{run}"
    create_topics(bootstrap, [tasks_topic, results_topic, f"bench-dlq-{run}"], 4)
    port = 18003 + int(os.environ.get("STACK_PORT_OFFSET") or 0)  # beside another stack's bench
    env = dict(os.environ)
    env.update(
        INFERENCE_MODEL=str(model), INFERENCE_CACHE_DIR=str(db.OUT / "cache"),
        INFERENCE_TASKS_TOPIC=tasks_topic, INFERENCE_RESULTS_TOPIC=results_topic,
        INFERENCE_DLQ_TOPIC=f"bench-dlq-{run}", INFERENCE_GROUP_ID=f"bench-{run}",
        INFERENCE_HTTP_PORT=str(port), INFERENCE_HTTP_HOST="127.0.0.1",
        INFERENCE_LOG_LEVEL=os.environ.get("PIPELINE_BENCH_LOG_LEVEL", "WARNING"),
    )  # fmt: skip
    env.update({f"INFERENCE_{k.upper()}": v for k, v in precision_settings(precision).items()})
    log_path = db.OUT / "pipeline-service.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "inference_service.cli", "serve"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"service did not become ready; see {log_path}")
                time.sleep(0.3)
            servers = stack_pids()
            before = {name: cpu_seconds(pid) for name, pid in servers.items()}
            before["service main process"] = cpu_seconds(proc.pid)
            t0 = time.monotonic()
            produce(bootstrap, tasks_topic, tasks)
            sampler = _MetricSampler(port) if os.environ.get("PIPELINE_BENCH_SAMPLE") else None
            last, results = read_until(bootstrap, results_topic, len(tasks), timeout=600)
            if sampler is not None:
                sampler.report()
            wall = last - t0
            after = {name: cpu_seconds(pid) for name, pid in servers.items()}
            after["service main process"] = cpu_seconds(proc.pid)
            cpu_share = {name: (after[name] - before[name]) / wall for name in before}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    totals = [r["timings_ms"]["total"] for r in results]
    p50, p95 = _percentiles(totals)
    return {"design": "service (Kafka → S3 → pool → Kafka, exactly_once)",
            "fps": len(tasks) / (last - t0), "p50_ms": p50, "p95_ms": p95,
            "runtime": results[0]["model"]["runtime"], "layout": "auto",
            "ok": sum(r["status"] == "ok" for r in results),
            "cpu_cores_used": {k: round(v, 3) for k, v in cpu_share.items()}}  # fmt: skip


class _MetricSampler:
    """Diagnostics (PIPELINE_BENCH_SAMPLE=1): samples the service's gauges every 100 ms."""

    def __init__(self, port: int) -> None:
        import threading

        self.samples: list[dict[str, float]] = []
        self._port = port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        names = ("inference_in_flight", "inference_detector_in_flight",
                 "inference_detector_pending", "inference_consumption_paused")  # fmt: skip
        while not self._stop.wait(0.1):
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self._port}/metrics", timeout=2
                ) as r:
                    body = r.read().decode()
            except OSError:
                continue
            row = {}
            for line in body.splitlines():
                head, _, value = line.rpartition(" ")
                if head in names:
                    row[head] = float(value)
            self.samples.append(row)

    def report(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for name in sorted({k for row in self.samples for k in row}):
            values = [row[name] for row in self.samples if name in row]
            zero = sum(v == 0 for v in values) / max(1, len(values))
            log_line(f"  {name}: mean {statistics.mean(values):.1f}, zero {100 * zero:.0f} % "
                     f"of {len(values)} samples")  # fmt: skip


def _reference_detect(data: bytes) -> int:
    return len(reference_design.detect(data))


async def _reference_loop(model: Path, tasks_topic: str, results_topic: str, bootstrap: str,
                          count: int, bucket: str) -> None:  # fmt: skip
    import obstore
    from confluent_kafka import Consumer, Producer
    from obstore.store import S3Store

    store = S3Store(bucket, endpoint=_env("INFERENCE_S3_ENDPOINT_URL"), region="us-east-1",
                    client_options={"allow_http": True}, virtual_hosted_style_request=False)  # fmt: skip
    consumer = Consumer({**_client(bootstrap), "group.id": f"ref-{uuid.uuid4().hex[:6]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": True})  # fmt: skip
    consumer.subscribe([tasks_topic])
    producer = Producer({**_client(bootstrap), "linger.ms": 5})
    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("spawn")
    limit = asyncio.Semaphore(8)
    done = 0
    with concurrent.futures.ProcessPoolExecutor(
        2, mp_context=ctx, initializer=reference_design.init, initargs=(str(model),)
    ) as ex:
        await asyncio.gather(
            *(loop.run_in_executor(ex, reference_design.torch_threads) for _ in range(2))
        )

        async def handle(value: bytes) -> None:
            nonlocal done
            try:
                task = json.loads(value)
                data = bytes(await (await obstore.get_async(store, task["s3_key"])).bytes_async())
                n = await loop.run_in_executor(ex, _reference_detect, data)
                producer.produce(results_topic, key=task["video_id"].encode(),
                                 value=json.dumps({"task": task, "detections": n}).encode())  # fmt: skip
                producer.poll(0)
                done += 1
            finally:
                limit.release()

        pending: set[asyncio.Task[None]] = set()
        while done < count:
            msgs = await loop.run_in_executor(None, consumer.consume, 50, 0.05)
            for msg in msgs:
                if msg.error() is None:
                    await limit.acquire()
                    t = asyncio.ensure_future(handle(msg.value() or b""))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
            if not msgs:
                await asyncio.sleep(0.01)
        await asyncio.gather(*pending)
    producer.flush(30)
    consumer.close()


def bench_reference(
    model: Path, tasks: list[tuple[bytes, bytes]], bootstrap: str, bucket: str
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    tasks_topic, results_topic = f"ref-tasks-{run}", f"ref-results-{run}"
    create_topics(bootstrap, [tasks_topic, results_topic], 4)
    import threading

    error: list[BaseException] = []

    def serve() -> None:
        try:
            asyncio.run(
                _reference_loop(model, tasks_topic, results_topic, bootstrap, len(tasks), bucket)
            )
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    time.sleep(20)  # let both workers load ultralytics and warm up (measured separately below)
    t0 = time.monotonic()
    produce(bootstrap, tasks_topic, tasks)
    last, _results = read_until(bootstrap, results_topic, len(tasks), timeout=900)
    thread.join(60)
    if error:
        raise error[0]
    return {"design": "original design (ultralytics in ProcessPoolExecutor ×2) in the same loop",
            "fps": len(tasks) / (last - t0), "p50_ms": float("nan"), "p95_ms": float("nan"),
            "runtime": "ultralytics/torch fp32", "layout": "2×torch threads"}  # fmt: skip


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median frames/s, with every run's frames/s attached."""
    ordered = sorted(runs, key=lambda r: r["fps"])
    median = dict(ordered[len(ordered) // 2])
    median["fps_runs"] = [round(r["fps"], 1) for r in runs]
    return median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--frames", type=int, default=1200,
        help="tasks per measurement (long enough that the first fetch and last commit interval amortise)",
    )  # fmt: skip
    parser.add_argument("--model", default="yolov8n", help="yolov8n, yolov8s or test")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating detector/service runs (median kept)"
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "int8"), default="fp32",
        help="of the detector and the service (int8: calibrated on bench/out/frames)",
    )  # fmt: skip
    parser.add_argument("--report", default="pipeline", help="results file name, without .md/.json")
    args = parser.parse_args(argv)
    bootstrap = _env("INFERENCE_KAFKA_BOOTSTRAP_SERVERS")
    case = db.prepare_models([args.model])[0]
    frames = db.render_frames(16)
    if args.precision == "int8":
        db.render_frames(
            INT8_CALIBRATION_FRAMES
        )  # the calibration folder, as detector_bench has it
    bucket = os.environ.get("INFERENCE_S3_BUCKET", "frames")
    tasks = upload(bucket, frames, args.frames, f"bench-{uuid.uuid4().hex[:6]}")
    log_line(f"{len(tasks)} tasks over 4 videos, model {case.name} ({case.gflops:.2f} GFLOPs)")
    detector_runs: list[dict[str, Any]] = []
    service_runs: list[dict[str, Any]] = []
    for i in range(args.repeats):
        log_line(f"detector alone (run {i + 1}/{args.repeats}) …")
        detector_runs.append(bench_detector(case.path, frames, args.frames, args.precision))
        log_line(f"  {detector_runs[-1]['fps']:.1f} frames/s")
        log_line(f"service end to end (run {i + 1}/{args.repeats}) …")
        service_runs.append(bench_service(case.path, tasks, bootstrap, args.precision))
        log_line(f"  {service_runs[-1]['fps']:.1f} frames/s")
    rows = [_median_run(detector_runs), _median_run(service_runs)]
    overheads = [1 - s["fps"] / d["fps"] for d, s in zip(detector_runs, service_runs, strict=True)]
    if not args.skip_reference:
        log_line("original design in the same loop …")
        rows.append(bench_reference(case.path, tasks, bootstrap, bucket))
        log_line(f"  {rows[-1]['fps']:.1f} frames/s")
    detector_fps = rows[0]["fps"]
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    facts = db.machine_facts()
    lines = [
        "# Pipeline benchmark", "",
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {facts.get('cpu', facts)}",
        f"- {len(tasks)} tasks of 1280x720 JPEG frames over 4 videos, model {case.name} "
        f"({case.gflops:.2f} GFLOPs at {case.input_hw[0]}x{case.input_hw[1]}), precision "
        f"{args.precision}; one run each, same frames",
        "",
        "| design | runtime | layout | frames/s | vs detector alone | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['design']} | {r['runtime']} | {r['layout']} | {r['fps']:.1f} | "
            f"{r['fps'] / detector_fps:.2f}× | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} |"
        )
    service = rows[1]["fps"]
    runs = ", ".join(f"{100 * o:.1f} %" for o in overheads)
    lines += ["", f"Pipeline overhead: {100 * statistics.median(overheads):.1f} % of the detector's "
              f"own frames/s, median of {len(overheads)} alternating runs ({runs}); floor ≤ 15 %.",
              f"frames/s per run: detector {rows[0]['fps_runs']}, service {rows[1]['fps_runs']}."]  # fmt: skip
    shares = rows[1].get("cpu_cores_used", {})
    if shares:
        used = ", ".join(f"{name} {share:.2f}" for name, share in shares.items())
        lines.append(
            f"CPU cores used during the service run, besides the detector workers: {used} "
            f"(of {os.cpu_count()} cores; the broker and S3 server share this machine here)."
        )
    if len(rows) > 2:
        lines.append(
            f"Service vs the original design in the same loop: {service / rows[2]['fps']:.2f}×."
        )
    lines.append(
        "p50/p95 of the service: the result's `timings_ms.total` (consume to result ready)."
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.report}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.report}.json").write_text(json.dumps({"command": command, "rows": rows, "machine": facts, "precision": args.precision},
                                                      indent=2, default=str))  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
