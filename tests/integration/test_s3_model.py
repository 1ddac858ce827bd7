"""Models from S3 on the real stack: a model directory made by ``inference-service export`` and an
``.onnx``, uploaded to SeaweedFS and served with ``INFERENCE_MODEL=s3://...``; a second start
downloads nothing; a missing or refused model stops start-up with a message naming it."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import ROOT, TEST_MODEL, Pipeline, render_jpegs, task

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.model]

NO_TORCH = """
import os, sys
open(os.environ["IMPORT_ATTEMPTS_LOG"] + ".loaded", "a").close()
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "ultralytics", "nncf", "pnnx"):
            with open(os.environ["IMPORT_ATTEMPTS_LOG"], "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"{name} is not installed (blocked by the test)")
        return None
sys.meta_path.insert(0, _Refuse())
"""
"""A ``sitecustomize`` that makes the service's machine one without the export extra."""
DOWNLOADED = re.compile(r"model (s3://\S+): downloaded (\d+) bytes")
REUSED = re.compile(r"model (s3://\S+) unchanged \(version \w+\): reusing .*, nothing downloaded")


@pytest.fixture(scope="module")
def exported(model_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model exported to a model directory by the command line, as an operator does."""
    out = tmp_path_factory.mktemp("exported") / "v1"
    done = subprocess.run(
        [sys.executable, "-m", "inference_service.cli", "export", str(TEST_MODEL), "--out", str(out)],
        env=model_env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "manifest.json").is_file()
    return out


def _upload(s3_client: Any, bucket: str, directory: Path, prefix: str) -> int:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for path in files:
        s3_client.upload_file(str(path), bucket, prefix + path.relative_to(directory).as_posix())
    return len(files)


def _frames(pipeline: Pipeline, s3_client: Any, video: str, first: int, n: int) -> None:
    for i, jpeg in enumerate(render_jpegs(n, seed=first), start=first):
        s3_client.put_object(Bucket=pipeline.bucket, Key=f"{video}/{i:06d}.jpg", Body=jpeg)
    pipeline.produce(task(video, i) for i in range(first, first + n))


def _post_detect(port: int, jpeg: bytes) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/detect", data=jpeg, headers={"Content-Type": "image/jpeg"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        body: dict[str, Any] = json.loads(response.read())
    return body


@pytest.mark.slow
def test_an_s3_model_directory_serves_and_a_second_start_downloads_nothing(
    pipeline: Pipeline,
    s3_client: Any,
    s3_bucket: Any,
    exported: Path,
    tmp_path: Path,
) -> None:
    models = s3_bucket("models")
    uploaded = _upload(s3_client, models, exported, "yolo/v1/")
    uri = f"s3://{models}/yolo/v1/"
    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    attempts = tmp_path / "imports.log"
    settings = {
        "INFERENCE_MODEL": uri,
        "INFERENCE_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": str(blocker),
        "IMPORT_ATTEMPTS_LOG": str(attempts),
    }
    sha = hashlib.sha256(TEST_MODEL.read_bytes()).hexdigest()

    first = pipeline.service(**settings)
    first.wait_ready()
    _frames(pipeline, s3_client, "s3model", 0, 3)
    results = pipeline.read(pipeline.results_topic, 3)
    first.stop()
    log = first.log_path.read_text()
    downloads = DOWNLOADED.findall(log)
    assert [u for u, _ in downloads] == [uri], log[-3000:]
    manifest = json.loads((exported / "manifest.json").read_text())
    assert (
        int(downloads[0][1])
        == sum(f["size"] for f in manifest["files"].values())
        + (exported / "manifest.json").stat().st_size
    )
    assert uploaded == len(manifest["files"]) + 1

    second = pipeline.service(**settings)
    second.wait_ready()
    _frames(pipeline, s3_client, "s3model", 3, 3)
    results = pipeline.read(pipeline.results_topic, 6)
    second.stop()
    log = second.log_path.read_text()
    assert DOWNLOADED.findall(log) == [], log[-3000:]
    assert [m.group(1) for m in REUSED.finditer(log)] == [uri], log[-3000:]

    assert sorted(r["frame_id"] for _k, r, _h in results if isinstance(r, dict)) == list(range(6))
    for _key, result, _headers in results:
        assert isinstance(result, dict) and result["status"] == "ok", result
        assert result["model"]["sha256"] == sha, "the identity is the .pt's it was made from"
        assert result["model"]["name"] == "v1"
    assert sum(len(r["detections"]) for _k, r, _h in results if isinstance(r, dict)) > 0
    versions = [p for p in (tmp_path / "cache" / "s3" / models).glob("*/*") if p.is_dir()]
    assert len(versions) == 1, versions
    assert Path(f"{attempts}.loaded").exists(), "the import blocker did not load"
    assert not attempts.exists(), f"the service tried to import {attempts.read_text().split()}"


def test_an_s3_onnx_serves(
    pipeline: Pipeline, s3_client: Any, s3_bucket: Any, exported: Path, tmp_path: Path
) -> None:
    models = s3_bucket("models")
    onnx = exported / "model.onnx"
    s3_client.upload_file(str(onnx), models, "yolo/best.onnx")
    svc = pipeline.service(
        INFERENCE_MODEL=f"s3://{models}/yolo/best.onnx",
        INFERENCE_CACHE_DIR=str(tmp_path / "cache"),
        INFERENCE_RUNTIME="onnxruntime",
    )
    svc.wait_ready()
    body = _post_detect(svc.port, render_jpegs(1, seed=11)[0])
    svc.stop()
    assert body["status"] == "ok", body
    assert body["model"]["name"] == "best.onnx"
    assert body["model"]["sha256"] == hashlib.sha256(onnx.read_bytes()).hexdigest()
    assert body["model"]["runtime"] == "onnxruntime/fp32"
    assert [u for u, _ in DOWNLOADED.findall(svc.log_path.read_text())] == [
        f"s3://{models}/yolo/best.onnx"
    ]


def test_a_missing_or_refused_model_stops_start_up_naming_it(
    pipeline: Pipeline, s3_bucket: Any, stack_env: dict[str, str], tmp_path: Path
) -> None:
    models = s3_bucket("models")
    missing = pipeline.service(
        INFERENCE_MODEL=f"s3://{models}/yolo/nope.onnx",
        INFERENCE_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert missing.wait(timeout=120) != 0
    log = missing.log_path.read_text()
    assert f"INFERENCE_MODEL=s3://{models}/yolo/nope.onnx: no such object or bucket" in log, log
    assert f"bucket {models!r} and the key 'yolo/nope.onnx'" in log

    # The limited identity may read only buckets named frames*: a models bucket is refused.
    refused = pipeline.service(
        INFERENCE_MODEL=f"s3://{models}/yolo/v1/",
        INFERENCE_CACHE_DIR=str(tmp_path / "cache"),
        AWS_ACCESS_KEY_ID=stack_env["STACK_S3_LIMITED_ACCESS_KEY_ID"],
        AWS_SECRET_ACCESS_KEY=stack_env["STACK_S3_LIMITED_SECRET_ACCESS_KEY"],
    )
    assert refused.wait(timeout=120) != 0
    log = refused.log_path.read_text()
    assert f"INFERENCE_MODEL=s3://{models}/yolo/v1/: access denied to bucket {models!r}" in log, log
    assert "AWS_ACCESS_KEY_ID" in log
