"""What the benchmarks under ``bench/`` share: where they write, machine facts, frames, models.

``ultralytics`` and ``torch`` are imported only in helper processes (:func:`prepare_models` spawns
one), so their thread settings never leak into a benchmark's measuring process.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from inference_devtools import synthetic
from inference_devtools.paths import REPO_ROOT, TEST_MODEL

OUT: Final[Path] = REPO_ROOT / "bench" / "out"
"""Scratch space of the benchmarks: frames, models, caches, logs (not committed)."""
RESULTS: Final[Path] = REPO_ROOT / "bench" / "results"
"""Where the benchmarks write their reports (committed)."""
WIDTH, HEIGHT = 1280, 720
"""The benchmarks' frame size."""


def log_line(text: str) -> None:
    """A time-stamped progress line on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def machine_facts() -> dict[str, Any]:
    """CPU model and flags, CPUs available, Python, date and command line, for a report."""
    model = platform.processor() or "unknown"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    wanted = (
        "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
    )  # fmt: skip
    return {
        "cpu": model,
        "cpus_available": len(os.sched_getaffinity(0)),
        "cpu_flags": [f for f in wanted if f" {f}" in flags],
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def render_frames(count: int) -> list[bytes]:
    """``count`` 1280x720 JPEG frames of synthetic scenes (cached in bench/out/frames)."""
    import cv2

    folder = OUT / "frames"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"frame_{i:03d}.jpg" for i in range(count)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        render = _scene_renderer()
        rng = np.random.default_rng(1234)
        for path in paths:
            image = render(rng)  # drawn even if cached: keeps rng in step
            if not path.exists():
                cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return [p.read_bytes() for p in paths]


def _scene_renderer() -> Callable[[np.random.Generator], Any]:
    """The synthetic scenes (:mod:`inference_devtools.synthetic`) at the benchmarks' size."""
    return lambda rng: synthetic.render_scene(rng, WIDTH, HEIGHT)[0]


def ultralytics_env() -> dict[str, str]:
    """Environment that keeps ultralytics offline and quiet, its settings under bench/out."""
    return {
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "False",
        "YOLO_VERBOSE": "False",
        "YOLO_CONFIG_DIR": str(OUT / "yolo-config"),
    }


@dataclass(frozen=True)
class ModelCase:
    """One model a benchmark runs."""

    name: str
    path: Path
    gflops: float
    """Per frame at the network input the reference uses for a 1280x720 frame."""
    input_hw: tuple[int, int]


def _prepare_model(source: str, target: str) -> tuple[float, tuple[int, int]]:
    """In a helper process: build ``target`` from a yaml (if ``source`` is one), count its FLOPs."""
    os.environ.update(ultralytics_env())
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from ultralytics.models import YOLO

    if source.endswith(".yaml") and not Path(target).exists():
        YOLO(source).save(target)
    model = YOLO(target)
    imgsz = int(model.overrides.get("imgsz", 640) or 640)
    scale = min(imgsz / WIDTH, imgsz / HEIGHT)
    h = (round(HEIGHT * scale) + 31) // 32 * 32
    w = (round(WIDTH * scale) + 31) // 32 * 32
    net = model.model.float().eval()  # type: ignore[union-attr]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, h, w))
    return counter.get_total_flops() / 1e9, (h, w)


def prepare_models(names: list[str]) -> list[ModelCase]:
    """The models named: ``test`` (the test model, skipped when absent) or a yaml name such as
    ``yolov8n`` (built once into bench/out with random weights: speed does not depend on them)."""
    OUT.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, str, Path]] = []
    for name in names:
        if name == "test":
            if TEST_MODEL.exists():
                jobs.append((name, str(TEST_MODEL), TEST_MODEL))
            else:
                log_line(f"skip test model: {TEST_MODEL} not found")
        else:
            target = OUT / f"{name}.pt"
            jobs.append((name, f"{name}.yaml", target))
    ctx = multiprocessing.get_context("spawn")
    cases = []
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        for name, source, target in jobs:
            gflops, hw = ex.submit(_prepare_model, source, str(target)).result()
            cases.append(ModelCase(name, target, gflops, hw))
            log_line(f"model {name}: {target} — {gflops:.2f} GFLOPs at {hw[0]}x{hw[1]}")
    return cases
