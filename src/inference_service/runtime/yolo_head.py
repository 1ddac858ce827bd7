"""Decode a YOLOv8 Detect head's raw per-level outputs into the exported network's output.

For runtimes that run the network only up to the head's last convolutions (ncnn here), this does
in float32 numpy what ultralytics' exported graph does after them, so that the result is the same
``(1, 4 + classes, anchors)`` array: per level of stride ``s`` and anchor at cell centre
``(x + 0.5, y + 0.5)``, the box branch's ``4 × reg_max`` logits become four distances (softmax
over ``reg_max`` bins, then the expected bin: "distribution focal loss"), the box is
``centre ± distance`` turned into ``(cx, cy, w, h)`` and multiplied by ``s``; class scores are the
sigmoid of the class logits.

``score_floor`` skips the box decode of anchors whose best class score is below it (NMS drops them
anyway): only the surviving anchors' columns are returned, in anchor order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]


def decode_levels(
    levels: Sequence[tuple[Array, Array]],
    input_hw: tuple[int, int],
    *,
    score_floor: float | None = None,
) -> Array:
    """``(1, 4 + classes, anchors)`` from per-level ``(box logits (4·reg_max, h, w), class logits
    (nc, h, w))``, largest map first; each level's stride is ``input height / h``."""
    boxes: list[Array] = []
    scores: list[Array] = []
    logit_floor = _logit(score_floor) if score_floor is not None else None
    for box, cls in levels:
        channels, h, w = box.shape
        reg_max = channels // 4
        stride = input_hw[0] / h
        cls_logits = cls.reshape(cls.shape[0], h * w).astype(np.float32, copy=False)
        box_logits = box.reshape(4, reg_max, h * w).astype(np.float32, copy=False)
        index = np.arange(h * w)
        if logit_floor is not None:
            keep = np.flatnonzero(cls_logits.max(axis=0) >= logit_floor)
            cls_logits, box_logits, index = cls_logits[:, keep], box_logits[:, :, keep], keep
        scores.append(_sigmoid(cls_logits))
        boxes.append(_boxes(box_logits, index, w, np.float32(stride)))
    out = np.concatenate([np.concatenate(boxes, axis=1), np.concatenate(scores, axis=1)], axis=0)
    return out[np.newaxis].astype(np.float32, copy=False)


def _boxes(logits: Array, index: npt.NDArray[np.intp], width: int, stride: np.float32) -> Array:
    """``(4, n)`` cx, cy, w, h in input pixels from ``(4, reg_max, n)`` distance logits."""
    reg_max = logits.shape[1]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    bins = np.arange(reg_max, dtype=np.float32)[np.newaxis, :, np.newaxis]
    dist = (shifted * bins).sum(axis=1) / shifted.sum(axis=1)
    ax = (index % width).astype(np.float32) + np.float32(0.5)
    ay = (index // width).astype(np.float32) + np.float32(0.5)
    x1, y1 = ax - dist[0], ay - dist[1]
    x2, y2 = ax + dist[2], ay + dist[3]
    return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]).astype(np.float32) * stride


def _sigmoid(x: Array) -> Array:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32, copy=False)


def _logit(p: float) -> float:
    """The logit below which a sigmoid score is under ``p`` (a hair lower, for float rounding)."""
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p)) - 1e-4
