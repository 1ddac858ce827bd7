"""Comparing the service's detections with the reference's (ultralytics predict, same .pt).

SPEC.md, Results: fp32 — same count and classes, boxes within 1 px or IoU >= 0.99, confidence within
0.01; bf16 — same count and classes except detections whose reference confidence lies within 0.02
of the threshold, IoU >= 0.95, confidence within 0.02. :func:`compare` applies these to one image
and gathers the result in an :class:`Agreement`; the conformance test
(``tests/model/test_conformance.py``) and the bf16 benchmark (``bench/bf16_stem.py``) both use it,
on the images of :data:`IMAGE_DIRS` and the model :data:`TEST_MODEL`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from inference_devtools import paths
from inference_service.domain import BBox, Detection
from inference_service.settings import default_of

TEST_MODEL: Final[Path] = Path(os.environ.get("CONFORMANCE_MODEL", paths.TEST_MODEL))
"""The checked model; ``CONFORMANCE_MODEL`` checks another .pt against the reference."""
IMAGE_DIRS: Final[tuple[Path, ...]] = (
    paths.REPO_ROOT / "tests" / "data" / "photos",
    paths.REPO_ROOT / "models" / "test" / "conformance",
)
"""Every JPEG in these folders is a conformance image."""
CONF: Final[float] = default_of("conf")
"""The confidence threshold of both sides: the service's default."""
IOU: Final[float] = default_of("iou")
"""The NMS IoU threshold of both sides: the service's default."""


def ultralytics_env(config_dir: Path) -> None:
    """Keep ultralytics offline and quiet, its settings file under ``config_dir`` (set if unset)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ.setdefault("YOLO_VERBOSE", "False")


def images() -> list[Path]:
    """The conformance images, sorted by path."""
    return sorted(p for d in IMAGE_DIRS if d.is_dir() for p in d.glob("*.jpg"))


def from_ultralytics(result: Any, names: tuple[str, ...]) -> list[Detection]:
    """One ultralytics ``Results`` as the service's detections, in the reference's order."""
    boxes = result.boxes
    xyxy = boxes.xyxy.cpu().numpy().tolist()
    conf = boxes.conf.cpu().numpy().tolist()
    cls = boxes.cls.cpu().numpy().astype(int).tolist()
    return [
        Detection(class_id=c, class_name=names[c], confidence=s, bbox=BBox(*b))
        for b, s, c in zip(xyxy, conf, cls, strict=True)
    ]


def iou(a: Detection, b: Detection) -> float:
    """Intersection over union of two detections' boxes (1.0 for two empty boxes)."""
    ax1, ay1, ax2, ay2 = a.bbox.x1, a.bbox.y1, a.bbox.x2, a.bbox.y2
    bx1, by1, bx2, by2 = b.bbox.x1, b.bbox.y1, b.bbox.x2, b.bbox.y2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 1.0


def box_dev(a: Detection, b: Detection) -> float:
    """The largest difference between corresponding box coordinates, in pixels."""
    return max(
        abs(a.bbox.x1 - b.bbox.x1),
        abs(a.bbox.y1 - b.bbox.y1),
        abs(a.bbox.x2 - b.bbox.x2),
        abs(a.bbox.y2 - b.bbox.y2),
    )


@dataclass
class Agreement:
    """How one detector's output compares with the reference's, over many images."""

    images: int = 0
    detections: int = 0
    max_box_dev: float = 0.0
    min_iou: float = 1.0
    max_dconf: float = 0.0
    near_threshold_differences: int = 0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The figures (not the failures), rounded for a report."""
        return {
            "images": self.images,
            "detections": self.detections,
            "max_box_dev_px": round(self.max_box_dev, 4),
            "min_iou": round(self.min_iou, 5),
            "max_dconf": round(self.max_dconf, 5),
            "near_threshold_differences": self.near_threshold_differences,
        }


def compare(
    ours: list[Detection],
    ref: list[Detection],
    agreement: Agreement,
    *,
    strict: bool,
    conf: float,
    where: str,
) -> None:
    """Match each reference detection to ours (same class, best IoU) and check the tolerances.

    ``strict`` applies the fp32 tolerance, otherwise the bf16 one; every miss is appended to
    ``agreement.failures`` prefixed with ``where``.
    """
    iou_min, dconf_max, margin = (0.99, 0.01, 0.0) if strict else (0.95, 0.02, 0.02)
    agreement.images += 1
    unmatched = list(ours)
    for r in ref:
        same = [d for d in unmatched if d.class_id == r.class_id]
        best = max(same, key=lambda d: iou(d, r), default=None)
        if best is None or iou(best, r) < 0.5:
            if not strict and r.confidence - conf <= margin:
                agreement.near_threshold_differences += 1
                continue
            agreement.failures.append(f"{where}: reference {r} not found")
            continue
        unmatched.remove(best)
        agreement.detections += 1
        overlap, dev, dconf = iou(best, r), box_dev(best, r), abs(best.confidence - r.confidence)
        agreement.max_box_dev = max(agreement.max_box_dev, dev)
        agreement.min_iou = min(agreement.min_iou, overlap)
        agreement.max_dconf = max(agreement.max_dconf, dconf)
        # A small box moves its IoU a lot for a pixel: fp32 may differ by 1 px, bf16 by 2 (seen on
        # AMX: 1.17 px on a 29x49 px box at the image edge, IoU 0.939).
        box_ok = overlap >= iou_min or dev <= (1.0 if strict else 2.0)
        if not box_ok or dconf > dconf_max:
            agreement.failures.append(
                f"{where}: {best} vs reference {r}: IoU {overlap:.4f}, {dev:.2f} px, "
                f"Δconf {dconf:.4f}"
            )
    for d in unmatched:
        if not strict and d.confidence - conf <= margin:
            agreement.near_threshold_differences += 1
            continue
        agreement.failures.append(f"{where}: extra detection {d}")
    scores = [d.confidence for d in ours]
    if scores != sorted(scores, reverse=True):
        agreement.failures.append(f"{where}: detections not ordered by confidence")
