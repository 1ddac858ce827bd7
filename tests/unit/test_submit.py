"""The splitter's frames and tasks (``inference-service submit``), without Kafka or S3."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from inference_service.commands.submit import SourceFrame, iter_frames, object_key, task_record


def write_video(path: Path, frames: int, fps: float = 10.0) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (64, 48))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((48, 64, 3), i * 10, dtype=np.uint8))
    writer.release()


def test_video_every_frame_sampled_and_limited(tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    write_video(video, 20, fps=10.0)
    every = list(iter_frames(video))
    assert [f.source_index for f in every] == list(range(20))
    assert every[3].pts_ms == 300.0 and every[0].name == "v.mp4"
    decoded = cv2.imdecode(np.frombuffer(every[0].jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape == (48, 64, 3)
    sampled = list(iter_frames(video, fps=2.5))  # every 4th frame of a 10 fps video
    assert [f.source_index for f in sampled] == [0, 4, 8, 12, 16]
    assert [f.source_index for f in iter_frames(video, fps=2.5, limit=2)] == [0, 4]


def test_folder_images_sorted_png_reencoded_others_skipped(tmp_path: Path) -> None:
    image = np.zeros((10, 12, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "b.png"), image)
    cv2.imwrite(str(tmp_path / "a.jpg"), image)
    (tmp_path / "notes.txt").write_text("not an image")
    frames = list(iter_frames(tmp_path))
    assert [f.name for f in frames] == ["a.jpg", "b.png"]
    assert all(f.jpeg[:2] == b"\xff\xd8" for f in frames)  # every frame goes out as JPEG


def test_task_record_is_a_spec_task() -> None:
    frame = SourceFrame(jpeg=b"", source_index=7, pts_ms=280.0, name="clip.mp4")
    task = json.loads(task_record("cam-1", 3, "frames", frame))
    assert task == {
        "video_id": "cam-1", "frame_id": 3, "s3_key": "cam-1/000003.jpg", "bucket": "frames",
        "task_id": "cam-1:3", "meta": {"source": "clip.mp4", "source_index": 7, "pts_ms": 280.0},
    }  # fmt: skip
    assert object_key("v", 12) == "v/000012.jpg"
