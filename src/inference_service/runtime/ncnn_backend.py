"""ncnn backend (CPU, fp32): the network up to the Detect head's last convolutions, then numpy.

The ncnn model (made by :func:`inference_service.model.export.onnx_to_ncnn`) is purely
convolutional, so one file serves every input height and width; its outputs ``out0…`` are each
level's box and class logits, which :func:`~inference_service.runtime.yolo_head.decode_levels`
turns into the exported network's output (equal to OpenVINO's up to float rounding).

One ``ncnn.Net`` per process, an extractor per call (ncnn's nets are safe to extract from
concurrently), one extraction at a time: ncnn runs a call on the calling thread (plus its own
``threads``), so two pullers of a worker inferring at once would share one core and thrash its
cache; OpenVINO's single-stream requests serialise the same way by themselves. The other puller
meanwhile decodes and letterboxes the next frame.

``precision`` must be ``fp32``: bf16 is OpenVINO's (a :class:`ConfigError` says so).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from inference_service.errors import ConfigError, ModelError
from inference_service.model.export import NCNN_BIN, NCNN_PARAM
from inference_service.runtime.base import Batch, HeadOutput, Images
from inference_service.runtime.yolo_head import decode_levels
from inference_service.settings import env_name

log = logging.getLogger(__name__)

_SCALE = 1.0 / 255.0


class NcnnBackend:
    """An ncnn network of a YOLOv8 head's raw outputs; ``infer`` is thread-safe."""

    def __init__(
        self,
        model_dir: Path,
        *,
        precision: str = "fp32",
        threads: int = 1,
        score_floor: float | None = None,
    ) -> None:
        if precision != "fp32":
            raise ConfigError(
                f"{env_name('precision')}={precision} is not supported by ncnn here; use "
                f"{env_name('runtime')}=openvino for bf16, or {env_name('precision')}=fp32"
            )
        import ncnn

        self._ncnn: Any = ncnn
        net = ncnn.Net()
        net.opt.num_threads = max(1, threads)
        net.opt.use_fp16_packed = False
        net.opt.use_fp16_storage = False
        net.opt.use_fp16_arithmetic = False
        net.opt.use_bf16_storage = False
        net.opt.use_vulkan_compute = False
        param, weights = model_dir / NCNN_PARAM, model_dir / NCNN_BIN
        if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
            raise ModelError(f"ncnn cannot load {param} and {weights}")
        self._net = net
        self._outputs = sorted(
            (name for name in net.output_names() if name.startswith("out")),
            key=lambda name: int(name[3:]),
        )
        if not self._outputs or len(self._outputs) % 2:
            raise ModelError(
                f"{param}: expected box and class outputs per level, got {self._outputs}"
            )
        self._input = net.input_names()[0]
        self._score_floor = score_floor
        self._gate = threading.Lock()
        log.info(
            "ncnn read %s (%d head levels, %d threads)", param, len(self._outputs) // 2, threads
        )

    @property
    def name(self) -> str:
        return "ncnn"

    @property
    def precision(self) -> str:
        return "fp32"

    def infer(self, batch: Batch) -> HeadOutput:
        outputs = []
        for image in batch:
            # ncnn.Mat(array) wraps the array's memory without copying: keep it referenced (and
            # contiguous) until the extraction is done.
            pixels = np.ascontiguousarray(image, dtype=np.float32)
            outputs.append(self._run(self._ncnn.Mat(pixels)))
            del pixels
        return np.concatenate(outputs, axis=2) if len(outputs) > 1 else outputs[0]

    def infer_images(self, images: Images) -> HeadOutput:
        ncnn = self._ncnn
        outputs = []
        for image in images:
            h, w = int(image.shape[0]), int(image.shape[1])
            mat = ncnn.Mat.from_pixels(
                np.ascontiguousarray(image), ncnn.Mat.PixelType.PIXEL_BGR2RGB, w, h
            )
            mat.substract_mean_normalize([], [_SCALE, _SCALE, _SCALE])
            outputs.append(self._run(mat))
        return np.concatenate(outputs, axis=2) if len(outputs) > 1 else outputs[0]

    def _run(self, mat: Any) -> HeadOutput:
        blobs = []
        with self._gate:
            extractor = self._net.create_extractor()
            extractor.input(self._input, mat)
            for name in self._outputs:
                ret, out = extractor.extract(name)
                if ret != 0:
                    raise RuntimeError(f"ncnn could not compute {name} (error {ret})")
                blobs.append(np.array(out, dtype=np.float32))
        levels = [(blobs[i], blobs[i + 1]) for i in range(0, len(blobs), 2)]
        return decode_levels(levels, (int(mat.h), int(mat.w)), score_floor=self._score_floor)

    def close(self) -> None:
        self._net.clear()
