"""bf16 with some layers kept in f32: agreement with the fp32 reference, and the cost per frame.

For each choice of layers kept in f32 (none, the stem convolution, …, ``model.0``–``model.2``):

* agreement: the test model (``models/test/best.pt``) in OpenVINO bf16 against ultralytics predict
  in fp32 on the conformance images (``tests/data/photos``, ``models/test/conformance``) plus
  ``--extra`` synthetic frames of six sizes, with SPEC.md's bf16 tolerance (the same comparison
  as ``tests/model/test_conformance.py``, from ``inference_devtools.conformance``);
* speed: yolov8n (built from its yaml, as in ``bench/detector_bench.py``) at 384x640 on one
  thread, milliseconds per inference on a ready tensor, medians of interleaved repeats.

Writes ``bench/results/bf16_stem.md`` and ``.json`` with the command. Run: ``make bench-bf16``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import multiprocessing
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from inference_devtools import bench as db
from inference_devtools import conformance as tc
from inference_devtools import synthetic

CHOICES = {
    "none": None,
    "model.0": r"^/model\.0/",
    "model.0-1": r"^/model\.[01]/",
    "model.0-2 (shipped)": r"^/model\.[0-2]/",
}
SIZES = [(1280, 720), (1920, 1080), (720, 1280), (640, 480), (500, 500), (1000, 400)]


def render_extra(folder: Path, count: int) -> list[Path]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12345)
    paths = []
    for i in range(count):
        path = folder / f"x{i:03d}.jpg"
        w, h = SIZES[i % len(SIZES)]
        image, _ = synthetic.render_scene(rng, w, h)  # drawn even if cached: keeps rng in step
        if not path.exists():
            cv2.imwrite(str(path), np.asarray(image), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def _reference(paths: list[str], imgsz: tuple[int, int], names: tuple[str, ...]) -> list[Any]:
    """In a helper process: ultralytics predict in fp32 on every image."""
    os.environ.update(db.ultralytics_env())
    from ultralytics import YOLO

    yolo = YOLO(str(tc.TEST_MODEL))
    out = []
    for path in paths:
        result = yolo.predict(path, imgsz=imgsz, conf=tc.CONF, iou=tc.IOU, verbose=False)[0]
        out.append(tc.from_ultralytics(result, names))
    return out


def agreement(pattern: str | None, resolved: Any, reference: dict[Path, Any]) -> tc.Agreement:
    from inference_service.detector import YoloDetector
    from inference_service.runtime.openvino_backend import OpenVinoBackend

    assert resolved.openvino_xml is not None
    backend = OpenVinoBackend(
        resolved.openvino_xml,
        precision="bf16",
        f32_layers=re.compile(pattern) if pattern else None,
    )
    detector = YoloDetector(backend, resolved, conf=tc.CONF, iou=tc.IOU)
    result = tc.Agreement()
    for path, ref in reference.items():
        found = list(detector.detect(path.read_bytes()).detections)
        tc.compare(found, ref, result, strict=False, conf=tc.CONF, where=path.name)
    detector.close()
    return result


def speed(xml: Path, repeats: int) -> dict[str, float]:
    from inference_service.runtime.openvino_backend import OpenVinoBackend

    batch = np.random.default_rng(0).random((1, 3, 384, 640), dtype=np.float32)
    backends = {"fp32": OpenVinoBackend(xml, precision="fp32")}
    for label, pattern in CHOICES.items():
        backends[label] = OpenVinoBackend(
            xml, precision="bf16", f32_layers=re.compile(pattern) if pattern else None
        )
    times: dict[str, list[float]] = {label: [] for label in backends}
    for _ in range(repeats):
        for label, backend in backends.items():
            for _ in range(3):
                backend.infer(batch)
            t0 = time.perf_counter()
            for _ in range(30):
                backend.infer(batch)
            times[label].append((time.perf_counter() - t0) / 30 * 1000)
    return {label: statistics.median(v) for label, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--extra", type=int, default=150, help="synthetic frames added")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats")
    args = parser.parse_args(argv)
    from inference_service.model.resolve import resolve_model
    from inference_service.settings import Settings

    t_start = time.monotonic()
    settings = Settings(model=tc.TEST_MODEL, cache_dir=db.OUT / "cache", conf=tc.CONF, iou=tc.IOU)
    resolved = resolve_model(settings)
    images = render_extra(db.OUT / "bf16-frames", args.extra) + tc.images()
    db.log_line(f"{len(images)} images; reference (ultralytics predict, fp32) ...")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        refs = ex.submit(
            _reference, [str(p) for p in images], resolved.imgsz, resolved.names
        ).result()
    reference = dict(zip(images, refs, strict=True))
    total = sum(len(r) for r in refs)
    rows: list[dict[str, Any]] = []
    for label, pattern in CHOICES.items():
        a = agreement(pattern, resolved, reference)
        rows.append({"layers_f32": label, "outside": len(a.failures), "of": total, **a.summary()})
        db.log_line(f"  {label}: {len(a.failures)} of {total} outside; {a.summary()}")
    (yolov8n,) = db.prepare_models(["yolov8n"])
    settings_n = Settings(model=yolov8n.path, cache_dir=db.OUT / "cache")
    xml = resolve_model(settings_n).openvino_xml
    assert xml is not None
    db.log_line("yolov8n 384x640, one thread: timing ...")
    ms = speed(xml, args.repeats)
    for row in rows:
        row["yolov8n_ms"] = round(ms[row["layers_f32"]], 2)
    db.RESULTS.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    data = {"command": command, "date": when, "fp32_ms": round(ms["fp32"], 2), "rows": rows}
    (db.RESULTS / "bf16_stem.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# bf16 with layers kept in f32 (bf16_stem)",
        "",
        f"- command: `{command}`",
        f"- date: {when}",
        f"- agreement: test model, OpenVINO bf16 vs ultralytics predict fp32, {len(images)} "
        f"images ({args.extra} synthetic + the conformance set), {total} reference detections, "
        "SPEC.md's bf16 tolerance",
        f"- speed: yolov8n 384x640, one thread, ready tensor, median of {args.repeats} "
        f"interleaved repeats; fp32 for comparison: {ms['fp32']:.1f} ms",
        "",
        "| layers in f32 | outside tolerance | min IoU | max Δconf | max box dev px "
        "| yolov8n ms/frame |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layers_f32']} | {row['outside']} / {row['of']} | {row['min_iou']:.3f} "
            f"| {row['max_dconf']:.3f} | {row['max_box_dev_px']:.2f} | {row['yolov8n_ms']:.1f} |"
        )
    (db.RESULTS / "bf16_stem.md").write_text("\n".join(lines) + "\n")
    db.log_line(f"wrote {db.RESULTS / 'bf16_stem.md'} in {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
