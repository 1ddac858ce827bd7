"""The service in int8 on the real stack, calibrated on frames already in the S3 bucket.

The service quantizes the test model at start-up (40 small frames under ``calib/`` of the run's
bucket, read through ``INFERENCE_CALIBRATION=s3://…``), serves Kafka tasks and says what ran:
``model.precision`` in every result, ``/v1/model`` and the start-up log. Without calibration data
it refuses to start and names the setting.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.harness import Pipeline, render_jpegs, task, validate_result

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.model, pytest.mark.slow]

CALIBRATION_FRAMES = 40


def test_service_in_int8_calibrated_on_its_bucket(pipeline: Pipeline, s3_client: Any) -> None:
    pytest.importorskip("nncf", reason="the quantization needs the export extra")
    for i, jpeg in enumerate(render_jpegs(CALIBRATION_FRAMES, seed=21)):
        s3_client.put_object(Bucket=pipeline.bucket, Key=f"calib/{i:04d}.jpg", Body=jpeg)
    jpegs = render_jpegs(6, seed=3)
    tasks = []
    for f in range(30):
        key = f"cam-1/{f:06d}.jpg"
        s3_client.put_object(Bucket=pipeline.bucket, Key=key, Body=jpegs[f % len(jpegs)])
        tasks.append(task("cam-1", f, key))
    pipeline.produce(tasks)
    svc = pipeline.service(
        INFERENCE_PRECISION="int8",
        INFERENCE_CALIBRATION=f"s3://{pipeline.bucket}/calib/",
        INFERENCE_CALIBRATION_FRAMES=str(CALIBRATION_FRAMES),
    )
    svc.wait_ready(timeout=300)
    records = pipeline.read(pipeline.results_topic, expected=len(tasks))
    results = []
    for _key, value, _headers in records:
        assert isinstance(value, dict), value
        validate_result(value)
        results.append(value)
    assert len(results) == 30 and all(r["status"] == "ok" for r in results)
    assert {r["model"]["precision"] for r in results} == {"int8"}
    assert {r["model"]["runtime"] for r in results} == {"openvino/int8"}
    assert [r["frame_id"] for r in results] == list(range(30))
    assert any(r["detections"] for r in results), "int8 still finds the shapes"
    by_jpeg: dict[int, list[Any]] = {}
    for r in results:
        by_jpeg.setdefault(r["frame_id"] % len(jpegs), []).append(r["detections"])
    assert all(all(d == dets[0] for d in dets) for dets in by_jpeg.values())
    model = json.loads(svc.get("/v1/model")[1])
    assert model["precision"] == "int8" and model["runtime"] == "openvino/int8"
    log = svc.log_tail(400)
    assert f"calibration: {CALIBRATION_FRAMES} frames from s3://{pipeline.bucket}/calib/" in log
    assert "openvino/int8, precision int8" in log


def test_int8_without_calibration_stops_start_up_naming_the_setting(pipeline: Pipeline) -> None:
    svc = pipeline.service(INFERENCE_PRECISION="int8", INFERENCE_CALIBRATION="")
    code = svc.wait(timeout=120)
    assert code != 0
    assert "INFERENCE_CALIBRATION" in svc.log_tail(80)
