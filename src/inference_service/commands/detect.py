"""``inference-service detect PATH…``: the service's detector on local images, folders and videos.

No Kafka, no S3: every frame goes through the same :class:`~inference_service.pool.DetectorPool`
as in ``serve``, and one result per frame (SPEC.md's result shape, plus ``source``) is written as a
JSON line, in input order. Video frames travel to the workers as raw decoded buffers (no JPEG
re-encode: faster, and the detector sees the exact decoded pixels). An input that cannot be read
gets an error result line and a message; the exit status is 1 once everything else is done.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from inference_service.commands.progress import Progress
from inference_service.domain import FrameDetections, ModelInfo, Result
from inference_service.errors import FrameNotFoundError, TaskError, UndecodableFrameError
from inference_service.pool import DetectorPool
from inference_service.results import Identity, build_result, stage_timings
from inference_service.settings import Settings, add_cli_flags, load_settings, overrides_from_args
from inference_service.vision import IMAGE_SUFFIXES, VIDEO_SUFFIXES

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", type=Path, help="images, folders or video files"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write JSON lines here instead of stdout"
    )
    parser.add_argument(
        "--annotate", type=Path, default=None, metavar="DIR", help="write annotated JPEGs to DIR"
    )
    parser.add_argument(
        "--recursive", action="store_true", help="descend into sub-folders of folder arguments"
    )
    add_cli_flags(parser)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(overrides_from_args(args))
    sources = list(expand_paths(args.paths, recursive=args.recursive))
    if not sources:
        print("inference-service detect: no images or videos found", file=sys.stderr)
        return 1
    if args.annotate is not None:
        args.annotate.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        out: IO[str] = (
            stack.enter_context(args.out.open("w", encoding="utf-8"))
            if args.out is not None
            else sys.stdout
        )
        failures = asyncio.run(_detect_all(settings, sources, out, args.annotate))
    for message in failures:
        print(f"inference-service detect: {message}", file=sys.stderr)
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True)
class Source:
    """One input file and how to read it."""

    path: Path
    kind: str
    """``image`` or ``video``."""


def expand_paths(paths: list[Path], *, recursive: bool) -> Iterator[Source]:
    """Files named on the command line as given; folders as their images and videos, sorted.

    A file with an unknown suffix is tried as an image (its error result says why it failed).
    """
    for path in paths:
        if path.is_dir():
            found = path.rglob("*") if recursive else path.glob("*")
            for child in sorted(p for p in found if p.is_file()):
                suffix = child.suffix.lower()
                if suffix in IMAGE_SUFFIXES:
                    yield Source(child, "image")
                elif suffix in VIDEO_SUFFIXES:
                    yield Source(child, "video")
        else:
            kind = "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"
            yield Source(path, kind)


@dataclass(slots=True)
class Frame:
    """One frame to detect: its identity and either encoded bytes or a decoded array."""

    source: Source
    index: int
    data: bytes | None = None
    array: npt.NDArray[np.uint8] | None = None
    error: TaskError | None = None
    read_ms: float = 0.0


async def read_frames(sources: list[Source]) -> AsyncIterator[Frame]:
    """Every frame of every source, in order; reading happens off the event loop."""
    for source in sources:
        if source.kind == "image":
            yield await asyncio.to_thread(_read_image, source)
        else:
            async for frame in _read_video(source):
                yield frame


def _read_image(source: Source) -> Frame:
    t0 = time.perf_counter()
    try:
        data = source.path.read_bytes()
    except FileNotFoundError:
        return Frame(source, 0, error=FrameNotFoundError(f"{source.path}: no such file"))
    except OSError as exc:
        return Frame(source, 0, error=FrameNotFoundError(f"{source.path}: {exc.strerror}"))
    return Frame(source, 0, data=data, read_ms=(time.perf_counter() - t0) * 1000)


async def _read_video(source: Source) -> AsyncIterator[Frame]:
    import cv2

    if not source.path.is_file():
        yield Frame(source, 0, error=FrameNotFoundError(f"{source.path}: no such file"))
        return
    capture = await asyncio.to_thread(cv2.VideoCapture, str(source.path))
    try:
        if not capture.isOpened():
            yield Frame(
                source, 0, error=UndecodableFrameError(f"{source.path}: not a readable video")
            )
            return
        index = 0
        while True:
            t0 = time.perf_counter()
            ok, image = await asyncio.to_thread(capture.read)
            if not ok:
                break
            read_ms = (time.perf_counter() - t0) * 1000
            yield Frame(source, index, array=cast("npt.NDArray[np.uint8]", image), read_ms=read_ms)
            index += 1
        if index == 0:
            yield Frame(source, 0, error=UndecodableFrameError(f"{source.path}: no frames decoded"))
    finally:
        capture.release()


def _count_frames(sources: list[Source]) -> int:
    import cv2

    total = 0
    for source in sources:
        if source.kind == "image":
            total += 1
            continue
        capture = cv2.VideoCapture(str(source.path))
        total += max(1, int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
        capture.release()
    return total


# --------------------------------------------------------------------------------------------
# Results


def frame_result(
    frame: Frame,
    info: ModelInfo,
    found: FrameDetections | None,
    error: TaskError | None,
    total_ms: float,
) -> Result:
    """The result record of one frame (``source`` added beside SPEC.md's fields)."""
    path = str(frame.source.path)
    stem = frame.source.path.stem
    identity = Identity(f"{stem}:{frame.index}", stem, frame.index, "", path)
    timings = stage_timings(found, fetch_ms=frame.read_ms, total_ms=total_ms)
    return build_result(
        identity,
        info,
        timings,
        found=found if error is None else None,
        error=error,
        extra={"source": {"path": path, "frame_index": frame.index}},
    )


def _annotation_path(directory: Path, frame: Frame) -> Path:
    if frame.source.kind == "video":
        return directory / f"{frame.source.path.stem}_{frame.index:06d}.jpg"
    return directory / f"{frame.source.path.stem}.jpg"


def _write_annotation(
    directory: Path, frame: Frame, found: FrameDetections, settings: Settings
) -> None:
    import cv2

    from inference_service.vision.decode import decode_image
    from inference_service.vision.draw import annotate

    image = frame.array
    if image is None:
        assert frame.data is not None
        image = decode_image(
            frame.data, max_bytes=settings.max_frame_bytes, max_pixels=settings.max_frame_pixels
        )
    cv2.imwrite(str(_annotation_path(directory, frame)), annotate(image, found.detections))


# --------------------------------------------------------------------------------------------
# The run


async def _detect_all(
    settings: Settings, sources: list[Source], out: IO[str], annotate_dir: Path | None
) -> list[str]:
    failures: list[str] = []
    total = await asyncio.to_thread(_count_frames, sources)
    async with DetectorPool(settings) as pool:
        window = pool.processes * 8
        progress = Progress("detect", total)
        pending: collections.deque[tuple[Frame, float, Awaitable[FrameDetections] | None]] = (
            collections.deque()
        )

        async def finish_one() -> None:
            frame, started, task = pending.popleft()
            found: FrameDetections | None = None
            error = frame.error
            if task is not None:
                try:
                    found = await task
                except TaskError as exc:
                    error = exc
            total_ms = (time.perf_counter() - started) * 1000 + frame.read_ms
            result = frame_result(frame, pool.info, found, error, total_ms)
            out.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
            if error is not None:
                where = str(frame.source.path)
                if frame.source.kind == "video" and frame.index:
                    where += f" (frame {frame.index})"
                failures.append(f"{where}: {error.code}: {error.message}")
            elif annotate_dir is not None and found is not None:
                await asyncio.to_thread(_write_annotation, annotate_dir, frame, found, settings)
            progress.update()

        try:
            async for frame in read_frames(sources):
                task: Awaitable[FrameDetections] | None = None
                if frame.error is None:
                    coro = (
                        pool.detect_array(frame.array)
                        if frame.array is not None
                        else pool.detect(frame.data or b"")
                    )
                    task = asyncio.ensure_future(coro)
                pending.append((frame, time.perf_counter(), task))
                if frame.array is not None and annotate_dir is None:
                    frame.array = None  # sent already; do not hold decoded frames in the window
                while len(pending) >= window:
                    await finish_one()
            while pending:
                await finish_one()
        finally:
            progress.close()
            out.flush()
    return failures
