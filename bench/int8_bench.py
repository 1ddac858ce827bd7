"""int8 against fp32 on the test model's held-out split: accuracy, agreement and speed.

Usage::

    python bench/int8_bench.py [--quick] [--calibration-frames N]

Writes ``bench/results/int8.md`` and ``int8.json``:

* the held-out test split of ``models/test`` (``scripts/make_dataset.py --seed 20261128``, 200
  labelled images, regenerated into ``bench/out/synth`` when missing; deterministic), calibrated on
  the *validation* split's frames (never on the images it is scored on);
* mAP50 and mAP50-95 of fp32 and int8 under the standard protocol (conf 0.001, NMS IoU 0.7, COCO
  101-point interpolation over IoU 0.50:0.95: ``inference_devtools.detection_metrics``);
* agreement of int8 with fp32 at the service's thresholds (conf and NMS IoU from the settings'
  defaults): precision and recall of int8's detections against fp32's at IoU ≥ 0.5 and the same
  class, the largest box deviation and the largest confidence difference;
* the network's median latency per precision (one thread, 1280x720 benchmark frames), a ratio of
  one run on this machine; throughput of the whole service is ``make bench-detector``'s.

Both precisions run through the service's own detector (``load_detector``: same decode,
letterbox, OpenVINO backend and NMS as serving). ``--quick``: 64 calibration frames, 100 images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inference_devtools.bench import OUT, RESULTS, log_line, machine_facts, render_frames
from inference_devtools.detection_metrics import Frame, agreement, mean_average_precision
from inference_devtools.paths import REPO_ROOT, TEST_MODEL

DATA = OUT / "synth"
SEED = 20261128
STANDARD = {"conf": 0.001, "iou": 0.7}
FLOORS = {"map50_95_drop_points": 1.0, "agreement": 0.95}


def ensure_dataset() -> Path:
    """The val and test splits of the test model's data set (train is not needed here)."""
    if not (DATA / "images" / "test").is_dir() or not (DATA / "images" / "val").is_dir():
        log_line(f"writing the data set (seed {SEED}) to {DATA} ...")
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "make_dataset.py"), "--out", str(DATA),
             "--seed", str(SEED), "--train", "0", "--force"],
            check=True,
        )  # fmt: skip
    return DATA


def ground_truth(image: Path) -> Frame:
    """Boxes of a YOLO label file, in the image's pixels."""
    import cv2

    h, w = cv2.imread(str(image)).shape[:2]
    label = DATA / "labels" / "test" / f"{image.stem}.txt"
    boxes, classes = [], []
    for line in label.read_text().splitlines():
        c, cx, cy, bw, bh = line.split()
        x, y, ww, hh = float(cx) * w, float(cy) * h, float(bw) * w, float(bh) * h
        boxes.append([x - ww / 2, y - hh / 2, x + ww / 2, y + hh / 2])
        classes.append(int(c))
    return Frame.of(boxes, classes)


def detections(detector: Any, images: list[Path]) -> list[Frame]:
    out = []
    for path in images:
        found = detector.detect(path.read_bytes())
        out.append(
            Frame.of(
                [[d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2] for d in found.detections],
                [d.class_id for d in found.detections],
                [d.confidence for d in found.detections],
            )
        )
    return out


def latency_ms(detector: Any, frames: list[bytes], repeats: int) -> float:
    """Median inference milliseconds (the network alone) over ``frames``, ``repeats`` times."""
    for data in frames[:3]:
        detector.detect(data)
    times = [detector.detect(data).inference_ms for _ in range(repeats) for data in frames]
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="64 calibration frames, 100 images")
    parser.add_argument("--calibration-frames", type=int, default=None)
    args = parser.parse_args(argv)

    from inference_service.detector import load_detector
    from inference_service.model.resolve import resolve_model
    from inference_service.settings import default_of, load_settings

    t_start = time.monotonic()
    facts = machine_facts()
    log_line(f"{facts['cpu']} ({', '.join(facts['cpu_flags'])}), {facts['cpus_available']} CPUs")
    data = ensure_dataset()
    images = sorted((data / "images" / "test").glob("*.jpg"))
    if args.quick:
        images = images[:100]
    truth = [ground_truth(p) for p in images]
    calib_n = args.calibration_frames or (64 if args.quick else default_of("calibration_frames"))
    service = {"conf": default_of("conf"), "iou": default_of("iou")}
    base = {
        "model": str(TEST_MODEL),
        "cache_dir": str(OUT / "cache"),
        "runtime": "openvino",
        "calibration": str(data / "images" / "val"),
        "calibration_frames": calib_n,
    }
    bench_frames = render_frames(24)
    results: dict[str, Any] = {}
    for precision in ("fp32", "int8"):
        per: dict[str, Any] = {}
        for name, thresholds in (("standard", STANDARD), ("service", service)):
            settings = load_settings({**base, **thresholds, "precision": precision})
            started = time.monotonic()
            resolved = resolve_model(settings)
            per["resolve_s"] = round(time.monotonic() - started, 1)
            detector = load_detector(resolved, settings, threads=1)
            log_line(f"{precision}: {name} thresholds on {len(images)} images ...")
            per[name] = detections(detector, images)
            if name == "standard":
                per["latency_ms"] = latency_ms(detector, bench_frames, 2 if args.quick else 4)
                per["int8_dir"] = str(resolved.int8_dir) if resolved.int8_dir else None
            detector.close()
        results[precision] = per
    scores = {p: mean_average_precision(truth, results[p]["standard"]) for p in results}
    agree = agreement(results["fp32"]["service"], results["int8"]["service"])
    report = None
    if results["int8"]["int8_dir"]:
        report = json.loads((Path(results["int8"]["int8_dir"]) / "quantization.json").read_text())
    payload = {
        "machine": facts,
        "images": len(images),
        "calibration": {"source": "val split", "frames": calib_n, "quantizer": report},
        "standard_protocol": STANDARD,
        "service_thresholds": service,
        "map": {p: asdict(s) for p, s in scores.items()},
        "agreement": asdict(agree),
        "latency_ms": {p: results[p]["latency_ms"] for p in results},
        "floors": FLOORS,
    }
    write_report(payload)
    log_line(f"done in {time.monotonic() - t_start:.0f} s")
    return 0


