"""``inference-service submit VIDEO|FOLDER --video-id ID``: the upstream splitter.

Cuts a video (decoded with OpenCV) or takes a folder of images, stores each frame as a JPEG in the
bucket (``INFERENCE_S3_BUCKET``) under ``<ID>/<frame:06d>.jpg`` and publishes one task per frame to
the tasks topic, keyed by the video id (idempotent producer, so that a retry never reorders or
repeats a task). Frame ids count the submitted frames from 0; the source frame's index and time go
into the task's ``meta``. A task is published only after its frame is stored, and tasks go out in
frame order. Uploads run with bounded concurrency (``INFERENCE_S3_CONCURRENCY``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_service.commands.progress import Progress
from inference_service.errors import CommandError
from inference_service.settings import Settings, add_cli_flags, load_settings, overrides_from_args
from inference_service.vision import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from obstore.store import S3Store

log = logging.getLogger(__name__)

_JPEG_QUALITY = 90


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", type=Path, metavar="VIDEO|FOLDER", help="a video file or a folder of images"
    )
    parser.add_argument("--video-id", required=True, help="the video's id (Kafka key, S3 prefix)")
    parser.add_argument(
        "--fps", type=float, default=None, metavar="F",
        help="sample the video at F frames per second (default: every frame)",
    )  # fmt: skip
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="submit at most N frames"
    )
    add_cli_flags(parser)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(overrides_from_args(args))
    if not args.source.exists():
        print(f"inference-service submit: {args.source}: no such file or folder", file=sys.stderr)
        return 2
    if args.fps is not None and args.fps <= 0:
        print("inference-service submit: --fps must be > 0", file=sys.stderr)
        return 2
    if not args.video_id or "/" in args.video_id:
        print(
            "inference-service submit: --video-id must be non-empty, without '/'", file=sys.stderr
        )
        return 2
    frames = iter_frames(args.source, fps=args.fps, limit=args.limit)
    try:
        report = asyncio.run(submit(settings, args.video_id, frames))
    except CommandError as exc:
        print(f"inference-service submit: {exc}", file=sys.stderr)
        return 2
    print(report.summary(args.video_id, settings))
    return 0 if report.failed == 0 and report.frames > 0 else 1


# --------------------------------------------------------------------------------------------
# Frames


@dataclass(frozen=True, slots=True)
class SourceFrame:
    """One frame to submit, encoded."""

    jpeg: bytes
    source_index: int
    """The frame's index in the video (or the image's position in the folder)."""
    pts_ms: float | None
    """The frame's time in the video; None for images."""
    name: str
    """The file the frame came from."""


def iter_frames(
    source: Path, *, fps: float | None = None, limit: int | None = None
) -> Iterator[SourceFrame]:
    """The frames of a video (every one, or sampled at ``fps``) or the images of a folder."""
    frames = _frames_of_folder(source) if source.is_dir() else _frames_of_video(source, fps)
    yield from itertools.islice(frames, limit)


def _frames_of_folder(folder: Path) -> Iterator[SourceFrame]:
    import cv2
    import numpy as np

    images = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    for index, path in enumerate(images):
        data = path.read_bytes()
        if path.suffix.lower() not in (".jpg", ".jpeg"):
            image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                log.warning("submit: %s is not a readable image; skipped", path)
                continue
            data = _encode(image)
        yield SourceFrame(jpeg=data, source_index=index, pts_ms=None, name=path.name)


def _frames_of_video(path: Path, fps: float | None) -> Iterator[SourceFrame]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise CommandError(f"{path}: not a readable video")
        native = capture.get(cv2.CAP_PROP_FPS) or 0.0
        step_ms = 1000.0 / fps if fps else 0.0
        next_ms = 0.0
        index = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            pts = (
                index * 1000.0 / native if native > 0 else float(capture.get(cv2.CAP_PROP_POS_MSEC))
            )
            if not step_ms or pts + 1e-6 >= next_ms:
                next_ms += step_ms
                yield SourceFrame(
                    jpeg=_encode(image), source_index=index, pts_ms=round(pts, 3), name=path.name
                )
            index += 1
    finally:
        capture.release()


def _encode(image: Any) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise CommandError("JPEG encoding failed")
    return bytes(buf.tobytes())


