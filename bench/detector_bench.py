"""Detector throughput on this machine: the original design vs the service's pool, same frames.

Usage::

    python bench/detector_bench.py [--quick] [--sweep] [--frames N] [--run-frames N]
        [--command-frames N] [--repeats R]

Writes ``bench/results/detector.md`` and ``detector.json`` (``--sweep``: ``sweep.md``/``.json``,
the processes × threads grid behind ``plan_workers``). Every configuration sees the same 1280x720
JPEG frames (rendered with ``inference_devtools.synthetic``) through a closed-loop client that keeps the
design's in-flight capacity busy, so latencies are service times plus the queueing that capacity
implies, not the time a frame waits behind all others.

* ``reference``: the original specification's design, ultralytics ``predict`` on each frame in a
  ``ProcessPoolExecutor`` of 2 spawned workers with one model each;
* ``pool``: :class:`inference_service.pool.DetectorPool` for each runtime and precision (int8:
  OpenVINO on the model quantized once on :data:`CALIBRATION_FRAMES` of the benchmark frames);
* ``detect command``: ``inference-service detect`` on a folder of ``--command-frames`` frame files
  (fp32, bf16 and int8), wall time from launch to exit, start-up included.

The report ends with the int8 floors (issue 13: the int8 ``detect`` command ≥ 1.4× the fastest
fp32 one and ≥ 2.0× the original design, same run) and is drawn as ``detector.png`` beside it:
frames/s per runtime and precision, one bar group per model, the original design's rate marked.

Models: the test model (``models/test/best.pt``) when present, and yolov8n / yolov8s built from
their yaml (random weights: speed does not depend on them). ``ultralytics`` and ``torch`` are
imported only in helper processes, so their thread settings never leak into the measured parent.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference_devtools import reference_design
from inference_devtools.bench import (
    OUT,
    RESULTS,
    ModelCase,
    log_line,
    machine_facts,
    prepare_models,
    render_frames,
    ultralytics_env,
)
from inference_devtools.paths import REPO_ROOT

CALIBRATION_FRAMES = 64
"""Calibration frames of the int8 model (speed does not depend on how many)."""
INT8_FLOORS = {"vs_fastest_fp32_detect": 1.4, "vs_reference": 2.0}
BF16_PEAK_NOTES = 817.0
"""Sustained bf16 GEMM on 2 cores (GFLOP/s), from shared/notes/cpu-inference.md."""


def gemm_gflops(n: int, repeats: int) -> float:
    """Sustained numpy fp32 matmul rate (GFLOP/s, 2 flops per multiply-add), best of repeats."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# --------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Measurement:
    model: str
    design: str
    runtime: str
    precision: str
    processes: int
    threads: int
    in_flight: int
    fps: float = 0.0
    fps_repeats: list[float] = field(default_factory=list)
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    note: str = ""
    error: str = ""


def _summarise(m: Measurement, walls: list[float], latencies: list[float], frames: int) -> None:
    m.fps_repeats = [round(frames / w, 2) for w in walls]
    m.fps = statistics.median(frames / w for w in walls)
    lat = np.array(latencies) * 1000
    m.p50_ms = float(np.percentile(lat, 50))
    m.p95_ms = float(np.percentile(lat, 95))


def run_reference(case: ModelCase, frames: list[bytes], repeats: int) -> Measurement:
    workers, in_flight = 2, 4
    m = Measurement(case.name, "reference", "ultralytics/torch", "fp32", workers, 1, in_flight)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=reference_design.init, initargs=(str(case.path),)
    ) as ex:
        # Start and warm both workers before timing.
        list(ex.map(reference_design.detect, frames[:workers]))
        m.threads = ex.submit(reference_design.torch_threads).result()
        walls, latencies = [], []
        for _ in range(repeats):
            wall, lat = _closed_loop_sync(ex, frames, in_flight)
            walls.append(wall)
            latencies.extend(lat)
    _summarise(m, walls, latencies, len(frames))
    return m