def write_report(payload: dict[str, Any]) -> None:
    facts = payload["machine"]
    fp, q = payload["map"]["fp32"], payload["map"]["int8"]
    agree = payload["agreement"]
    drop = (fp["map50_95"] - q["map50_95"]) * 100
    lat = payload["latency_ms"]
    ok_map = drop <= FLOORS["map50_95_drop_points"]
    ok_agree = min(agree["precision"], agree["recall"]) >= FLOORS["agreement"]
    quantizer = payload["calibration"]["quantizer"] or {}
    lines = [
        "# int8 against fp32 (test model, held-out split)",
        "",
        f"- command: `{facts['command']}`",
        f"- date: {facts['date']}",
        f"- CPU: {facts['cpu']}, {facts['cpus_available']} CPUs available, flags "
        f"{', '.join(facts['cpu_flags'])}",
        f"- model: `{TEST_MODEL.relative_to(REPO_ROOT)}` (YOLOv8n, imgsz 320), OpenVINO, both "
        "precisions through the service's detector",
        f"- scored on: {payload['images']} held-out test images (`scripts/make_dataset.py --seed "
        f"{SEED}`); calibrated on {payload['calibration']['frames']} frames of the validation "
        "split, letterboxed as served",
        f"- quantizer: NNCF {quantizer.get('nncf', '?')}, recipe {quantizer.get('recipe', '?')}, "
        f"{quantizer.get('fake_quantize', '?')} FakeQuantize, "
        f"{quantizer.get('float_head_layers', '?')} layers of the Detect head kept in float "
        f"(`{quantizer.get('ignored_scope', '?')}`), {quantizer.get('seconds', '?')} s",
        "",
        "## Accuracy (standard protocol: conf 0.001, NMS IoU 0.7, COCO 101-point, IoU 0.50:0.95)",
        "",
        "| precision | mAP50 | mAP50-95 | " + " | ".join(f"AP50 {n}" for n in _names()) + " |",
        "|---|---|---|" + "---|" * len(_names()),
    ]
    for p in ("fp32", "int8"):
        m = payload["map"][p]
        per = " | ".join(f"{m['per_class_map50'].get(i, 0.0):.3f}" for i in range(len(_names())))
        lines.append(f"| {p} | {m['map50']:.3f} | {m['map50_95']:.3f} | {per} |")
    lines += [
        "",
        f"mAP50-95 drop: **{drop:.2f} points** (floor: at most "
        f"{FLOORS['map50_95_drop_points']:.1f}): {'met' if ok_map else 'NOT met'}.",
        "",
        f"## Agreement of int8 with fp32 at the service's thresholds (conf "
        f"{payload['service_thresholds']['conf']}, NMS IoU {payload['service_thresholds']['iou']}"
        "; matched at IoU ≥ 0.5, same class)",
        "",
        "| precision | recall | max box deviation | max Δconf | detections fp32 / int8 / matched |",
        "|---|---|---|---|---|",
        f"| {agree['precision']:.3f} | {agree['recall']:.3f} | "
        f"{agree['max_box_deviation_px']:.1f} px | {agree['max_delta_conf']:.3f} | "
        f"{agree['reference_detections']} / {agree['candidate_detections']} / {agree['matched']} |",
        "",
        f"Agreement floor ≥ {FLOORS['agreement']}: {'met' if ok_agree else 'NOT met'}.",
        "",
        "## Network latency (one thread, 1280x720 frames letterboxed to 192x320, median)",
        "",
        "| fp32 ms | int8 ms | int8 speed-up |",
        "|---|---|---|",
        f"| {lat['fp32']:.2f} | {lat['int8']:.2f} | {lat['fp32'] / lat['int8']:.2f}× |",
        "",
        "Throughput of the whole service per runtime and precision: `make bench-detector` "
        "(bench/results/detector.md).",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int8.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "int8.json").write_text(json.dumps(payload, indent=2) + "\n")
    log_line(f"wrote {RESULTS / 'int8.md'} and .json")


def _names() -> tuple[str, ...]:
    from inference_devtools.synthetic import CLASS_NAMES

    return tuple(CLASS_NAMES)


if __name__ == "__main__":
    sys.exit(main())