# --------------------------------------------------------------------------------------------
# Upload and publish


@dataclass(slots=True)
class SubmitReport:
    """What a submission did."""

    frames: int = 0
    bytes: int = 0
    failed: int = 0
    elapsed_s: float = 0.0

    def summary(self, video_id: str, settings: Settings) -> str:
        rate = self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (
            f"submitted {video_id}: {self.frames} frames ({self.bytes / 1e6:.1f} MB of JPEG) to "
            f"s3://{settings.s3_bucket}/{video_id}/ and {settings.tasks_topic} in "
            f"{self.elapsed_s:.1f} s ({rate:.1f} frames/s)"
            + (f"; {self.failed} FAILED" if self.failed else "")
        )


def object_key(video_id: str, frame_id: int) -> str:
    """The S3 key of a submitted frame."""
    return f"{video_id}/{frame_id:06d}.jpg"


def task_record(video_id: str, frame_id: int, bucket: str, frame: SourceFrame) -> bytes:
    """The task's JSON value (SPEC.md, Tasks)."""
    meta: dict[str, Any] = {"source": frame.name, "source_index": frame.source_index}
    if frame.pts_ms is not None:
        meta["pts_ms"] = frame.pts_ms
    return json.dumps(
        {
            "video_id": video_id,
            "frame_id": frame_id,
            "s3_key": object_key(video_id, frame_id),
            "bucket": bucket,
            "task_id": f"{video_id}:{frame_id}",
            "meta": meta,
        },
        separators=(",", ":"),
    ).encode()


def s3_store(settings: Settings, bucket: str) -> S3Store:
    """An obstore S3 store for ``bucket`` as the service opens it, with patient retries for PUTs."""
    from inference_service.adapters.s3 import open_store

    return open_store(settings, bucket, timeout_s=60.0, max_retries=5, retry_timeout_s=60.0)


async def submit(settings: Settings, video_id: str, frames: Iterator[SourceFrame]) -> SubmitReport:
    """Store every frame, then publish its task, in frame order; the report says what happened."""
    import obstore
    from confluent_kafka import Producer

    from inference_service.adapters.kafka import writer_config

    bucket = settings.s3_bucket
    store = s3_store(settings, bucket)
    report = SubmitReport()
    failures: list[str] = []
    producer = Producer(writer_config(settings))

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    limit = asyncio.Semaphore(settings.s3_concurrency)

    async def upload(frame_id: int, frame: SourceFrame) -> None:
        async with limit:
            await obstore.put_async(store, object_key(video_id, frame_id), frame.jpeg)

    window: collections.deque[tuple[int, SourceFrame, asyncio.Task[None]]] = collections.deque()
    progress = Progress("submit")
    started = time.monotonic()

    async def publish_oldest() -> None:
        frame_id, frame, upload_task = window.popleft()
        try:
            await upload_task
        except Exception as exc:
            report.failed += 1
            log.error("submit: frame %d not stored: %s: %s", frame_id, type(exc).__name__, exc)
            return
        value = task_record(video_id, frame_id, bucket, frame)
        while True:
            try:
                producer.produce(
                    settings.tasks_topic,
                    key=video_id.encode(),
                    value=value,
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                await asyncio.to_thread(producer.poll, 0.1)
        producer.poll(0)
        report.frames += 1
        report.bytes += len(frame.jpeg)
        progress.update()

    try:
        frame_id = 0
        source = iter(frames)
        while True:
            frame = await asyncio.to_thread(next, source, None)
            if frame is None:
                break
            window.append((frame_id, frame, asyncio.ensure_future(upload(frame_id, frame))))
            frame_id += 1
            while len(window) >= settings.s3_concurrency * 2:
                await publish_oldest()
        while window:
            await publish_oldest()
        left = await asyncio.to_thread(producer.flush, 60.0)
    finally:
        for _fid, _frame, pending in window:
            pending.cancel()
        progress.close()
    if left:
        failures.append(f"{left} tasks not delivered within 60 s")
    if failures:
        report.failed += len(failures)
        for message in failures[:5]:
            log.error("submit: Kafka delivery failed: %s", message)
    report.elapsed_s = time.monotonic() - started
    return report