def _closed_loop_sync(
    ex: concurrent.futures.Executor, frames: list[bytes], concurrency: int
) -> tuple[float, list[float]]:
    started: dict[concurrent.futures.Future[Any], float] = {}
    latencies: list[float] = []
    it = iter(frames)
    t0 = time.perf_counter()

    def submit_next() -> None:
        data = next(it, None)
        if data is not None:
            started[ex.submit(reference_design.detect, data)] = time.perf_counter()

    for _ in range(concurrency):
        submit_next()
    while started:
        done, _ = concurrent.futures.wait(started, return_when=concurrent.futures.FIRST_COMPLETED)
        for fut in done:
            fut.result()
            latencies.append(time.perf_counter() - started.pop(fut))
            submit_next()
    return time.perf_counter() - t0, latencies


def run_pool(
    case: ModelCase,
    frames: list[bytes],
    repeats: int,
    runtime: str,
    precision: str,
    processes: int | None = None,
    threads: int | None = None,
    pullers: int | None = None,
    in_flight: int | None = None,
    ov_throughput: bool = False,
) -> Measurement:
    from inference_service.errors import InferenceError
    from inference_service.pool import DetectorFactory, DetectorPool
    from inference_service.settings import load_settings

    settings = load_settings(
        {
            "model": str(case.path),
            "runtime": runtime,
            "precision": precision,
            "cache_dir": str(OUT / "cache"),
            **_calibration(precision),
        }
    )
    factory: DetectorFactory | None = None
    if ov_throughput:  # OpenVINO's own parallelism: THROUGHPUT hint, one stream per thread
        from inference_service.detector import load_detector
        from inference_service.model.resolve import resolve_model

        streams = threads or 2
        factory = functools.partial(
            load_detector,
            resolve_model(settings),
            settings,
            streams,
            openvino_hint="THROUGHPUT",
            openvino_streams=streams,
        )
    pool = DetectorPool(
        settings,
        factory,
        processes=processes,
        threads=threads,
        pullers=pullers,
        in_flight_per_worker=in_flight,
    )
    m = Measurement(case.name, "pool", runtime, precision, pool.processes, pool.threads, 0)

    async def go() -> tuple[list[float], list[float]]:
        async with pool:
            m.in_flight = pool.processes * pool.in_flight_per_worker
            m.note = f"{pool.pullers} pullers/process"
            if ov_throughput:
                m.note += f", OpenVINO THROUGHPUT hint, {pool.threads} streams"
            await _closed_loop_async(pool, frames[: max(4, m.in_flight)], m.in_flight)
            walls, latencies = [], []
            for _ in range(repeats):
                wall, lat = await _closed_loop_async(pool, frames, m.in_flight)
                walls.append(wall)
                latencies.extend(lat)
            return walls, latencies

    try:
        walls, latencies = asyncio.run(go())
    except InferenceError as exc:
        m.error = str(exc).splitlines()[0][:200]
        return m
    _summarise(m, walls, latencies, len(frames))
    return m


async def _closed_loop_async(
    pool: Any, frames: list[bytes], concurrency: int
) -> tuple[float, list[float]]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(data: bytes) -> None:
        async with gate:
            t = time.perf_counter()
            await pool.detect(data)
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(f) for f in frames))
    return time.perf_counter() - t0, latencies


def _calibration(precision: str) -> dict[str, str]:
    """The calibration settings of an int8 run: the benchmark frames themselves."""
    if precision != "int8":
        return {}
    return {"calibration": str(OUT / "frames"), "calibration_frames": str(CALIBRATION_FRAMES)}


def command_frames(frames: int, count: int) -> Path:
    """A folder of ``count`` frame files cycling through the ``frames`` rendered ones (hard links)."""
    folder = OUT / f"frames-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        link = folder / f"frame_{i:05d}.jpg"
        if not link.exists():
            os.link(OUT / "frames" / f"frame_{i % frames:03d}.jpg", link)
    return folder


