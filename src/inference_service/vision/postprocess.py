"""YOLOv8 head output to boxes in the original frame: decode, threshold, class-aware NMS, rescale.

Matches the behaviour of ultralytics' ``non_max_suppression`` (single label per box) followed by
``scale_boxes``, as its detection predictor applies them:

- the head gives ``(batch, 4 + nc, N)``: centre x, centre y, width, height, one score per class;
- a candidate's confidence is its best class score and it is kept when strictly greater than
  ``conf``; the centre form becomes corners as ``xy -/+ wh / 2``;
- at most 30000 candidates (highest confidence) enter NMS;
- NMS is class-aware by offsetting each box by ``class_id * 7680`` pixels, suppressing a box whose
  IoU with a kept, higher-scoring box is strictly greater than ``iou``; at most ``max_det`` boxes
  are kept, highest confidence first;
- boxes are mapped back to the frame by removing the padding and dividing by the per-axis gain that
  the letterbox's rounded resize implies, then clipped to ``[0, width] x [0, height]``.

Everything runs in float32 numpy; the NMS is greedy but vectorised per kept box and stops after
``max_det`` boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from inference_service.vision.letterbox import LetterboxGeometry

MAX_NMS = 30_000
"""Most candidates entering NMS (the reference's ``max_nms``)."""
MAX_WH = 7680.0
"""Per-class coordinate offset that keeps classes apart in NMS (the reference's ``max_wh``)."""

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.intp]


@dataclass(frozen=True, slots=True)
class RawDetections:
    """Detections of one frame as arrays, highest confidence first."""

    boxes: FloatArray
    """``(k, 4)`` corners x1, y1, x2, y2."""
    scores: FloatArray
    """``(k,)`` confidences."""
    class_ids: IntArray
    """``(k,)`` class ids."""

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def select_candidates(
    head: npt.NDArray[np.floating], conf: float
) -> tuple[FloatArray, FloatArray, IntArray]:
    """Boxes (corners), confidences and class ids of the candidates of one ``(4 + nc, N)`` head.

    A candidate's confidence is its best class score, kept when ``> conf``.
    """
    if head.ndim != 2 or head.shape[0] < 5:
        raise ValueError(f"expected a (4 + classes, anchors) head, got shape {head.shape}")
    scores_all = head[4:]
    best = scores_all.max(axis=0)
    keep = np.flatnonzero(best > conf)
    if keep.size == 0:
        empty = np.zeros((0,), dtype=np.float32)
        return np.zeros((0, 4), dtype=np.float32), empty, np.zeros((0,), dtype=np.intp)
    scores = best[keep].astype(np.float32, copy=False)
    class_ids = scores_all[:, keep].argmax(axis=0).astype(np.intp, copy=False)
    xywh = head[:4, keep].T.astype(np.float32)
    half = xywh[:, 2:] / np.float32(2)
    boxes = np.concatenate((xywh[:, :2] - half, xywh[:, :2] + half), axis=1)
    return boxes, scores, class_ids


def nms(boxes: FloatArray, scores: FloatArray, iou: float, max_det: int) -> IntArray:
    """Indices of the boxes kept by greedy NMS, highest score first (at most ``max_det``).

    A box is suppressed when its IoU with a kept, higher-scoring box is strictly greater than
    ``iou``, as ``torchvision.ops.nms`` decides.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    keep: list[int] = []
    threshold = np.float32(iou)
    while order.size > 0 and len(keep) < max_det:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if rest.size == 0:
            break
        w = np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])
        h = np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])
        inter = np.maximum(w, np.float32(0)) * np.maximum(h, np.float32(0))
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[~(overlap > threshold)]
    return np.asarray(keep, dtype=np.intp)


def scale_boxes(boxes: FloatArray, geo: LetterboxGeometry) -> FloatArray:
    """Map ``boxes`` from input to frame pixels in place (padding, gain, clip); returns them.

    The gain and padding are recomputed from the input and frame shapes as the reference's
    ``scale_boxes`` does, so that boxes agree with it to the last rounding.
    """
    in_h, in_w = geo.input_hw
    img_h, img_w = geo.image_hw
    gain = min(in_h / img_h, in_w / img_w)
    new_h, new_w = max(round(img_h * gain), 1), max(round(img_w * gain), 1)
    gain_y, gain_x = new_h / img_h, new_w / img_w
    pad_x, pad_y = round((in_w - new_w) / 2 - 0.1), round((in_h - new_h) / 2 - 0.1)
    boxes[:, [0, 2]] -= np.float32(pad_x)
    boxes[:, [1, 3]] -= np.float32(pad_y)
    boxes[:, [0, 2]] /= np.float32(gain_x)
    boxes[:, [1, 3]] /= np.float32(gain_y)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, img_w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, img_h)
    return boxes


def postprocess(
    output: npt.NDArray[np.floating],
    geo: LetterboxGeometry,
    *,
    conf: float,
    iou: float,
    max_det: int,
) -> RawDetections:
    """Detections of one frame from its ``(1, 4 + nc, N)`` (or ``(4 + nc, N)``) head output."""
    head = output[0] if output.ndim == 3 else output
    boxes, scores, class_ids = select_candidates(head, conf)
    if scores.size > MAX_NMS:
        top = np.argsort(-scores, kind="stable")[:MAX_NMS]
        boxes, scores, class_ids = boxes[top], scores[top], class_ids[top]
    if scores.size == 0:
        return RawDetections(boxes, scores, class_ids)
    offset = class_ids.astype(np.float32)[:, None] * np.float32(MAX_WH)
    kept = nms(boxes + offset, scores, iou, max_det)
    return RawDetections(scale_boxes(boxes[kept], geo), scores[kept], class_ids[kept])
