"""Open the backend a runtime setting names, or pick the faster one by measurement (``auto``).

The ``auto`` rule:

1. ``bf16`` precision means OpenVINO: it is the only backend here with a bf16 path.
2. Otherwise both OpenVINO and ONNX Runtime (CPU) are opened with the same thread count and timed
   on the same input (``probe_hw``, batch 1): 2 warm-up runs, then the median of 7 runs each. The
   faster wins; OpenVINO wins ties within 3 %.
3. The choice is cached in ``<cache_dir>/runtime-choice.json`` under the key
   ``CPU model | model sha256 | precision | threads | input shape``, so that later starts (and the
   other worker processes, which wait on a lock file while the first one measures) skip the
   measurement. Delete the file to measure again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from inference_service.errors import ConfigError, ModelError
from inference_service.runtime.base import InferenceBackend, ModelFiles

log = logging.getLogger(__name__)

CHOICE_FILE = "runtime-choice.json"
TIE_MARGIN = 0.03
"""OpenVINO is kept unless ONNX Runtime is more than this fraction faster."""
_WARMUP_RUNS = 2
_TIMED_RUNS = 7


def open_backend(
    model: ModelFiles,
    runtime: str,
    precision: str,
    threads: int,
    *,
    cache_dir: Path | None = None,
    probe_hw: tuple[int, int] = (384, 640),
    openvino_hint: str = "LATENCY",
    openvino_streams: int | None = None,
) -> InferenceBackend:
    """A loaded backend for ``model``.

    ``runtime``: ``openvino``, ``onnxruntime``, ``onnxruntime-cuda``, ``openvino-gpu`` or ``auto``
    (see the module docstring). Raises :class:`ConfigError` for a runtime or precision that cannot
    run here.
    """
    if runtime == "auto":
        if precision == "bf16":
            return _openvino(model, precision, threads, openvino_hint, openvino_streams, "CPU")
        return _auto(model, threads, cache_dir, probe_hw, openvino_hint, openvino_streams)
    if runtime in ("openvino", "openvino-gpu"):
        device = "GPU" if runtime == "openvino-gpu" else "CPU"
        return _openvino(model, precision, threads, openvino_hint, openvino_streams, device)
    if runtime in ("onnxruntime", "onnxruntime-cuda"):
        return _onnxruntime(model, precision, threads, cuda=runtime == "onnxruntime-cuda")
    raise ConfigError(
        f"INFERENCE_RUNTIME={runtime}: expected auto, openvino, onnxruntime, "
        "onnxruntime-cuda or openvino-gpu"
    )


def _openvino(
    model: ModelFiles,
    precision: str,
    threads: int,
    hint: str,
    streams: int | None,
    device: str,
) -> InferenceBackend:
    from inference_service.runtime.openvino_backend import OpenVinoBackend

    path = model.openvino_xml or model.onnx
    if path is None:
        raise ModelError("OpenVINO needs an OpenVINO IR or an ONNX file; the model has neither")
    return OpenVinoBackend(
        path, precision=precision, threads=threads, hint=hint, streams=streams, device=device
    )


def _onnxruntime(
    model: ModelFiles, precision: str, threads: int, *, cuda: bool
) -> InferenceBackend:
    from inference_service.runtime.onnxruntime_backend import OnnxRuntimeBackend

    if model.onnx is None:
        raise ConfigError(
            "INFERENCE_RUNTIME=onnxruntime needs an ONNX model; this model is OpenVINO IR only "
            "(use INFERENCE_RUNTIME=openvino)"
        )
    return OnnxRuntimeBackend(model.onnx, precision=precision, threads=threads, cuda=cuda)


def _auto(
    model: ModelFiles,
    threads: int,
    cache_dir: Path | None,
    probe_hw: tuple[int, int],
    hint: str,
    streams: int | None,
) -> InferenceBackend:
    if model.onnx is None:
        return _openvino(model, "fp32", threads, hint, streams, "CPU")
    key = "|".join((cpu_model(), model.sha256, "fp32", str(threads), "x".join(map(str, probe_hw))))
    with _choice_lock(cache_dir):
        cached = _read_choice(cache_dir, key)
        if cached in ("openvino", "onnxruntime"):
            log.info("runtime auto: %s (measured before, key %s)", cached, key)
            if cached == "openvino":
                return _openvino(model, "fp32", threads, hint, streams, "CPU")
            return _onnxruntime(model, "fp32", threads, cuda=False)
        openvino = _openvino(model, "fp32", threads, hint, streams, "CPU")
        onnxruntime = _onnxruntime(model, "fp32", threads, cuda=False)
        probe = np.random.default_rng(0).random((1, 3, *probe_hw), dtype=np.float32)
        ov_ms = measure_ms(openvino, probe)
        ort_ms = measure_ms(onnxruntime, probe)
        use_ort = ort_ms < ov_ms * (1.0 - TIE_MARGIN)
        choice = "onnxruntime" if use_ort else "openvino"
        log.info(
            "runtime auto: %s (median ms per %s input: openvino %.2f, onnxruntime %.2f)",
            choice,
            "x".join(map(str, probe_hw)),
            ov_ms,
            ort_ms,
        )
        _write_choice(cache_dir, key, choice, {"openvino": ov_ms, "onnxruntime": ort_ms})
    loser = openvino if use_ort else onnxruntime
    loser.close()
    return onnxruntime if use_ort else openvino


def measure_ms(backend: InferenceBackend, probe: np.ndarray) -> float:
    """Median milliseconds of one ``backend.infer(probe)`` after a warm-up."""
    for _ in range(_WARMUP_RUNS):
        backend.infer(probe)
    times = []
    for _ in range(_TIMED_RUNS):
        start = time.perf_counter()
        backend.infer(probe)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _choice_lock(cache_dir: Path | None) -> Iterator[None]:
    if cache_dir is None:
        yield
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / (CHOICE_FILE + ".lock")).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_choice(cache_dir: Path | None, key: str) -> str | None:
    if cache_dir is None:
        return None
    try:
        entries = json.loads((cache_dir / CHOICE_FILE).read_text())
    except (OSError, ValueError):
        return None
    entry = entries.get(key) if isinstance(entries, dict) else None
    choice = entry.get("runtime") if isinstance(entry, dict) else None
    return choice if isinstance(choice, str) else None


def _write_choice(
    cache_dir: Path | None, key: str, choice: str, timings_ms: dict[str, float]
) -> None:
    if cache_dir is None:
        return
    path = cache_dir / CHOICE_FILE
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = {"runtime": choice, "median_ms": timings_ms}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True))
    tmp.replace(path)
