"""Assembling a video's results and judging its completeness (collecting.py, report.py)."""

from __future__ import annotations

from typing import Any

import pytest

from inference_service.commands.collecting import VideoCollector, collect, describe, percentile
from inference_service.commands.report import render_html


def result(frame: int | None, video: str = "v", status: str = "ok", total: float = 10.0,
           classes: tuple[str, ...] = (), code: str | None = None) -> dict[str, Any]:  # fmt: skip
    r: dict[str, Any] = {
        "video_id": video,
        "frame_id": frame,
        "task_id": f"{video}:{frame}",
        "status": status,
        "detections": [
            {
                "class_id": i,
                "class_name": c,
                "confidence": 0.9,
                "bbox": {"x1": 0, "y1": 0, "x2": 1, "y2": 1},
            }
            for i, c in enumerate(classes)
        ],
        "timings_ms": {"fetch": 1.0, "total": total},
    }
    if code is not None:
        r["error"] = {"code": code, "message": "bad"}
    return r


def test_percentile_interpolates_and_handles_edges() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_complete_video_sorted_by_frame_and_other_videos_ignored() -> None:
    records = [result(2), result(0, video="other"), result(1), result(0)]
    doc = collect("v", records, expected=3)
    assert [r["frame_id"] for r in doc["frames"]] == [0, 1, 2]
    s = doc["summary"]
    assert s["complete"] and s["received"] == 3 and s["records"] == 3
    assert s["missing"] == [] and s["duplicated"] == []
    assert describe(s).startswith("complete: 3/3 frames")


def test_missing_and_duplicated_frames_are_reported() -> None:
    c = VideoCollector("v", expected=5)
    for r in [result(0), result(1), result(1), result(3), result(1), result(4)]:
        c.add(r)
    s = c.summary()
    assert not c.complete() and not c.done()
    assert s["missing"] == [2]
    assert s["duplicated"] == [1]
    assert s["received"] == 4 and s["records"] == 6
    assert len(c.frames()) == 4  # one result per frame
    line = describe(s)
    assert line.startswith("INCOMPLETE: 4/5 frames") and "1 missing [2]" in line
    assert "1 duplicated [1]" in line


def test_first_copy_of_a_frame_is_kept() -> None:
    c = VideoCollector("v", expected=1)
    first = result(0, total=1.0)
    c.add(first)
    c.add(result(0, total=99.0))
    assert c.frames() == [first]


def test_errors_detections_and_latency_are_summarised() -> None:
    records = [
        result(0, classes=("disc", "star"), total=10.0),
        result(1, classes=("disc",), total=20.0),
        result(2, status="error", code="frame_not_found", total=30.0),
        result(None, status="error", code="invalid_task", total=40.0),
    ]
    s = collect("v", records, expected=3)["summary"]
    assert s["complete"]
    assert s["ok"] == 2
    assert s["errors_by_code"] == {"frame_not_found": 1, "invalid_task": 1}
    assert s["without_frame_id"] == 1
    assert s["detections"] == 3 and s["detections_by_class"] == {"disc": 2, "star": 1}
    assert s["latency_ms"]["p50"] == pytest.approx(25.0)
    assert s["latency_ms"]["p95"] == pytest.approx(38.5)


def test_unknown_expectation_and_unexpected_ids() -> None:
    c = VideoCollector("v")
    assert not c.complete() and not c.done()
    c.add(result(7))
    assert c.complete() and not c.done()  # done needs a known count
    c2 = VideoCollector("v", expected=2)
    for r in (result(0), result(1), result(5)):
        c2.add(r)
    assert c2.complete() and c2.summary()["unexpected"] == [5]


def test_zero_expected_frames_is_done_at_once() -> None:
    assert VideoCollector("v", expected=0).done()


def test_timestamps_give_first_and_last_result() -> None:
    c = VideoCollector("v", expected=2)
    c.add(result(1), timestamp_ms=2000)
    c.add(result(0), timestamp_ms=1500)
    s = c.summary()
    assert (s["first_result_ms"], s["last_result_ms"]) == (1500, 2000)


def test_html_has_one_row_per_frame_and_escapes() -> None:
    doc = collect("<v>", [result(i, video="<v>", classes=("disc",)) for i in range(4)], expected=5)
    page = render_html(doc, preview="preview.gif", frame_images={0: "frames/000000.jpg"},
                       facts={"throughput": "1 frame/s"})  # fmt: skip
    assert page.count('<tr class="frame"') == 4
    assert "&lt;v&gt;" in page and "<v>" not in page
    assert 'src="preview.gif"' in page and 'src="frames/000000.jpg"' in page
    assert "INCOMPLETE" in page and "throughput" in page