def run_detect_command(
    case: ModelCase, runtime: str, precision: str, folder: Path, repeats: int
) -> Measurement:
    """``inference-service detect`` on a folder, wall time from launch to exit (start-up included)."""
    m = Measurement(case.name, "detect command", runtime, precision, 0, 0, 0)
    exe = Path(sys.executable).with_name("inference-service")
    out = OUT / "detect.jsonl"
    cmd = [
        str(exe), "detect", str(folder), "--out", str(out),
        "--model", str(case.path), "--runtime", runtime, "--precision", precision,
        "--cache-dir", str(OUT / "cache"),
    ]  # fmt: skip
    for name, value in _calibration(precision).items():
        cmd += [f"--{name.replace('_', '-')}", value]
    walls: list[float] = []
    lines = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            m.error = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            return m
        rows = out.read_text().splitlines()
        lines = len(rows)
        if runtime == "auto" and rows:
            m.runtime = f"auto: {json.loads(rows[0])['model']['runtime'].split('/')[0]}"
    m.fps_repeats = [round(lines / w, 2) for w in walls]
    m.fps = statistics.median(lines / w for w in walls)
    m.note = (
        f"{lines} frames per run, median of {repeats} runs, wall time from launch to exit "
        "(process and model start-up included)"
    )
    return m


# --------------------------------------------------------------------------------------------
# Report


def _row(m: Measurement, case: ModelCase, ref_fps: float, gemm: float) -> str:
    if m.error:
        return (
            f"| {m.model} | {m.design} | {m.runtime} | {m.precision} | "
            f"{_shape(m)} | — | — | — | — | — | failed: {m.error} |"
        )
    achieved = m.fps * case.gflops
    ratio = f"{m.fps / ref_fps:.2f}×" if ref_fps else "—"
    lat = f"{m.p50_ms:.0f} | {m.p95_ms:.0f}" if m.p50_ms else "— | —"
    limit = f"{achieved / gemm:.0%}"
    if m.precision == "bf16":
        limit += f" ({achieved / BF16_PEAK_NOTES:.0%} of bf16)"
    return (
        f"| {m.model} | {m.design} | {m.runtime} | {m.precision} | {_shape(m)} | "
        f"{m.fps:.1f} | {lat} | {ratio} | {achieved:.0f} | {limit} | {m.note} |"
    )


def _shape(m: Measurement) -> str:
    if not m.processes:
        return "auto"
    return f"{m.processes}×{m.threads}, {m.in_flight} in flight"


