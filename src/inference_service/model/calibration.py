"""The frames an int8 model is calibrated on: ``INFERENCE_CALIBRATION`` to letterboxed inputs.

A source is a folder of images (sorted by name, sub-folders not read), a video file, or
``s3://bucket/prefix/`` (the objects under the prefix, in the listing's key order: frames the
splitter already put in the bucket, the best calibration set there is). Of the first
``10 × INFERENCE_CALIBRATION_FRAMES`` frames of a source, ``INFERENCE_CALIBRATION_FRAMES`` are
taken evenly spaced (a prefix that keeps growing keeps the same subset once it holds that many).
Each frame is decoded and letterboxed exactly as serving does (:mod:`inference_service.vision`).

Two steps, so that a start whose int8 model is cached already decodes nothing:

- :func:`locate_calibration` chooses the subset and fingerprints it by content without decoding
  (:attr:`CalibrationSource.digest`): the bytes of the chosen image files, the bytes of the video
  file, or the keys, ETags and sizes of the chosen S3 objects, together with the settings that
  shape the subset (``INFERENCE_CALIBRATION_FRAMES``, the frame-size limits, the scan factor).
  That digest keys the quantized model in the cache, with the model's sha256 and input shaping;
- :func:`load_calibration` decodes and letterboxes the chosen frames, only when the quantized
  model must be made. :attr:`CalibrationSet.digest` hashes the letterboxed pixels (logged and
  written in the quantizer's report).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from inference_service.errors import ConfigError, TaskError
from inference_service.settings import env_name
from inference_service.vision import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    ImageBGR,
    decode_image,
    letterbox_geometry,
    letterbox_image,
)

if TYPE_CHECKING:
    from inference_service.settings import Settings

log = logging.getLogger(__name__)

MIN_FRAMES = 32
"""Fewer calibration frames than this warn: the activation ranges are then poorly estimated."""
SCAN_FACTOR = 10
"""Frames are taken evenly spaced over the first ``SCAN_FACTOR × count`` of a source."""

FINGERPRINT_VERSION = 1
"""Bumped when what a calibration source's fingerprint covers, or how frames are chosen, changes."""

Letterboxed = npt.NDArray[np.uint8]
"""A ``(1, H, W, 3)`` BGR ``uint8`` network input, as the detector sends it to the backend."""


@dataclass(frozen=True, slots=True)
class CalibrationSource:
    """The frames a calibration source selects, identified by their content, not decoded yet."""

    source: str
    """The setting's value, for messages."""
    kind: str
    """``folder``, ``video`` or ``s3``."""
    items: tuple[str, ...]
    """The chosen image files (folder), the video file, or the chosen object keys (s3)."""
    digest: str
    """sha256 over the chosen content and the settings that shape the subset."""
    bucket: str = ""
    """The bucket of an ``s3`` source."""


@dataclass(frozen=True, slots=True)
class CalibrationSet:
    """Letterboxed calibration inputs and what identifies them."""

    source: str
    """The setting's value, for messages."""
    inputs: tuple[Letterboxed, ...]
    digest: str
    """sha256 over every input's shape and pixels, in order."""


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them when ``total <= count``),
    first index 0, ascending, no repeats."""
    if total <= count:
        return list(range(total))
    return sorted({(i * total) // count for i in range(count)})


def digest_of(inputs: Sequence[Letterboxed]) -> str:
    """sha256 over the shapes and pixels of ``inputs``."""
    h = hashlib.sha256()
    for array in inputs:
        h.update(repr(tuple(array.shape)).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def locate_calibration(settings: Settings) -> CalibrationSource:
    """The calibration subset that ``settings`` name, fingerprinted by content without decoding.

    Raises :class:`ConfigError` naming ``INFERENCE_CALIBRATION`` when it is unset, missing, of
    no known kind, or holds no frame.
    """
    source = settings.calibration
    name = env_name("calibration")
    if source is None:
        raise ConfigError(
            f"{env_name('precision')}=int8 needs frames to calibrate on: set {name} to a folder "
            "of images, a video file or s3://bucket/prefix/ (frames like those the service will "
            f"see), or give {env_name('model')} an already quantized OpenVINO IR"
        )
    count = settings.calibration_frames
    h = hashlib.sha256()
    shaping = {
        "version": FINGERPRINT_VERSION,
        "calibration_frames": count,
        "scan_factor": SCAN_FACTOR,
        "max_frame_bytes": settings.max_frame_bytes,
        "max_frame_pixels": settings.max_frame_pixels,
    }
    if source.startswith("s3://"):
        bucket, listed = _s3_listing(source, count, settings)
        chosen = [listed[i] for i in evenly_spaced(len(listed), count)]
        h.update(json.dumps({**shaping, "kind": "s3"}, sort_keys=True).encode())
        for key, e_tag, size in chosen:
            h.update(json.dumps([key, e_tag, size]).encode())
        located = CalibrationSource(
            source, "s3", tuple(key for key, _, _ in chosen), h.hexdigest(), bucket
        )
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )[: SCAN_FACTOR * count]
            kind, paths = "folder", [files[i] for i in evenly_spaced(len(files), count)]
        elif path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            kind, paths = "video", [path]
        elif path.is_file():
            raise ConfigError(
                f"{name}={source}: not a folder, a video ({', '.join(sorted(VIDEO_SUFFIXES))}) "
                "or s3://bucket/prefix/"
            )
        else:
            raise ConfigError(
                f"{name}={source}: no such file or directory (working directory {Path.cwd()})"
            )
        h.update(json.dumps({**shaping, "kind": kind}, sort_keys=True).encode())
        for file in paths:
            h.update(_file_digest(file, name, source))
        located = CalibrationSource(source, kind, tuple(map(str, paths)), h.hexdigest())
    if not located.items:
        raise ConfigError(f"{name}={source}: no readable frame found (images: jpg, png, bmp, webp)")
    return located


def _file_digest(path: Path, name: str, source: str) -> bytes:
    """sha256 of a file's bytes (its length prefixed, so that files cannot run into each other)."""
    try:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").digest()
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"{name}={source}: cannot read {path}: {exc.strerror or exc}") from None
    return size.to_bytes(8, "little") + digest


