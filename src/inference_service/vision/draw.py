"""Draw detections onto a frame (boxes and labels) with OpenCV's built-in Hershey font."""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from inference_service.domain import Detection
from inference_service.vision.decode import ImageBGR

_PALETTE: tuple[tuple[int, int, int], ...] = (
    (56, 56, 255),
    (151, 157, 255),
    (31, 112, 255),
    (29, 178, 255),
    (49, 210, 207),
    (10, 249, 72),
    (23, 204, 146),
    (134, 219, 61),
    (211, 188, 52),
    (255, 194, 0),
    (168, 153, 44),
    (255, 149, 0),
    (255, 55, 0),
    (189, 0, 0),
    (236, 24, 0),
    (255, 56, 132),
    (133, 0, 82),
    (255, 56, 203),
    (200, 149, 255),
    (199, 55, 255),
)
"""BGR colours, one per class id modulo its length."""


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The BGR colour of a class."""
    return _PALETTE[class_id % len(_PALETTE)]


def annotate(image: ImageBGR, detections: Iterable[Detection]) -> ImageBGR:
    """A copy of ``image`` with each detection's box and ``name confidence`` label drawn on it."""
    out = np.ascontiguousarray(image).copy()
    height, width = out.shape[:2]
    thickness = max(1, round((height + width) / 600))
    font_scale = max(0.4, thickness / 3)
    for det in detections:
        colour = class_colour(det.class_id)
        b = det.bbox
        p1 = (round(b.x1), round(b.y1))
        p2 = (round(b.x2), round(b.y2))
        cv2.rectangle(out, p1, p2, colour, thickness, cv2.LINE_AA)
        label = f"{det.class_name} {det.confidence:.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(
            label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, max(1, thickness - 1)
        )
        above = p1[1] - text_h - baseline >= 0
        top = p1[1] - text_h - baseline if above else p1[1]
        cv2.rectangle(out, (p1[0], top), (p1[0] + text_w, top + text_h + baseline), colour, -1)
        cv2.putText(
            out,
            label,
            (p1[0], top + text_h),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (255, 255, 255),
            max(1, thickness - 1),
            cv2.LINE_AA,
        )
    return out
