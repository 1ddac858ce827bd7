"""Open the backend a runtime setting names, or pick the fastest by measurement (``auto``).

The ``auto`` rule:

1. ``bf16`` or ``int8`` precision means OpenVINO: it is the only backend here with a bf16 path
   or an int8 model. ``auto`` chooses a runtime, never a precision: lower precision is the
   operator's choice (``INFERENCE_PRECISION``).
2. Otherwise every CPU runtime the model can run on (OpenVINO; ONNX Runtime with an ONNX file;
   ncnn with an ncnn conversion) is opened with the same thread count and timed on the same input
   (``probe_hw``, batch 1, letterboxed ``uint8`` frames as the detector sends them, decode of the
   head included): 2 warm-up runs, then the median of 7 runs each. The fastest wins; OpenVINO is
   kept unless another is more than 3 % faster.
3. The choice is cached in ``<cache_dir>/runtime-choice.json`` under the key
   ``CPU model | CPU features | model sha256 | precision | threads | input shape | runtimes
   measured``, so that later starts (and the other worker processes, which wait on a lock file
   while the first one measures) skip the measurement. Delete the file to measure again. The CPU
   features (:func:`cpu_features`: AVX2, AVX-512, VNNI, bf16, AMX) are in the key because the
   model name alone is the same generic one on CPUs of different classes (``AMD EPYC`` on Zen 3
   and Zen 4 virtual machines, ``Intel Xeon Processor`` on several generations). A cache
   directory that cannot be written (a read-only root filesystem, an image's own cache) is read
   but not written: a choice it already holds is used, otherwise the runtimes are measured at
   each start and a warning says so once per process.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from inference_service.errors import ConfigError, ModelError
from inference_service.runtime.base import InferenceBackend, ModelFiles
from inference_service.settings import env_name
from inference_service.vision.letterbox import PAD_VALUE

log = logging.getLogger(__name__)

CHOICE_FILE = "runtime-choice.json"
TIE_MARGIN = 0.03
"""OpenVINO is kept unless another runtime is more than this fraction faster."""
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
    score_floor: float | None = None,
) -> InferenceBackend:
    """A loaded backend for ``model``.

    ``runtime``: ``openvino``, ``onnxruntime``, ``ncnn``, ``onnxruntime-cuda``, ``openvino-gpu`` or
    ``auto`` (see the module docstring). ``score_floor``: the confidence threshold, which lets
    ncnn skip decoding boxes that cannot pass it. Raises :class:`ConfigError` for a runtime or
    precision that cannot run here.
    """
    if runtime == "auto":
        if precision in ("bf16", "int8"):
            return _openvino(
                model, precision, threads, openvino_hint, openvino_streams, "CPU", cache_dir
            )
        candidates: dict[str, Callable[[], InferenceBackend]] = {
            "openvino": lambda: _openvino(
                model, "fp32", threads, openvino_hint, openvino_streams, "CPU", cache_dir
            ),
        }
        if model.onnx is not None:
            candidates["onnxruntime"] = lambda: _onnxruntime(model, "fp32", threads, cuda=False)
        if model.ncnn_dir is not None and importlib.util.find_spec("ncnn") is not None:
            candidates["ncnn"] = lambda: _ncnn(model, "fp32", threads, score_floor)
        return _auto(model, threads, cache_dir, probe_hw, candidates)
    if runtime in ("openvino", "openvino-gpu"):
        device = "GPU" if runtime == "openvino-gpu" else "CPU"
        return _openvino(
            model, precision, threads, openvino_hint, openvino_streams, device, cache_dir
        )
    if runtime in ("onnxruntime", "onnxruntime-cuda"):
        return _onnxruntime(model, precision, threads, cuda=runtime == "onnxruntime-cuda")
    if runtime == "ncnn":
        return _ncnn(model, precision, threads, score_floor)
    raise ConfigError(
        f"{env_name('runtime')}={runtime}: expected auto, openvino, onnxruntime, ncnn, "
        "onnxruntime-cuda or openvino-gpu"
    )


def _ncnn(
    model: ModelFiles, precision: str, threads: int, score_floor: float | None
) -> InferenceBackend:
    from inference_service.runtime.ncnn_backend import NcnnBackend

    if model.ncnn_dir is None:
        raise ConfigError(
            f"{env_name('runtime')}=ncnn needs the model's ncnn conversion, made from its ONNX "
            "file when pnnx is installed: pip install 'kafka-yolo-detector[export]' "
            "(then restart), "
            f"or use {env_name('runtime')}=openvino"
        )
    return NcnnBackend(
        model.ncnn_dir, precision=precision, threads=threads, score_floor=score_floor
    )


def _openvino(
    model: ModelFiles,
    precision: str,
    threads: int,
    hint: str,
    streams: int | None,
    device: str,
    cache_dir: Path | None = None,
) -> InferenceBackend:
    """OpenVINO on ``model``; ``cache_dir``: the service's cache directory, where OpenVINO keeps
    its compiled models (in ``openvino-compiled/``) when it can write there."""
    from inference_service.runtime.openvino_backend import OpenVinoBackend

    path = model.openvino_int8_xml if precision == "int8" else model.openvino_xml or model.onnx
    if path is None and precision == "int8":
        raise ConfigError(
            f"{env_name('precision')}=int8 needs the model's int8 IR, which the service makes "
            f"when it resolves the model with {env_name('calibration')} set"
        )
    if path is None:
        raise ModelError("OpenVINO needs an OpenVINO IR or an ONNX file; the model has neither")
    return OpenVinoBackend(
        path,
        precision=precision,
        threads=threads,
        hint=hint,
        streams=streams,
        device=device,
        cache_dir=cache_dir,
    )


def _onnxruntime(
    model: ModelFiles, precision: str, threads: int, *, cuda: bool
) -> InferenceBackend:
    from inference_service.runtime.onnxruntime_backend import OnnxRuntimeBackend

    if model.onnx is None:
        raise ConfigError(
            f"{env_name('runtime')}=onnxruntime needs an ONNX model; this model is OpenVINO IR "
            f"only (use {env_name('runtime')}=openvino)"
        )
    return OnnxRuntimeBackend(model.onnx, precision=precision, threads=threads, cuda=cuda)


def _auto(
    model: ModelFiles,
    threads: int,
    cache_dir: Path | None,
    probe_hw: tuple[int, int],
    candidates: dict[str, Callable[[], InferenceBackend]],
) -> InferenceBackend:
    if len(candidates) == 1:
        return candidates["openvino"]()
    shape = "x".join(map(str, probe_hw))
    names = "+".join(sorted(candidates))
    key = "|".join((cpu_model(), cpu_features(), model.sha256, "fp32", str(threads), shape, names))
    with _choice_lock(cache_dir) as writable:
        cached = _read_choice(cache_dir, key)
        if cached in candidates:
            log.info("runtime auto: %s (measured before, key %s)", cached, key)
            return candidates[cached]()
        probe = np.full((1, *probe_hw, 3), PAD_VALUE, dtype=np.uint8)
        probe[:, ::7, ::5] = 30  # some structure, so that the head's decode has work to do
        timings: dict[str, float] = {}
        opened: dict[str, InferenceBackend] = {}
        for name, open_one in candidates.items():
            opened[name] = open_one()
            timings[name] = measure_ms(opened[name], probe)
        best = min(timings, key=lambda n: timings[n])
        if timings[best] >= timings["openvino"] * (1.0 - TIE_MARGIN):
            best = "openvino"
        log.info(
            "runtime auto: %s (median ms per %s input: %s)",
            best,
            shape,
            ", ".join(f"{n} {ms:.2f}" for n, ms in timings.items()),
        )
        if writable:
            _write_choice(cache_dir, key, best, timings)
    for name, backend in opened.items():
        if name != best:
            backend.close()
    return opened[best]


def measure_ms(backend: InferenceBackend, probe: np.ndarray) -> float:
    """Median milliseconds of one ``backend.infer_images(probe)`` after a warm-up."""
    for _ in range(_WARMUP_RUNS):
        backend.infer_images(probe)
    times = []
    for _ in range(_TIMED_RUNS):
        start = time.perf_counter()
        backend.infer_images(probe)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


INSTRUCTION_SETS = (
    "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
)  # fmt: skip
"""The CPU features (``/proc/cpuinfo`` flag names) that change which runtime and precision is
fastest: wide vectors, int8 dot products (VNNI), native bf16 and the AMX tile units."""


def cpu_features(flags: str | None = None) -> str:
    """The :data:`INSTRUCTION_SETS` the CPU has, ``+``-joined in that order (``none`` when it has
    none of them or the flags cannot be read). ``flags``: a ``/proc/cpuinfo`` flags line (read
    from the machine when None)."""
    if flags is None:
        flags = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = line.split(":", 1)[-1]
                    break
    have = set(flags.split())
    return "+".join(f for f in INSTRUCTION_SETS if f in have) or "none"


@contextlib.contextmanager
def _choice_lock(cache_dir: Path | None) -> Iterator[bool]:
    """Hold the choice file's lock; yields whether the choice may be written.

    A cache directory that cannot be created or locked (a read-only root filesystem, an image's
    own cache) is read but not written: the choice is measured at every start, logged once.
    """
    if cache_dir is None:
        yield False
        return
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        handle = (cache_dir / (CHOICE_FILE + ".lock")).open("a")
    except OSError as exc:
        _warn_read_only(cache_dir, exc)
        yield False
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_warned_read_only: set[Path] = set()


def _warn_read_only(cache_dir: Path, exc: OSError) -> None:
    if cache_dir in _warned_read_only:
        return
    _warned_read_only.add(cache_dir)
    log.warning(
        "runtime auto: cannot write the choice to %s (%s): measuring at every start; point %s "
        "at a writable directory, or set %s to a runtime, to skip the measurement",
        cache_dir,
        exc.strerror or exc,
        env_name("cache_dir"),
        env_name("runtime"),
    )


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
    try:
        tmp.write_text(json.dumps(entries, indent=2, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        _warn_read_only(cache_dir, exc)
