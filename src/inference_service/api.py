"""The detector for embedding: a model path in, :class:`Detector` out, image bytes to detections.

    from inference_service import Detector

    with Detector.from_model("best.pt") as detector:
        found = detector.detect(Path("frame.jpg").read_bytes())
        for d in found.detections:
            print(d.class_name, round(d.confidence, 2), d.bbox)

The same detector the service runs in each worker process (decode, letterbox, the runtime chosen
by ``INFERENCE_RUNTIME``, NMS, boxes in original pixels), in the calling process: no Kafka, no S3,
no worker pool. Settings not given are read as the service reads them (``INFERENCE_*``
variables, then the defaults of :mod:`inference_service.settings`). A ``.pt`` checkpoint is
converted once and cached (it needs the ``export`` extra); an ``.onnx`` file or an OpenVINO IR
directory needs nothing more.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from inference_service.detector import YoloDetector, load_detector
from inference_service.domain import FrameDetections, ModelInfo
from inference_service.model import resolve_model
from inference_service.settings import load_settings

__all__ = ["Detector"]


class Detector:
    """A loaded YOLOv8 detector; thread-safe (threads overlap in decode and inference).

    Build it with :meth:`from_model`; :meth:`close` it (or use ``with``) to free the runtime.
    """

    def __init__(self, detector: YoloDetector) -> None:
        self._detector = detector
        self._closed = False

    @classmethod
    def from_model(
        cls, model: str | os.PathLike[str], *, threads: int | None = None, **settings: Any
    ) -> Detector:
        """Resolve ``model`` (a ``.pt``, an ``.onnx`` or an OpenVINO IR directory) and load it.

        ``threads``: inference threads (default: the ``INFERENCE_THREADS`` setting when it is a
        number, else every CPU this process may run on). ``settings``: any other setting by its
        field name, e.g. ``runtime="openvino"``, ``precision="bf16"``, ``conf=0.5``,
        ``cache_dir="/var/cache/models"`` (``inference-service settings`` lists them). Raises
        :class:`~inference_service.errors.ConfigError` for a bad setting and
        :class:`~inference_service.errors.ModelError` for a model it cannot run.
        """
        resolved_settings = load_settings({**settings, "model": Path(model)})
        resolved = resolve_model(resolved_settings)
        if threads is None:
            configured = resolved_settings.threads
            threads = configured if isinstance(configured, int) else len(os.sched_getaffinity(0))
        return cls(load_detector(resolved, resolved_settings, threads))

    @property
    def info(self) -> ModelInfo:
        """The model: name, sha256, input size, class names, runtime and precision."""
        return self._detector.info

    def detect(self, image: bytes) -> FrameDetections:
        """Detections of one encoded image (JPEG, PNG, BMP or WebP), highest confidence first.

        Raises :class:`~inference_service.errors.UndecodableFrameError` (not an image),
        ``FrameTooLargeError`` (over ``max_frame_bytes`` / ``max_frame_pixels``) or
        ``InferenceFailedError``.
        """
        self._check_open()
        return self._detector.detect(image)

    def detect_array(self, image: npt.NDArray[np.uint8]) -> FrameDetections:
        """Detections of a decoded ``(height, width, 3)`` BGR ``uint8`` image (OpenCV's layout)."""
        self._check_open()
        return self._detector.detect_array(image)

    def close(self) -> None:
        """Release the runtime; the detector cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self._detector.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Detector is closed: build another with Detector.from_model")
