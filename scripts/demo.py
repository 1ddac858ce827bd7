"""The whole system on one machine: video in, annotated results out (``make demo``).

Run with the local stack's environment (``scripts/stack run -- .venv/bin/python scripts/demo.py``).
Steps, each timed:

1. create the default topics (tasks and results with a few partitions) if they are missing;
2. start ``inference-service serve`` in the background with the test model;
3. render a short sample video of moving shapes (fixed seed) and ``submit`` it under a video id
   unique to this run (so that results of earlier runs never mix in);
4. wait for ``/readyz``, then ``collect`` the video's results with ``--expect`` and ``--annotate``;
5. stop the service with SIGTERM (it must exit 0);
6. write ``demo-out/``: the video's JSON, annotated frames, an animated GIF preview and
   ``index.html``; print a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from inference_devtools.paths import TEST_MODEL
from inference_service.commands.report import write_html
from inference_service.settings import Settings, load_settings

log = logging.getLogger("demo")

ROOT = Path(__file__).resolve().parent.parent
TOPIC_PARTITIONS = 3
READY_TIMEOUT_S = 900.0  # the first run converts the .pt checkpoint (torch export: minutes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out", help="output folder")
    parser.add_argument("--frames", type=int, default=120, help="frames of the sample video")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=float, default=24.0, help="frame rate of the sample video")
    parser.add_argument("--objects", type=int, default=5, help="moving shapes in the video")
    parser.add_argument("--seed", type=int, default=20261128, help="seed of the sample video")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait for results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s demo: %(message)s")
    settings = load_settings()
    out: Path = args.out
    _clean(out)
    video_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    t_start = time.monotonic()

    ensure_topics(settings)
    port = _port(settings.http_port)
    service, service_log = start_service(out, port)
    try:
        video = out / "sample.mp4"
        t0 = time.monotonic()
        render_video(video, args.frames, args.width, args.height, args.fps, args.seed, args.objects)
        log.info("rendered %s (%d frames) in %.1f s", video, args.frames, time.monotonic() - t0)
        t_submit = time.time()
        _cli("submit", str(video), "--video-id", video_id)
        log.info("waiting for the service on port %d to be ready (log: %s)", port, service_log)
        wait_ready(service, port, service_log)
        t_ready = time.time()
        document_path = out / f"{video_id}.json"
        collect_rc = _cli(
            "collect", "--video-id", video_id, "--expect", str(args.frames),
            "--out", str(document_path), "--annotate", str(out / "frames"),
            "--timeout", str(args.timeout), check=False,
        )  # fmt: skip
    finally:
        code = stop_service(service)
    if not document_path.exists():
        log.error("demo FAILED: collect wrote no document (exit %d)", collect_rc)
        return 1
    document: dict[str, Any] = json.loads(document_path.read_text())
    summary = document["summary"]
    facts = throughput(summary, t_submit, t_ready)
    facts["service exit status after SIGTERM"] = str(code)
    facts["demo wall time"] = f"{time.monotonic() - t_start:.1f} s"
    preview = write_preview(out / "frames", out / "preview.gif", args.fps)
    images = {int(p.stem): f"frames/{p.name}" for p in sorted((out / "frames").glob("*.jpg"))}
    page = write_html(
        out / "index.html",
        document,
        preview=preview.name if preview else None,
        frame_images=images,
        facts=facts,
        title=f"Inference Service demo: {video_id}",
    )
    print_summary(video_id, summary, facts, page)
    if collect_rc != 0 or code != 0:
        log.error("demo FAILED: collect exit %d, service exit %d", collect_rc, code)
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# Steps


def ensure_topics(settings: Settings) -> None:
    """Create the tasks, results and dead-letter topics if they do not exist."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    from inference_service.adapters.kafka import client_config

    admin = AdminClient(client_config(settings))
    existing = admin.list_topics(timeout=30).topics
    wanted = {
        settings.tasks_topic: TOPIC_PARTITIONS,
        settings.results_topic: TOPIC_PARTITIONS,
        settings.dlq_topic: 1,
    }
    new = [NewTopic(t, num_partitions=n, replication_factor=1)
           for t, n in wanted.items() if t not in existing]  # fmt: skip
    if not new:
        log.info("topics exist: %s", ", ".join(wanted))
        return
    for topic, future in admin.create_topics(new).items():
        try:
            future.result(timeout=30)
            log.info("created topic %s (%d partitions)", topic, wanted[topic])
        except Exception as exc:  # created meanwhile by someone else: fine
            log.info("topic %s: %s", topic, exc)


