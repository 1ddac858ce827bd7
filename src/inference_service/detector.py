"""The YOLOv8 frame detector: bytes in, :class:`FrameDetections` out (implements ``FrameDetector``).

One :class:`YoloDetector` per worker process, shared by its threads: ``detect`` is thread-safe and
spends its time in code that releases the GIL (simplejpeg, OpenCV, numpy, the inference runtime),
so threads of one process overlap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from inference_service.domain import BBox, Detection, FrameDetections, ImageSize, ModelInfo
from inference_service.errors import InferenceFailedError, UndecodableFrameError
from inference_service.model.resolve import ResolvedModel
from inference_service.runtime import InferenceBackend, ModelFiles, open_backend
from inference_service.settings import Settings, default_of
from inference_service.vision import (
    PAD_VALUE,
    ImageBGR,
    RawDetections,
    decode_image,
    letterbox_geometry,
    letterbox_image,
    postprocess,
)

log = logging.getLogger(__name__)

WARMUP_FRAME_HW = (720, 1280)
"""The frame shape the detector warms up on (and the runtime choice is measured at)."""


class YoloDetector:
    """Decode, letterbox, infer, NMS and rescale, with per-stage timings."""

    def __init__(
        self,
        backend: InferenceBackend,
        model: ResolvedModel,
        *,
        conf: float,
        iou: float,
        max_detections: int = default_of("max_detections"),
        max_frame_bytes: int = default_of("max_frame_bytes"),
        max_frame_pixels: int = default_of("max_frame_pixels"),
    ) -> None:
        self._backend = backend
        self._model = model
        self._conf = conf
        self._iou = iou
        self._max_det = max_detections
        self._max_bytes = max_frame_bytes
        self._max_pixels = max_frame_pixels
        self.warmed_up = False
        """True once :meth:`warmup` has run (the pool does not warm it up again)."""
        self._info = ModelInfo(
            name=model.source.name,
            sha256=model.sha256,
            imgsz=model.imgsz,
            conf=conf,
            iou=iou,
            runtime=f"{backend.name}/{backend.precision}",
            classes=model.names,
            precision=backend.precision,
        )

    @property
    def info(self) -> ModelInfo:
        """What results and ``/v1/model`` say about the model."""
        return self._info

    @property
    def backend(self) -> InferenceBackend:
        """The inference backend in use."""
        return self._backend

    def detect(self, data: bytes) -> FrameDetections:
        """Detections of one encoded frame (JPEG, PNG, BMP or WebP).

        Raises ``UndecodableFrameError``, ``FrameTooLargeError`` or ``InferenceFailedError``.
        """
        start = time.perf_counter()
        image = decode_image(data, max_bytes=self._max_bytes, max_pixels=self._max_pixels)
        decode_ms = (time.perf_counter() - start) * 1e3
        return self._run(image, decode_ms)

    def detect_array(self, image: ImageBGR) -> FrameDetections:
        """Detections of a decoded ``(h, w, 3)`` BGR ``uint8`` frame (e.g. a video frame)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UndecodableFrameError(
                f"expected an (h, w, 3) uint8 BGR frame, got {image.shape} {image.dtype}"
            )
        return self._run(np.ascontiguousarray(image), 0.0)

    def _run(self, image: ImageBGR, decode_ms: float) -> FrameDetections:
        model = self._model
        t0 = time.perf_counter()
        geo = letterbox_geometry(
            (image.shape[0], image.shape[1]), model.imgsz, model.stride, auto=model.dynamic
        )
        padded = letterbox_image(image, geo)[np.newaxis]
        t1 = time.perf_counter()
        try:
            output = self._backend.infer_images(padded)
        except Exception as exc:  # the runtimes raise their own untyped errors
            raise InferenceFailedError(
                f"{self._info.runtime} failed on a {padded.shape} input: {exc}"
            ) from exc
        t2 = time.perf_counter()
        raw = postprocess(output, geo, conf=self._conf, iou=self._iou, max_det=self._max_det)
        detections = self._to_domain(raw)
        t3 = time.perf_counter()
        return FrameDetections(
            image=ImageSize(width=int(image.shape[1]), height=int(image.shape[0])),
            detections=detections,
            decode_ms=decode_ms,
            preprocess_ms=(t1 - t0) * 1e3,
            inference_ms=(t2 - t1) * 1e3,
            postprocess_ms=(t3 - t2) * 1e3,
        )

    def _to_domain(self, raw: RawDetections) -> tuple[Detection, ...]:
        names = self._model.names
        boxes = raw.boxes.tolist()
        scores = raw.scores.tolist()
        class_ids = raw.class_ids.tolist()
        return tuple(
            Detection(
                class_id=c,
                class_name=names[c] if c < len(names) else str(c),
                confidence=s,
                bbox=BBox(x1=b[0], y1=b[1], x2=b[2], y2=b[3]),
            )
            for b, s, c in zip(boxes, scores, class_ids, strict=True)
        )

    def warmup(self, frame_hw: Sequence[int] = WARMUP_FRAME_HW) -> None:
        """Run the whole path once on a grey frame (compiles the backend for that input shape)."""
        frame = np.full((int(frame_hw[0]), int(frame_hw[1]), 3), PAD_VALUE, dtype=np.uint8)
        start = time.perf_counter()
        self.detect_array(frame)
        self.warmed_up = True
        log.info("detector warmed up in %.0f ms", (time.perf_counter() - start) * 1e3)

    def close(self) -> None:
        """Release the backend."""
        self._backend.close()


def model_files(model: ResolvedModel) -> ModelFiles:
    """The runnable files of a resolved model, for the runtime layer."""
    return ModelFiles(
        sha256=model.sha256,
        onnx=model.onnx_path,
        openvino_xml=model.openvino_xml,
        ncnn_dir=model.ncnn_dir,
        openvino_int8_xml=model.int8_xml,
    )


def load_detector(
    resolved: ResolvedModel,
    settings: Settings,
    threads: int,
    *,
    openvino_hint: str = "LATENCY",
    openvino_streams: int | None = None,
) -> YoloDetector:
    """Open the backend that ``settings`` names for ``resolved`` and warm it up.

    ``threads``: inference threads of this detector (per worker process). Runtime ``auto``
    measures both CPU runtimes once per CPU model and model (cached in the cache directory).
    """
    probe = letterbox_geometry(
        WARMUP_FRAME_HW, resolved.imgsz, resolved.stride, auto=resolved.dynamic
    )
    backend = open_backend(
        model_files(resolved),
        settings.runtime,
        settings.precision,
        threads,
        cache_dir=settings.cache_path(),
        probe_hw=probe.input_hw,
        openvino_hint=openvino_hint,
        openvino_streams=openvino_streams,
        score_floor=settings.conf,
    )
    detector = YoloDetector(
        backend,
        resolved,
        conf=settings.conf,
        iou=settings.iou,
        max_detections=settings.max_detections,
        max_frame_bytes=settings.max_frame_bytes,
        max_frame_pixels=settings.max_frame_pixels,
    )
    detector.warmup()
    log.info(
        "detector ready: %s (sha256 %s), %s, precision %s, imgsz %s, %d threads",
        resolved.source.name,
        resolved.sha256[:12],
        detector.info.runtime,
        detector.info.precision,
        resolved.imgsz,
        threads,
    )
    return detector
