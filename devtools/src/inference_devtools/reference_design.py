"""The original specification's per-frame work, run in the worker processes of a process pool.

The design: a ``ProcessPoolExecutor`` whose workers each hold one ultralytics model (loaded by
:func:`init`, the pool's initializer) and run :func:`detect` on each frame's JPEG bytes. The
benchmarks measure it beside the service; the functions live in a module, not in a benchmark
script, so that spawned workers import them by name.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from inference_devtools.bench import HEIGHT, WIDTH, ultralytics_env

_MODEL: Any = None
"""This worker's model, set by :func:`init`."""


def init(path: str) -> None:
    """Pool initializer: load the model at ``path`` and warm it up on a grey frame."""
    global _MODEL
    os.environ.update(ultralytics_env())
    from ultralytics.models import YOLO

    _MODEL = YOLO(path)
    detect(_encoded_gray())  # warm-up: the first predict builds the predictor


def _encoded_gray() -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.full((HEIGHT, WIDTH, 3), 114, np.uint8))
    return bytes(buf) if ok else b""


def detect(data: bytes) -> list[dict[str, Any]]:
    """The original design's per-frame work: decode, predict, results to plain data."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    result = _MODEL.predict(image, conf=0.25, iou=0.45, verbose=False)[0]
    boxes = result.boxes
    return [
        {"class_id": int(c), "confidence": float(p), "bbox": [float(v) for v in xyxy]}
        for c, p, xyxy in zip(
            boxes.cls.tolist(), boxes.conf.tolist(), boxes.xyxy.tolist(), strict=True
        )
    ]


def torch_threads() -> int:
    """The intra-op thread count torch uses in this worker."""
    import torch

    return int(torch.get_num_threads())