def load_calibration(
    settings: Settings,
    imgsz: tuple[int, int],
    stride: int,
    *,
    dynamic: bool,
    located: CalibrationSource | None = None,
) -> CalibrationSet:
    """The calibration set that ``settings`` name (``located``: as :func:`locate_calibration`
    chose it already), decoded and letterboxed for a model of ``imgsz``/``stride``.

    Raises :class:`ConfigError` naming ``INFERENCE_CALIBRATION`` when it is unset, missing, of
    no known kind, or holds no readable frame.
    """
    if located is None:
        located = locate_calibration(settings)
    source = located.source
    name = env_name("calibration")
    count = settings.calibration_frames
    images = _frames(located, count, settings)
    inputs: list[Letterboxed] = []
    for image in images:
        geo = letterbox_geometry((image.shape[0], image.shape[1]), imgsz, stride, auto=dynamic)
        inputs.append(letterbox_image(image, geo)[np.newaxis])
    if not inputs:
        raise ConfigError(f"{name}={source}: no readable frame found (images: jpg, png, bmp, webp)")
    if len(inputs) < MIN_FRAMES:
        log.warning(
            "%s=%s: only %d calibration frames (at least %d recommended, %s=%d asked for); the "
            "int8 model may lose accuracy",
            name,
            source,
            len(inputs),
            MIN_FRAMES,
            env_name("calibration_frames"),
            count,
        )
    calibration = CalibrationSet(source, tuple(inputs), digest_of(inputs))
    log.info(
        "calibration: %d frames from %s (sha256 %s)",
        len(inputs),
        source,
        calibration.digest[:12],
    )
    return calibration


def _frames(located: CalibrationSource, count: int, settings: Settings) -> list[ImageBGR]:
    if located.kind == "s3":
        return list(_decoded(_s3_objects(located, settings), located.source, settings))
    if located.kind == "video":
        return _video_frames(Path(located.items[0]), count)
    objects = ((p, Path(p).read_bytes()) for p in located.items)
    return list(_decoded(objects, located.source, settings))


def _decoded(
    objects: Iterator[tuple[str, bytes]], source: str, settings: Settings
) -> Iterator[ImageBGR]:
    for where, data in objects:
        try:
            yield decode_image(
                data, max_bytes=settings.max_frame_bytes, max_pixels=settings.max_frame_pixels
            )
        except TaskError as exc:  # one bad file does not spoil the set
            log.warning("calibration: skipping %s from %s: %s", where, source, exc)


def _video_frames(path: Path, count: int) -> list[ImageBGR]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ConfigError(f"{env_name('calibration')}={path}: OpenCV cannot open the video")
    try:
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))  # 0 when the container does not say
        scanned = min(total, SCAN_FACTOR * count) if total > 0 else count
        wanted = set(evenly_spaced(scanned, count))
        frames: list[ImageBGR] = []
        for index in range(scanned):
            if not capture.grab():
                break
            if index in wanted:
                ok, frame = capture.retrieve()
                if ok and frame is not None and frame.ndim == 3:
                    frames.append(np.ascontiguousarray(frame, dtype=np.uint8))
        return frames
    finally:
        capture.release()


def _s3_listing(
    source: str, count: int, settings: Settings
) -> tuple[str, list[tuple[str, str, int]]]:
    """The bucket and the ``(key, ETag, size)`` of the images among the first
    ``SCAN_FACTOR × count`` objects under an ``s3://bucket/prefix/``, in key order."""
    import obstore

    # The adapter owns how a store is configured (endpoint, region, credentials); calibration
    # only reads through it, at start-up.
    from inference_service.adapters.s3 import open_store

    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    name = env_name("calibration")
    if not bucket:
        raise ConfigError(f"{name}={source}: expected s3://bucket/prefix/")
    store = open_store(settings, bucket)
    listed: list[tuple[str, str, int]] = []
    try:
        for batch in obstore.list(store, prefix=prefix or None, chunk_size=1000):
            listed.extend(
                (str(meta["path"]), str(meta.get("e_tag") or ""), int(meta["size"]))
                for meta in batch
                if Path(str(meta["path"])).suffix.lower() in IMAGE_SUFFIXES
            )
    except Exception as exc:  # obstore raises its own error tree, untyped here
        raise ConfigError(f"{name}={source}: cannot list the objects: {exc}") from exc
    return bucket, sorted(listed)[: SCAN_FACTOR * count]


def _s3_objects(located: CalibrationSource, settings: Settings) -> Iterator[tuple[str, bytes]]:
    """``(s3 url, bytes)`` of the objects :func:`locate_calibration` chose."""
    import obstore

    from inference_service.adapters.s3 import open_store

    bucket = located.bucket
    store = open_store(settings, bucket)
    for key in located.items:
        try:
            data = bytes(obstore.get(store, key).bytes())
        except Exception as exc:  # a frame deleted since the listing: skip it
            log.warning("calibration: cannot read s3://%s/%s: %s", bucket, key, exc)
            continue
        yield f"s3://{bucket}/{key}", data
