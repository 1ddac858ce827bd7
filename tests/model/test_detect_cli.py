"""``inference-service detect`` end to end with the real test model: images, a video, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference_service.schemas import load as load_schema
from tests.conftest import CONF, TEST_MODEL

pytestmark = [pytest.mark.model, pytest.mark.slow]

VIDEO_FRAMES = 5


def _scene(rng: np.random.Generator, width: int, height: int) -> Any:
    import cv2

    noise = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
    image = cv2.resize(noise, (width, height), interpolation=cv2.INTER_LINEAR)
    for _ in range(4):
        centre = (int(rng.integers(40, width - 40)), int(rng.integers(40, height - 40)))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.circle(image, centre, int(rng.integers(15, 40)), colour, -1)
        top_left = (int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60)))
        bottom_right = (top_left[0] + 50, top_left[1] + 50)
        cv2.rectangle(image, top_left, bottom_right, colour[::-1], -1)
    return image


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import cv2

    base = tmp_path_factory.mktemp("detect-inputs")
    rng = np.random.default_rng(7)
    folder = base / "images"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"img_{i}.jpg"), _scene(rng, 480, 320))
    (folder / "notes.txt").write_text("not an image: skipped inside folders")
    video = base / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (320, 240))
    assert writer.isOpened()
    for _ in range(VIDEO_FRAMES):
        writer.write(_scene(rng, 320, 240))
    writer.release()
    broken = base / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return {"folder": folder, "video": video, "broken": broken, "base": base}


@pytest.fixture(scope="module")
def detect_run(
    inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], Path]:
    if not TEST_MODEL.exists():
        pytest.skip(f"test model {TEST_MODEL} not present")
    out_dir = tmp_path_factory.mktemp("detect-out")
    annotate = out_dir / "annotated"
    out = out_dir / "results.jsonl"
    env = {
        **os.environ,
        "INFERENCE_MODEL": str(TEST_MODEL),
        "INFERENCE_CACHE_DIR": str(tmp_path_factory.mktemp("model-cache")),
        "INFERENCE_WORKERS": "2",
        "INFERENCE_THREADS": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "inference_service.cli",
            "detect",
            str(inputs["folder"]),
            str(inputs["broken"]),
            str(inputs["video"]),
            str(inputs["base"] / "missing.png"),
            "--out",
            str(out),
            "--annotate",
            str(annotate),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return proc, lines, annotate


def test_one_line_per_frame_in_input_order(
    detect_run: tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], Path],
    inputs: dict[str, Path],
) -> None:
    proc, lines, _ = detect_run
    assert len(lines) == 3 + 1 + VIDEO_FRAMES + 1, proc.stderr
    sources = [(r["source"]["path"], r["source"]["frame_index"]) for r in lines]
    folder = inputs["folder"]
    assert sources == [
        *[(str(folder / f"img_{i}.jpg"), 0) for i in range(3)],
        (str(inputs["broken"]), 0),
        *[(str(inputs["video"]), i) for i in range(VIDEO_FRAMES)],
        (str(inputs["base"] / "missing.png"), 0),
    ]


def test_results_are_valid(
    detect_run: tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], Path],
) -> None:
    import jsonschema

    _, lines, _ = detect_run
    schema = load_schema("result")
    for record in lines:
        jsonschema.validate(record, schema)
        assert record["bucket"] == ""
        assert record["s3_key"] == record["source"]["path"]
        assert record["video_id"] == Path(record["source"]["path"]).stem
        assert record["frame_id"] == record["source"]["frame_index"]
    ok = [r for r in lines if r["status"] == "ok"]
    assert len(ok) == 3 + VIDEO_FRAMES
    for record in ok:
        assert record["model"]["name"] == TEST_MODEL.name
        assert record["timings_ms"]["inference"] > 0
        confidences = [d["confidence"] for d in record["detections"]]
        assert confidences == sorted(confidences, reverse=True)
        assert all(c >= CONF for c in confidences)
        width, height = record["image"]["width"], record["image"]["height"]
        for det in record["detections"]:
            box = det["bbox"]
            assert 0 <= box["x1"] <= box["x2"] <= width
            assert 0 <= box["y1"] <= box["y2"] <= height
    assert {(r["image"]["width"], r["image"]["height"]) for r in ok} == {(480, 320), (320, 240)}


def test_unreadable_inputs_fail_the_run_after_the_rest(
    detect_run: tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], Path],
    inputs: dict[str, Path],
) -> None:
    proc, lines, _ = detect_run
    assert proc.returncode == 1
    errors = {r["source"]["path"]: r["error"]["code"] for r in lines if r["status"] == "error"}
    assert errors == {
        str(inputs["broken"]): "undecodable_frame",
        str(inputs["base"] / "missing.png"): "frame_not_found",
    }
    assert "broken.jpg" in proc.stderr
    assert "missing.png" in proc.stderr


def test_annotate_writes_one_jpeg_per_frame(
    detect_run: tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], Path],
) -> None:
    import cv2

    _, _, annotate = detect_run
    names = sorted(p.name for p in annotate.iterdir())
    assert names == sorted(
        [f"img_{i}.jpg" for i in range(3)] + [f"clip_{i:06d}.jpg" for i in range(VIDEO_FRAMES)]
    )
    image = cv2.imread(str(annotate / "img_0.jpg"))
    assert image is not None and image.shape == (320, 480, 3)