def start_service(out: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    env = dict(os.environ)
    env.update(
        INFERENCE_MODEL=str(TEST_MODEL),
        INFERENCE_HTTP_PORT=str(port),
        INFERENCE_HTTP_HOST="127.0.0.1",
        YOLO_OFFLINE="1",
        YOLO_AUTOINSTALL="False",
        PYTHONUNBUFFERED="1",
    )
    log_path = out / "service.log"
    with log_path.open("ab") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inference_service.cli", "serve"],
            env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    log.info("started inference-service serve (pid %d, port %d)", proc.pid, port)
    return proc, log_path


def wait_ready(proc: subprocess.Popen[bytes], port: int, service_log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited {proc.returncode}:\n{_tail(service_log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise SystemExit(f"the service was not ready after {READY_TIMEOUT_S:.0f} s:\n"
                     f"{_tail(service_log)}")  # fmt: skip


def stop_service(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            log.error("the service ignored SIGTERM for 90 s; killing it")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    log.info("service stopped, exit status %d", proc.returncode)
    return int(proc.returncode)


def render_video(
    path: Path, frames: int, width: int, height: int, fps: float, seed: int, objects: int
) -> None:
    """``frames`` frames of moving test-model shapes, written as MPEG-4 Part 2 (``mp4v``)."""
    import cv2
    import numpy as np

    from inference_devtools import synthetic

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise SystemExit(f"OpenCV cannot write {path} with the mp4v codec")
    try:
        rng = np.random.default_rng(seed)
        for image, _boxes in synthetic.render_sequence(rng, width, height, frames, objects):
            writer.write(image)
    finally:
        writer.release()


def throughput(summary: dict[str, Any], t_submit: float, t_ready: float) -> dict[str, str]:
    """Measured rates from the results' Kafka timestamps."""
    facts: dict[str, str] = {}
    last_ms = summary.get("last_result_ms")
    received = int(summary.get("received") or 0)
    if last_ms and received:
        since_ready = last_ms / 1000.0 - t_ready
        since_submit = last_ms / 1000.0 - t_submit
        if since_ready > 0:
            facts["service throughput (ready → last result)"] = (
                f"{received / since_ready:.1f} frames/s ({received} frames in {since_ready:.1f} s)"
            )
        facts["end to end (submit start → last result)"] = (
            f"{received / since_submit:.1f} frames/s ({received} frames in {since_submit:.1f} s,"
            " including service start-up)"
        )
    return facts


def write_preview(
    frames_dir: Path, path: Path, fps: float, width: int = 640, step: int = 2
) -> Path | None:
    """An animated GIF of every ``step``-th annotated frame, ``width`` pixels wide, 64 colours."""
    from PIL import Image

    files = sorted(frames_dir.glob("*.jpg"))[::step]
    if not files:
        return None
    images = []
    for file in files:
        with Image.open(file) as im:
            im.draft("RGB", (im.width // 2, im.height // 2))  # JPEG: decode at half size, fast
            height = round(im.height * width / im.width)
            small = im.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            images.append(small.quantize(colors=64, method=Image.Quantize.FASTOCTREE))
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=round(1000 * step / fps), loop=0
    )
    return path


def print_summary(
    video_id: str, summary: dict[str, Any], facts: dict[str, str], page: Path
) -> None:
    latency = summary.get("latency_ms") or {}
    classes = summary.get("detections_by_class") or {}
    lines = [
        "",
        f"video {video_id}: {summary['received']}/{summary['expected']} frames, "
        f"{'complete' if summary['complete'] else 'INCOMPLETE'}, "
        f"{len(summary['duplicated'])} duplicated, errors {summary['errors_by_code'] or 'none'}",
        f"detections: {summary['detections']} "
        f"({', '.join(f'{k} {v}' for k, v in classes.items()) or 'none'})",
        f"latency per frame (timings_ms.total): p50 {latency.get('p50')} ms, "
        f"p95 {latency.get('p95')} ms",
        *(f"{k}: {v}" for k, v in facts.items()),
        f"open {page}",
    ]
    print("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Helpers


def _cli(*args: str, check: bool = True) -> int:
    cmd = [sys.executable, "-m", "inference_service.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"inference-service {args[0]} failed with exit status {proc.returncode}")
    return proc.returncode


def _clean(out: Path) -> None:
    """Empty the output folder of what an earlier run wrote (only the files a run writes)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "frames").mkdir(exist_ok=True)
    for old in [*out.glob("demo-*.json"), *(out / "frames").glob("*.jpg")]:
        old.unlink()
    for name in ("index.html", "preview.gif", "sample.mp4", "service.log"):
        (out / name).unlink(missing_ok=True)


def _port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    log.info("port %d is taken; the demo's service uses %d", preferred, port)
    return port


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


if __name__ == "__main__":
    sys.exit(main())
