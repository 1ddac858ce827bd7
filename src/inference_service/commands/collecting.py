"""Assemble the results of one video and judge its completeness (pure logic, stdlib only).

The downstream runner's view of a video: every result record of the video, one per frame, ordered
by ``frame_id``, and a summary that says which frames are missing or came more than once, the
errors by code, the detections by class and the latency of the frames. ``inference-service
collect`` feeds this from Kafka; the unit tests feed it lists.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

JsonObject = dict[str, Any]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between ranks; None if empty."""
    if not values:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0-100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(slots=True)
class VideoCollector:
    """Accumulates the results of one video, as records arrive, in any order."""

    video_id: str
    expected: int | None = None
    """Frames the video has (ids ``0 .. expected-1``); None when unknown."""
    _frames: dict[int, JsonObject] = field(default_factory=dict)
    _copies: Counter[int] = field(default_factory=Counter)
    _unnumbered: list[JsonObject] = field(default_factory=list)
    _timestamps_ms: list[int] = field(default_factory=list)

    def add(self, result: JsonObject, timestamp_ms: int | None = None) -> bool:
        """Take one result record; False (ignored) when it belongs to another video.

        The first result of a frame is kept; later copies (a repeat under ``at_least_once``) are
        counted as duplicates. A result without a usable ``frame_id`` (an invalid task) is kept
        apart: it counts in the errors but fills no frame.
        """
        if result.get("video_id") != self.video_id:
            return False
        if timestamp_ms is not None:
            self._timestamps_ms.append(timestamp_ms)
        frame_id = result.get("frame_id")
        if not isinstance(frame_id, int) or isinstance(frame_id, bool):
            self._unnumbered.append(result)
            return True
        self._copies[frame_id] += 1
        self._frames.setdefault(frame_id, result)
        return True

    @property
    def received(self) -> int:
        """Distinct frames received."""
        return len(self._frames)

    def done(self) -> bool:
        """True once every expected frame has a result (never when ``expected`` is unknown)."""
        return self.expected is not None and not self.missing()

    def missing(self) -> list[int]:
        """Expected frame ids without a result."""
        if self.expected is None:
            return []
        return [i for i in range(self.expected) if i not in self._frames]

    def duplicated(self) -> list[int]:
        """Frame ids that received more than one result."""
        return sorted(i for i, n in self._copies.items() if n > 1)

    def unexpected(self) -> list[int]:
        """Frame ids outside ``0 .. expected-1``."""
        if self.expected is None:
            return []
        return sorted(i for i in self._frames if not 0 <= i < self.expected)

    def complete(self) -> bool:
        """Every expected frame arrived (or, with ``expected`` unknown, at least one did)."""
        if self.expected is None:
            return bool(self._frames)
        return not self.missing()

    def frames(self) -> list[JsonObject]:
        """One result per frame, ordered by ``frame_id``."""
        return [self._frames[i] for i in sorted(self._frames)]

    def summary(self) -> JsonObject:
        frames = self.frames()
        errors: Counter[str] = Counter()
        classes: Counter[str] = Counter()
        totals: list[float] = []
        for result in [*frames, *self._unnumbered]:
            if result.get("status") == "error":
                error = result.get("error")
                code = error.get("code") if isinstance(error, dict) else None
                errors[str(code or "unknown")] += 1
            for det in result.get("detections") or ():
                if isinstance(det, dict):
                    classes[str(det.get("class_name", det.get("class_id", "?")))] += 1
            timings = result.get("timings_ms")
            total = timings.get("total") if isinstance(timings, dict) else None
            if isinstance(total, int | float):
                totals.append(float(total))
        ok = sum(1 for r in frames if r.get("status") == "ok")
        p50 = percentile(totals, 50)
        p95 = percentile(totals, 95)
        stamps = self._timestamps_ms
        return {
            "expected": self.expected,
            "received": self.received,
            "records": sum(self._copies.values()) + len(self._unnumbered),
            "complete": self.complete(),
            "missing": self.missing(),
            "duplicated": self.duplicated(),
            "unexpected": self.unexpected(),
            "without_frame_id": len(self._unnumbered),
            "ok": ok,
            "errors_by_code": dict(sorted(errors.items())),
            "detections": sum(classes.values()),
            "detections_by_class": dict(sorted(classes.items())),
            "latency_ms": {
                "p50": round(p50, 3) if p50 is not None else None,
                "p95": round(p95, 3) if p95 is not None else None,
                "source": "timings_ms.total",
            },
            "first_result_ms": min(stamps) if stamps else None,
            "last_result_ms": max(stamps) if stamps else None,
        }

    def document(self) -> JsonObject:
        """The video's JSON document: ``{video_id, frames, summary}``."""
        return {"video_id": self.video_id, "frames": self.frames(), "summary": self.summary()}


def collect(
    video_id: str, results: Iterable[JsonObject], expected: int | None = None
) -> JsonObject:
    """The document of ``video_id`` from ``results`` (records of other videos are skipped)."""
    collector = VideoCollector(video_id, expected)
    for result in results:
        collector.add(result)
    return collector.document()


def describe(summary: JsonObject) -> str:
    """One human line about completeness, e.g. ``complete: 120/120 frames, 0 duplicated``."""
    expected = summary.get("expected")
    received = summary.get("received", 0)
    of = f"{received}/{expected}" if expected is not None else f"{received}/?"
    parts = [f"{'complete' if summary.get('complete') else 'INCOMPLETE'}: {of} frames"]
    missing: list[int] = summary.get("missing") or []
    if missing:
        parts.append(f"{len(missing)} missing {_ids(missing)}")
    duplicated: list[int] = summary.get("duplicated") or []
    parts.append(f"{len(duplicated)} duplicated" + (f" {_ids(duplicated)}" if duplicated else ""))
    errors: dict[str, int] = summary.get("errors_by_code") or {}
    if errors:
        parts.append("errors " + ", ".join(f"{k}={v}" for k, v in errors.items()))
    return ", ".join(parts)


def _ids(ids: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"[{shown}{', …' if len(ids) > limit else ''}]"
