"""The detect command's pure parts: input expansion and the result record."""

from __future__ import annotations

from pathlib import Path

from inference_service.commands.detect import Frame, Source, expand_paths, frame_result
from inference_service.domain import BBox, Detection, FrameDetections, ImageSize, ModelInfo
from inference_service.errors import FrameNotFoundError
from tests.conftest import CONF, IOU

INFO = ModelInfo(name="m.pt", sha256="a" * 64, imgsz=(640, 640), conf=CONF, iou=IOU, runtime="x")


def test_folders_expand_to_sorted_images_and_videos(tmp_path: Path) -> None:
    for name in ("b.jpg", "a.PNG", "c.mp4", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jpg").write_bytes(b"x")
    odd = tmp_path / "frame.raw"
    flat = list(expand_paths([tmp_path, odd], recursive=False))
    assert [(s.path.name, s.kind) for s in flat] == [
        ("a.PNG", "image"),
        ("b.jpg", "image"),
        ("c.mp4", "video"),
        ("frame.raw", "image"),
    ]
    deep = list(expand_paths([tmp_path], recursive=True))
    assert [s.path.name for s in deep] == ["a.PNG", "b.jpg", "c.mp4", "d.jpg"]


def test_result_of_a_video_frame() -> None:
    found = FrameDetections(
        ImageSize(64, 48),
        (Detection(1, "square", 0.9, BBox(1, 2, 3, 4)),),
        1.0,
        2.0,
        3.0,
        4.0,
    )
    frame = Frame(Source(Path("/v/clip.mp4"), "video"), 12, read_ms=0.5)
    out = frame_result(frame, INFO, found, None, 11.0).to_dict()
    assert out["video_id"] == "clip"
    assert out["frame_id"] == 12
    assert out["task_id"] == "clip:12"
    assert out["bucket"] == ""
    assert out["s3_key"] == "/v/clip.mp4"
    assert out["source"] == {"path": "/v/clip.mp4", "frame_index": 12}
    assert out["status"] == "ok"
    assert out["timings_ms"] == {
        "fetch": 0.5,
        "decode": 1.0,
        "preprocess": 2.0,
        "inference": 3.0,
        "postprocess": 4.0,
        "total": 11.0,
    }
    assert out["detections"][0]["class_name"] == "square"


def test_error_result_of_a_missing_file() -> None:
    frame = Frame(Source(Path("gone.jpg"), "image"), 0)
    error = FrameNotFoundError("gone.jpg: no such file")
    out = frame_result(frame, INFO, None, error, 0.1).to_dict()
    assert out["status"] == "error"
    assert out["error"] == {"code": "frame_not_found", "message": "gone.jpg: no such file"}
    assert out["image"] is None
    assert set(out["timings_ms"]) == {"fetch", "decode", "inference", "total"}
