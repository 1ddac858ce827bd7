"""Helpers for tests of the whole service on the real stack: frames, tasks, service processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np

from inference_service import schemas, strict_json
from tests import conftest

ROOT = Path(__file__).resolve().parents[2]
TEST_MODEL = Path(os.environ.get("INFERENCE_TEST_MODEL", conftest.TEST_MODEL))


def render_jpegs(n: int, seed: int = 0, width: int = 320, height: int = 240) -> list[bytes]:
    """``n`` JPEG frames with objects of the test model's classes."""
    from inference_devtools import synthetic as synth

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image, _boxes = synth.render_scene(rng, width, height)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        out.append(buf.tobytes())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_RESULT_SCHEMA = schemas.load("result")


def validate_result(result: dict[str, Any]) -> None:
    jsonschema.validate(result, _RESULT_SCHEMA)


@dataclass
class Service:
    """One ``inference-service serve`` process."""

    env: dict[str, str]
    log_path: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    def start(self) -> Service:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference_service.cli", "serve", *self.extra_args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        return self

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}{path}", timeout=timeout
            ) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = self.get("/readyz", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"service not ready after {timeout} s:\n{self.log_tail()}")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def metric(self, name: str) -> float:
        """Sum of every sample of a metric on ``/metrics``."""
        _status, body = self.get("/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                head = line.split(" ")[0]
                if head == name or head.startswith(name + "{"):
                    total += float(line.rsplit(" ", 1)[1])
        return total


@dataclass
class Pipeline:
    """Topics, bucket and settings of one service test, plus ways to feed and read it."""

    bootstrap: str
    tasks_topic: str
    results_topic: str
    dlq_topic: str
    bucket: str
    group: str
    base_env: dict[str, str]
    workdir: Path
    services: list[Service] = field(default_factory=list)

    def service_env(self, **overrides: str) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(
            INFERENCE_TASKS_TOPIC=self.tasks_topic,
            INFERENCE_RESULTS_TOPIC=self.results_topic,
            INFERENCE_DLQ_TOPIC=self.dlq_topic,
            INFERENCE_GROUP_ID=self.group,
            INFERENCE_S3_BUCKET=self.bucket,
            INFERENCE_HTTP_HOST="127.0.0.1",
            INFERENCE_COMMIT_INTERVAL_MS="100",
        )
        env.update(overrides)
        return env

    def service(self, **overrides: str) -> Service:
        port = free_port()
        env = self.service_env(INFERENCE_HTTP_PORT=str(port), **overrides)
        svc = Service(env, self.workdir / f"service-{len(self.services)}.log", port)
        self.services.append(svc)
        return svc.start()

    def produce(self, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5,
                             "message.max.bytes": 16 * 1024 * 1024})  # fmt: skip
        n = 0
        for key, value in records:
            producer.produce(self.tasks_topic, key=key, value=value)
            producer.poll(0)
            n += 1
        assert producer.flush(30) == 0
        return n

    def read(
        self,
        topic: str,
        expected: int,
        timeout: float = 180.0,
        settle_s: float = 2.0,
    ) -> list[tuple[bytes | None, dict[str, Any] | bytes, list[tuple[str, bytes]]]]:
        """Read ``topic`` (read_committed) from the start until ``expected`` records, then settle."""
        from confluent_kafka import Consumer

        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        })  # fmt: skip
        consumer.subscribe([topic])
        out: list[tuple[bytes | None, dict[str, Any] | bytes, list[tuple[str, bytes]]]] = []
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        try:
            while time.monotonic() < deadline:
                if len(out) >= expected and settle_until is None:
                    settle_until = time.monotonic() + settle_s
                if settle_until is not None and time.monotonic() > settle_until:
                    break
                msg = consumer.poll(0.2)
                if msg is None or msg.error():
                    continue
                value = msg.value() or b""
                try:  # strict RFC 8259: what any downstream reader must be able to read
                    parsed: dict[str, Any] | bytes = json.loads(value.decode("utf-8"))
                    strict_json.check(parsed, max_depth=1000)
                except (ValueError, RecursionError):  # dead letters hold what tasks held
                    parsed = value
                raw_headers: Any = msg.headers() or []
                headers = [(str(k), v if isinstance(v, bytes) else b"") for k, v in raw_headers]
                out.append((msg.key(), parsed, headers))
        finally:
            consumer.close()
        return out

    def stop_all(self) -> None:
        for svc in self.services:
            svc.stop()


def task(video: str, frame: int, key: str | None = None, **extra: Any) -> tuple[bytes, bytes]:
    body: dict[str, Any] = {"video_id": video, "frame_id": frame,
                            "s3_key": key or f"{video}/{frame:06d}.jpg"}  # fmt: skip
    body.update(extra)
    return video.encode(), json.dumps(body).encode()


def bomb_jpeg(jpeg: bytes, width: int = 60000, height: int = 60000) -> bytes:
    """A real JPEG whose frame header claims ``width`` × ``height`` pixels."""
    data = bytearray(jpeg)
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")
