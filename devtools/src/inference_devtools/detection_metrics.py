"""Detection accuracy the standard way, and the agreement of one detector with another.

- :func:`mean_average_precision`: COCO's protocol: for each IoU threshold of 0.50, 0.55, …, 0.95,
  detections of all images sorted by confidence are matched greedily to the unmatched
  ground-truth box of their class with the highest IoU at or above the threshold; average
  precision is the mean of the precision envelope sampled at 101 recall levels (pycocotools'
  rule: a perfect detector scores 1.0, where ultralytics' trapezoid over the same points gives
  0.995); mAP50 is the mean over classes (with ground truth) at 0.50, mAP50-95 the mean over
  classes and thresholds.
- :func:`agreement`: detections of a candidate (int8) against those of a reference (fp32) on the
  same frames, matched greedily by confidence at IoU ≥ 0.5 and the same class: precision and
  recall of the candidate against the reference, the largest box-coordinate deviation and the
  largest confidence difference of matched pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Boxes = npt.NDArray[np.float64]
"""``(n, 4)`` boxes ``x1, y1, x2, y2`` in pixels."""

IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class Frame:
    """Boxes of one image: ground truth (``scores`` unused) or detections."""

    boxes: Boxes
    classes: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float64]

    @classmethod
    def of(
        cls,
        boxes: Sequence[Sequence[float]],
        classes: Sequence[int],
        scores: Sequence[float] | None = None,
    ) -> Frame:
        return cls(
            np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            np.asarray(classes, dtype=np.int64).reshape(-1),
            np.asarray(scores if scores is not None else [1.0] * len(classes), dtype=np.float64),
        )


def box_iou(a: Boxes, b: Boxes) -> npt.NDArray[np.float64]:
    """``(len(a), len(b))`` IoU matrix."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    out: npt.NDArray[np.float64] = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    return out


def _greedy(iou: npt.NDArray[np.float64], threshold: float) -> list[tuple[int, int]]:
    """Rows (detections, in priority order) matched to the best free column with IoU ≥ threshold."""
    taken: set[int] = set()
    pairs = []
    for i in range(iou.shape[0]):
        best, best_iou = -1, threshold
        for j in np.flatnonzero(iou[i] >= threshold):
            if int(j) not in taken and iou[i, j] >= best_iou:
                best, best_iou = int(j), float(iou[i, j])
        if best >= 0:
            taken.add(best)
            pairs.append((i, best))
    return pairs


def average_precision(recall: npt.NDArray[np.float64], precision: npt.NDArray[np.float64]) -> float:
    """COCO's 101-point average precision: the mean, over recall levels 0, 0.01, …, 1, of the
    precision envelope (the best precision at that recall or beyond; 0 past the last recall).

    ``recall`` ascending, one entry per detection in confidence order."""
    envelope = np.flip(np.maximum.accumulate(np.flip(precision)))
    index = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = np.where(index < len(envelope), envelope[np.minimum(index, len(envelope) - 1)], 0.0)
    return float(sampled.mean())


@dataclass(frozen=True)
class MapResult:
    map50: float
    map50_95: float
    per_class_map50: dict[int, float]


def mean_average_precision(truth: Sequence[Frame], found: Sequence[Frame]) -> MapResult:
    """mAP50 and mAP50-95 of ``found`` against ``truth`` (same images, same order)."""
    if len(truth) != len(found):
        raise ValueError("truth and detections must cover the same images")
    classes = sorted({int(c) for t in truth for c in t.classes})
    ap = np.zeros((len(classes), len(IOU_THRESHOLDS)))
    for ci, cls in enumerate(classes):
        n_truth = sum(int((t.classes == cls).sum()) for t in truth)
        scores: list[float] = []
        hits: list[npt.NDArray[np.bool_]] = []
        for t, f in zip(truth, found, strict=True):
            tb = t.boxes[t.classes == cls]
            mask = f.classes == cls
            order = np.argsort(-f.scores[mask], kind="stable")
            fb, fs = f.boxes[mask][order], f.scores[mask][order]
            iou = box_iou(fb, tb)
            hit = np.zeros((len(fb), len(IOU_THRESHOLDS)), dtype=bool)
            for ti, threshold in enumerate(IOU_THRESHOLDS):
                for i, _j in _greedy(iou, float(threshold)):
                    hit[i, ti] = True
            scores.extend(fs.tolist())
            hits.append(hit)
        if not scores:
            continue
        order = np.argsort(-np.asarray(scores), kind="stable")
        tp = np.concatenate(hits)[order].astype(np.float64)
        tp_cum = tp.cumsum(axis=0)
        fp_cum = (1.0 - tp).cumsum(axis=0)
        for ti in range(len(IOU_THRESHOLDS)):
            recall = tp_cum[:, ti] / max(n_truth, 1)
            precision = tp_cum[:, ti] / np.maximum(tp_cum[:, ti] + fp_cum[:, ti], 1e-12)
            ap[ci, ti] = average_precision(recall, precision)
    if not classes:
        return MapResult(0.0, 0.0, {})
    return MapResult(
        map50=float(ap[:, 0].mean()),
        map50_95=float(ap.mean()),
        per_class_map50={cls: float(ap[ci, 0]) for ci, cls in enumerate(classes)},
    )


@dataclass(frozen=True)
class Agreement:
    precision: float
    """Matched candidate detections / candidate detections."""
    recall: float
    """Matched reference detections / reference detections."""
    max_box_deviation_px: float
    """Largest absolute coordinate difference of a matched pair, in pixels."""
    max_delta_conf: float
    """Largest confidence difference of a matched pair."""
    reference_detections: int
    candidate_detections: int
    matched: int


def agreement(
    reference: Sequence[Frame], candidate: Sequence[Frame], iou_threshold: float = 0.5
) -> Agreement:
    """How far ``candidate`` agrees with ``reference`` (same images, same order)."""
    matched = n_ref = n_cand = 0
    max_dev = max_dconf = 0.0
    for r, c in zip(reference, candidate, strict=True):
        n_ref += len(r.boxes)
        n_cand += len(c.boxes)
        order = np.argsort(-c.scores, kind="stable")
        iou = box_iou(c.boxes[order], r.boxes)
        same = c.classes[order][:, None] == r.classes[None, :]
        for i, j in _greedy(np.where(same, iou, 0.0), iou_threshold):
            k = order[i]
            matched += 1
            max_dev = max(max_dev, float(np.abs(c.boxes[k] - r.boxes[j]).max()))
            max_dconf = max(max_dconf, abs(float(c.scores[k] - r.scores[j])))
    return Agreement(
        precision=matched / n_cand if n_cand else 1.0,
        recall=matched / n_ref if n_ref else 1.0,
        max_box_deviation_px=max_dev,
        max_delta_conf=max_dconf,
        reference_detections=n_ref,
        candidate_detections=n_cand,
        matched=matched,
    )