def write_report(
    name: str,
    facts: dict[str, Any],
    gemm: float,
    cases: list[ModelCase],
    results: list[Measurement],
    frames: tuple[int, int],
    repeats: int,
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Detector benchmark ({name})",
        "",
        f"- command: `{facts['command']}`",
        f"- date: {facts['date']}",
        f"- CPU: {facts['cpu']}, {facts['cpus_available']} CPUs available, "
        f"flags {', '.join(facts['cpu_flags'])}",
        f"- frames: {frames[0]} distinct synthetic 1280x720 JPEGs, {frames[1]} per timed run; "
        f"medians of {repeats} runs; closed-loop client keeping each design's in-flight capacity "
        "busy",
        f"- compute limit: numpy fp32 GEMM measured now: {gemm:.0f} GFLOP/s; bf16 peak from the "
        f"notes: {BF16_PEAK_NOTES:.0f} GFLOP/s",
        "",
    ]
    for case in cases:
        lines.append(
            f"- {case.name}: `{case.path.relative_to(REPO_ROOT)}`, {case.gflops:.2f} GFLOPs/frame "
            f"at {case.input_hw[0]}x{case.input_hw[1]}; fp32 compute limit "
            f"{gemm / case.gflops:.0f} frames/s"
        )
    lines += [
        "",
        "| model | design | runtime | precision | processes×threads | frames/s | p50 ms | "
        "p95 ms | vs reference | GFLOP/s | of fp32 GEMM | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_name = {c.name: c for c in cases}
    for case in cases:
        ref = next(
            (r.fps for r in results if r.model == case.name and r.design == "reference"), 0.0
        )
        lines += [_row(m, by_name[m.model], ref, gemm) for m in results if m.model == case.name]
    lines += int8_floors(results)
    chart = RESULTS / f"{name}.png"
    if draw_chart(results, cases, chart, f"{facts['cpu']} ({', '.join(facts['cpu_flags'])})"):
        lines += ["", f"![frames/s per runtime and precision]({chart.name})"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    payload = {
        "machine": facts,
        "gemm_fp32_gflops": gemm,
        "bf16_peak_gflops_notes": BF16_PEAK_NOTES,
        "distinct_frames": frames[0],
        "frames_per_run": frames[1],
        "repeats": repeats,
        "models": [{**asdict(c), "path": str(c.path)} for c in cases],
        "results": [asdict(m) for m in results],
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    log_line(f"wrote {RESULTS / name}.md and .json")


def int8_floors(results: list[Measurement]) -> list[str]:
    """The int8 floors per model with ``detect command`` rows: int8 against the fastest fp32
    ``detect`` and against the original design, measured in this run."""
    lines: list[str] = []
    for model in dict.fromkeys(m.model for m in results):
        rows = [m for m in results if m.model == model and not m.error]
        detect = [m for m in rows if m.design == "detect command"]
        int8 = next((m for m in detect if m.precision == "int8"), None)
        fp32 = max((m for m in detect if m.precision == "fp32"), key=lambda m: m.fps, default=None)
        ref = next((m for m in rows if m.design == "reference"), None)
        if int8 is None or fp32 is None or ref is None:
            continue
        if not lines:
            lines += ["", "## int8 floors (whole `detect` command, same run)", "",
                      "| model | int8 frames/s | vs fastest fp32 detect | floor | vs reference | "
                      "floor |", "|---|---|---|---|---|---|"]  # fmt: skip
        a, b = int8.fps / fp32.fps, int8.fps / ref.fps
        fa, fb = INT8_FLOORS["vs_fastest_fp32_detect"], INT8_FLOORS["vs_reference"]
        lines.append(
            f"| {model} | {int8.fps:.1f} | {a:.2f}× ({fp32.runtime}, {fp32.fps:.1f}) | "
            f"≥ {fa}×: {'met' if a >= fa else 'NOT met'} | {b:.2f}× ({ref.fps:.1f}) | "
            f"≥ {fb}×: {'met' if b >= fb else 'NOT met'} |"
        )
    return lines


def draw_chart(results: list[Measurement], cases: list[ModelCase], path: Path, cpu: str) -> bool:
    """Frames/s per runtime and precision, one bar group per model, bars labelled with their
    ratio to the original design; False (no chart) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log_line("matplotlib is not installed: no chart")
        return False
    series = list(
        dict.fromkeys(
            (m.design, m.runtime.split(":")[0] if m.design != "reference" else m.runtime,
             m.precision)
            for m in results if not m.error
        )
    )  # fmt: skip
    models = [c.name for c in cases]
    fig, axes = plt.subplots(
        1,
        len(models),
        figsize=(max(7.6, 4.8 * len(models)), 5.4),
        squeeze=False,
        layout="constrained",
    )
    colours = {"fp32": "#4c72b0", "bf16": "#dd8452", "int8": "#55a868"}
    for ax, model in zip(axes[0], models, strict=True):
        rows = {(m.design, m.runtime.split(":")[0] if m.design != "reference" else m.runtime,
                 m.precision): m for m in results if m.model == model and not m.error}  # fmt: skip
        ref = next((m.fps for k, m in rows.items() if k[0] == "reference"), 0.0)
        labels, values, fill = [], [], []
        for key in series:
            if key not in rows:
                continue
            design, runtime, precision = key
            short = {"reference": "original design", "pool": "pool", "detect command": "detect"}
            labels.append(
                "original design" if design == "reference"
                else f"{short[design]} {runtime} {precision}"
            )  # fmt: skip
            values.append(rows[key].fps)
            fill.append("#999999" if design == "reference" else colours.get(precision, "#8172b3"))
        y = list(range(len(values)))
        bars = ax.barh(y, values, color=fill)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        if ref:
            ax.axvline(ref, color="#555555", linestyle="--", linewidth=1)
            for bar, value in zip(bars, values, strict=True):
                ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                        f" {value:.0f} ({value / ref:.2f}×)", va="center", fontsize=7)  # fmt: skip
        ax.set_xlim(0, max(values, default=1) * 1.3)
        ax.set_title(model)
        ax.set_xlabel("frames/s (1280x720 JPEGs)")
    fig.suptitle(
        f"Detector throughput against the original design (dashed line)\n{cpu}", fontsize=9
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log_line(f"wrote {path}")
    return True


# --------------------------------------------------------------------------------------------
# Plans


RUNTIMES: tuple[tuple[str, str], ...] = (
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("ncnn", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
)
"""ONNX Runtime and ncnn have no bf16 or int8 path here (refused with a ConfigError)."""


def main_plan(
    cases: list[ModelCase],
    frames: list[bytes],
    repeats: int,
    command_folder: Path | None,
    command_models: tuple[str, ...] = ("yolov8n",),
) -> Iterator[Measurement]:
    for case in cases:
        log_line(f"{case.name}: reference (ultralytics, ProcessPoolExecutor × 2) ...")
        yield run_reference(case, frames, repeats)
        for runtime, precision in RUNTIMES:
            log_line(f"{case.name}: pool {runtime}/{precision} ...")
            yield run_pool(case, frames, repeats, runtime, precision)
        if command_folder is not None and case.name in command_models:
            for precision in ("fp32", "bf16", "int8"):
                log_line(f"{case.name}: detect command (runtime auto, {precision}) ...")
                yield run_detect_command(case, "auto", precision, command_folder, repeats)


SWEEP: tuple[tuple[int, int, int, int, bool], ...] = (
    # processes, inference threads, pullers per process, in flight per process, OV THROUGHPUT
    (1, 2, 2, 3, False),
    (1, 2, 4, 6, False),
    (1, 2, 4, 6, True),
    (2, 1, 1, 2, False),
    (2, 1, 2, 3, False),
    (2, 1, 3, 4, False),
    (2, 2, 2, 3, False),
    (4, 1, 1, 2, False),
)


def sweep_plan(cases: list[ModelCase], frames: list[bytes], repeats: int) -> Iterator[Measurement]:
    for case in cases:
        for runtime, precision in RUNTIMES:
            for p, t, pullers, in_flight, tp in SWEEP:
                if tp and runtime != "openvino":
                    continue
                log_line(f"{case.name}: {runtime}/{precision} {p}×{t}, {pullers} pullers ...")
                yield run_pool(
                    case, frames, repeats, runtime, precision, p, t, pullers, in_flight, tp
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer frames and repeats, no yolov8s")
    parser.add_argument("--sweep", action="store_true", help="processes × threads grid (yolov8n)")
    parser.add_argument("--frames", type=int, default=None, help="distinct frames rendered")
    parser.add_argument(
        "--run-frames",
        type=int,
        default=None,
        help="frames per timed run (cycling the distinct ones)",
    )
    parser.add_argument(
        "--command-frames", type=int, default=None, help="frames given to each detect command run"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--models", default=None, help="comma-separated: test,yolov8n,yolov8s")
    parser.add_argument("--report", default=None, help="report name (default: detector / sweep)")
    args = parser.parse_args(argv)
    os.environ.update(ultralytics_env())  # for every helper process spawned from here
    frames_n = args.frames or (24 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 3)
    facts = machine_facts()
    t_start = time.monotonic()
    log_line(f"{facts['cpu']}, {facts['cpus_available']} CPUs; measuring fp32 GEMM ...")
    gemm = gemm_gflops(2048 if args.quick else 4096, 3 if args.quick else 5)
    log_line(f"numpy fp32 GEMM: {gemm:.0f} GFLOP/s")
    distinct = render_frames(frames_n)
    run_n = args.run_frames or (48 if args.quick else 256)
    frames = [distinct[i % len(distinct)] for i in range(max(run_n, len(distinct)))]
    command_n = args.command_frames or (96 if args.quick else 960)
    default_models = (
        "yolov8n" if args.sweep else ("test,yolov8n" if args.quick else "test,yolov8n,yolov8s")
    )
    cases = prepare_models((args.models or default_models).split(","))
    results: list[Measurement] = []
    plan = (
        sweep_plan(cases, frames, repeats)
        if args.sweep
        else main_plan(cases, frames, repeats, command_frames(frames_n, command_n))
    )
    for m in plan:
        results.append(m)
        if m.error:
            log_line(f"  failed: {m.error}")
        else:
            log_line(f"  {m.fps:.1f} frames/s, p50 {m.p50_ms:.0f} ms, p95 {m.p95_ms:.0f} ms")
    write_report(
        args.report or ("sweep" if args.sweep else "detector"),
        facts,
        gemm,
        cases,
        results,
        (frames_n, len(frames)),
        repeats,
    )
    log_line(f"done in {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
