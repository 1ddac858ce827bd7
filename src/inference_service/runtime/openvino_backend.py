"""OpenVINO backend (CPU, or GPU where asked for and present), fp32, bf16 or int8.

The model is read once; for each input shape a copy reshaped to that static shape is compiled and
cached (static shapes run faster than a dynamic-shape compilation on the CPU plugin), with a small
pool of infer requests per shape so that several threads infer at once. ``infer`` releases the
GIL while the network runs. ``infer_images`` takes letterboxed BGR ``uint8`` frames; in fp32 it lets
OpenVINO's pre-processing (u8 → f32, BGR → RGB, ÷255, NHWC → NCHW) run inside the compiled
network: outputs identical to ``infer`` on the converted tensor, and cheaper than converting in
numpy.

Configuration as compiled: ``INFERENCE_PRECISION_HINT`` set explicitly (``f32`` for fp32: on a CPU
with native bf16 OpenVINO would otherwise pick bf16 itself; ``bf16`` for bf16, with the YOLOv8 stem
kept in f32 as :mod:`~inference_service.runtime.mixed_precision` explains; ``f32`` for int8 too:
the quantized IR's ``FakeQuantize`` nodes make the CPU plugin run those layers as int8 kernels, and
what stays float, the Detect head's decode above all, stays f32, not bf16),
``INFERENCE_NUM_THREADS`` = ``threads``, ``PERFORMANCE_HINT`` (``LATENCY`` by default, one stream;
``THROUGHPUT`` lets ``streams`` requests run in parallel), and CPU pinning off by default so that
several single-threaded worker processes are not pinned onto the same core.

Compiled models are cached (OpenVINO's ``CACHE_DIR`` property) in ``<cache_dir>/openvino-compiled/``
when the backend is given the service's cache directory and can write there: OpenVINO keys each
blob on the model, the input shape and the configuration above, and a later start (every worker
process, every ``detect`` run) imports the blob instead of compiling again; an int8 graph above
all, whose compilation is the slowest. A cache directory that cannot be written (a read-only root
filesystem) runs without it: the model is compiled at each start, as without a cache directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference_service.errors import ConfigError, ModelError
from inference_service.runtime.base import Batch, HeadOutput, Images, to_batch
from inference_service.runtime.mixed_precision import STEM_F32, keep_f32
from inference_service.runtime.openvino_import import import_openvino
from inference_service.settings import env_name

log = logging.getLogger(__name__)

MAX_SHAPES = 32
"""Most input shapes kept compiled at once (least recently used dropped first)."""

_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
"""``INFERENCE_PRECISION_HINT`` per precision (int8: the float parts of a quantized model)."""
COMPILED_CACHE = "openvino-compiled"
"""The folder of OpenVINO's compiled-model blobs inside the service's cache directory."""


@dataclass(slots=True)
class _Compiled:
    """A model compiled for one input shape and its idle infer requests."""

    model: Any
    limit: int
    idle: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    created: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self) -> Any:
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            pass
        with self.lock:
            if self.created < self.limit:
                self.created += 1
                return self.model.create_infer_request()
        return self.idle.get()

    def release(self, request: Any) -> None:
        self.idle.put(request)


class OpenVinoBackend:
    """An OpenVINO model compiled per input shape, thread-safe."""

    def __init__(
        self,
        model_path: Path,
        *,
        precision: str = "fp32",
        threads: int = 1,
        hint: str = "LATENCY",
        streams: int | None = None,
        device: str = "CPU",
        pinning: bool = False,
        max_requests: int = 8,
        f32_layers: re.Pattern[str] | None = STEM_F32,
        cache_dir: Path | None = None,
    ) -> None:
        if precision not in _PRECISION_HINTS:
            raise ConfigError(f"{env_name('precision')}={precision}: expected fp32, bf16 or int8")
        hint = hint.upper()
        if hint not in ("LATENCY", "THROUGHPUT"):
            raise ConfigError(f"OpenVINO performance hint {hint!r}: expected LATENCY or THROUGHPUT")
        ov = import_openvino()

        self._core = ov.Core()
        if device not in self._core.available_devices:
            raise ConfigError(
                f"OpenVINO device {device} is not present "
                f"(available: {', '.join(self._core.available_devices)})"
            )
        if precision == "bf16" and device == "CPU":
            capabilities = self._core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            if "BF16" not in capabilities:
                raise ConfigError(
                    f"{env_name('precision')}=bf16: this CPU has no native bf16 "
                    f"(capabilities: {', '.join(capabilities)}); use fp32"
                )
        if precision == "int8" and not is_quantized(model_path):
            raise ConfigError(
                f"{env_name('precision')}=int8: {model_path} is not quantized (no FakeQuantize "
                f"layer); let the service quantize it on {env_name('calibration')}'s frames"
            )
        self._weights: Any = None
        try:
            self._model = self._read(model_path, precision, f32_layers)
        except Exception as exc:  # OpenVINO raises untyped RuntimeErrors for bad files
            raise ModelError(f"OpenVINO cannot read {model_path}: {exc}") from exc
        self._config: dict[str, Any] = {
            "PERFORMANCE_HINT": hint,
            "INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision],
        }
        if device == "CPU":
            self._config["INFERENCE_NUM_THREADS"] = max(1, threads)
            self._config["ENABLE_CPU_PINNING"] = pinning
        if streams is not None:
            self._config["NUM_STREAMS"] = streams
        blobs = compiled_cache_dir(cache_dir) if cache_dir is not None else None
        if blobs is not None:
            self._config["CACHE_DIR"] = str(blobs)
        self._device = device
        self._precision = precision
        self._name = "openvino" if device == "CPU" else f"openvino-{device.lower()}"
        self._max_requests = max(1, max_requests)
        self._compiled: OrderedDict[tuple[bool, int, int, int, int], _Compiled] = OrderedDict()
        self._lock = threading.Lock()
        log.info(
            "OpenVINO %s read %s for %s (%s)",
            ov.get_version(),
            model_path,
            device,
            ", ".join(f"{k}={v}" for k, v in self._config.items()),
        )

    def _read(self, model_path: Path, precision: str, f32_layers: re.Pattern[str] | None) -> Any:
        """The model as OpenVINO reads it; in bf16, IR layers named by ``f32_layers`` stay f32."""
        if precision != "bf16" or f32_layers is None:
            return self._core.read_model(str(model_path))
        ov = import_openvino()

        if model_path.suffix == ".xml":
            xml_text = model_path.read_text(encoding="utf-8")
            self._weights = np.fromfile(model_path.with_suffix(".bin"), dtype=np.uint8)
        else:  # ONNX: through OpenVINO's own IR, whose text can carry the marks
            with tempfile.TemporaryDirectory(prefix="inference-service-ir-") as tmp:
                ir = Path(tmp) / "model.xml"
                ov.save_model(self._core.read_model(str(model_path)), ir, compress_to_fp16=False)
                xml_text = ir.read_text(encoding="utf-8")
                self._weights = np.fromfile(ir.with_suffix(".bin"), dtype=np.uint8)
        text, marked = keep_f32(xml_text, f32_layers)
        if marked:
            log.info("bf16: %d layers (%s) stay in f32", marked, f32_layers.pattern)
        else:
            log.warning(
                "bf16: no layer of %s matches %s (the stem of an ultralytics YOLOv8 export); the "
                "whole network runs in bf16 (further from the reference)",
                model_path,
                f32_layers.pattern,
            )
        # The weights tensor wraps self._weights: it is kept for the model's lifetime.
        return self._core.read_model(text, ov.Tensor(self._weights))

    @property
    def name(self) -> str:
        return self._name

    @property
    def precision(self) -> str:
        return self._precision

    def infer(self, batch: Batch) -> HeadOutput:
        n, c, h, w = (int(d) for d in batch.shape)
        return self._run(self._for_shape((n, c, h, w), images=False), batch)

    def infer_images(self, images: Images) -> HeadOutput:
        if self._precision == "bf16":
            # In bf16 OpenVINO runs the in-network pixel conversion in bf16 (the stem's f32 mark
            # cannot reach the nodes it adds): 8 of 912 test detections outside SPEC.md's bf16
            # tolerance against 2 with the conversion in f32 numpy.
            return self.infer(to_batch(images))
        n, h, w, c = (int(d) for d in images.shape)
        return self._run(self._for_shape((n, c, h, w), images=True), images)

    @staticmethod
    def _run(compiled: _Compiled, data: Any) -> HeadOutput:
        request = compiled.acquire()
        try:
            request.infer({0: data}, share_inputs=True)
            return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        finally:
            compiled.release(request)

    def _for_shape(self, shape: tuple[int, int, int, int], *, images: bool) -> _Compiled:
        key = (images, *shape)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
            compiled = self._compile(shape, images)
            self._compiled[key] = compiled
            while len(self._compiled) > MAX_SHAPES:
                self._compiled.popitem(last=False)
            return compiled

    def _compile(self, shape: tuple[int, int, int, int], images: bool) -> _Compiled:
        ov = import_openvino()
        from openvino.preprocess import ColorFormat, PrePostProcessor

        model = self._model.clone()
        model.reshape({model.input(0).any_name: list(shape)})
        if images:
            ppp = PrePostProcessor(model)
            tensor = ppp.input().tensor()
            tensor.set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
            tensor.set_color_format(ColorFormat.BGR)
            ppp.input().preprocess().convert_element_type(ov.Type.f32).convert_color(
                ColorFormat.RGB
            ).scale(255.0)
            ppp.input().model().set_layout(ov.Layout("NCHW"))
            model = ppp.build()
        started = time.perf_counter()
        try:
            compiled = self._core.compile_model(model, self._device, self._config)
        except RuntimeError as exc:
            if "CACHE_DIR" not in self._config:
                raise
            # A blob that cannot be written or read back must not stop the service.
            log.warning("OpenVINO compiled-model cache %s: %s", self._config["CACHE_DIR"], exc)
            del self._config["CACHE_DIR"]
            compiled = self._core.compile_model(model, self._device, self._config)
        optimal = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        limit = max(optimal, self._max_requests)
        cached = False
        if "CACHE_DIR" in self._config:
            with contextlib.suppress(RuntimeError):  # a device that does not report it
                cached = bool(compiled.get_property("LOADED_FROM_CACHE"))
        log.info(
            "OpenVINO %s input shape %s%s in %.0f ms (%d requests at most)",
            "loaded the compiled" if cached else "compiled",
            shape,
            " from BGR uint8 frames" if images else "",
            (time.perf_counter() - started) * 1e3,
            limit,
        )
        return _Compiled(model=compiled, limit=limit)

    def executed_precisions(self) -> list[tuple[str, str, str]]:
        """``(layer type, original layer names, precision)`` of every node OpenVINO executes for
        the most recently compiled input shape (empty before the first inference)."""
        with self._lock:
            if not self._compiled:
                return []
            compiled = next(reversed(self._compiled.values())).model
        out = []
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            out.append(
                (
                    str(info["layerType"].astype(str)),
                    str(info["originalLayersNames"].astype(str)),
                    str(info["runtimePrecision"].astype(str)),
                )
            )
        return out

    def close(self) -> None:
        with self._lock:
            self._compiled.clear()


def compiled_cache_dir(cache_dir: Path) -> Path | None:
    """``<cache_dir>/openvino-compiled``, made if needed, when it can be written; else None (and
    a debug log: a read-only cache directory runs without OpenVINO's compiled-model cache)."""
    blobs = cache_dir.expanduser() / COMPILED_CACHE
    try:
        blobs.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=blobs)
        os.close(fd)
        Path(probe).unlink()
    except OSError as exc:
        log.debug("OpenVINO compiled-model cache off: %s is not writable (%s)", blobs, exc)
        return None
    return blobs


def is_quantized(model_path: Path) -> bool:
    """True when an OpenVINO IR ``.xml`` carries quantization (``FakeQuantize`` layers); False for
    an ONNX file (int8 runs a quantized IR) and for a file that cannot be read."""
    if model_path.suffix != ".xml":
        return False
    try:
        with model_path.open("r", encoding="utf-8", errors="replace") as handle:
            return any('type="FakeQuantize"' in line for line in handle)
    except OSError:
        return False
