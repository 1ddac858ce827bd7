"""Encoded frame bytes to a BGR ``uint8`` array, refusing bombs before any pixel is decoded.

JPEG (the splitter's format) is decoded with simplejpeg (libjpeg-turbo, accurate DCT and fancy
upsampling, as ``cv2.imread`` decodes it); PNG, BMP and WebP with ``cv2.imdecode``. For every format
the image size is read from the header first and a frame over ``max_pixels`` is refused with
:class:`FrameTooLargeError` before decoding, so a small file that claims to be 100k x 100k pixels
never allocates its pixels. Output matches ``cv2.imread(path)`` (flag ``IMREAD_COLOR``): three
channels in BGR order, grayscale replicated, alpha dropped; the reference (ultralytics) reads images
this way and converts BGR to RGB in its preprocessing.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np
import numpy.typing as npt
import simplejpeg

from inference_service.errors import FrameTooLargeError, UndecodableFrameError

ImageBGR = npt.NDArray[np.uint8]
"""An ``(height, width, 3)`` ``uint8`` image in BGR channel order."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
"""File suffixes of the image formats :func:`decode_image` reads (the one list of them)."""
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
"""File suffixes read as videos (OpenCV's ``VideoCapture``) by the commands and calibration."""

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_BMP_MAGIC = b"BM"
_RIFF_MAGIC = b"RIFF"
_WEBP_MAGIC = b"WEBP"
_SIMPLEJPEG_ERRORS = (ValueError, KeyError, IndexError, RuntimeError)
"""What simplejpeg raises for corrupt streams (ValueError mostly; KeyError for odd headers)."""


def image_size(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` read from the header of an encoded image, decoding no pixels.

    Raises :class:`UndecodableFrameError` for bytes that are not a supported image.
    """
    if not data:
        raise UndecodableFrameError("empty frame: 0 bytes")
    if data.startswith(_JPEG_MAGIC):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data, strict=False)
        except _SIMPLEJPEG_ERRORS:
            # libjpeg's own text may quote the stream's bytes: the message states the rule only.
            raise UndecodableFrameError(
                "corrupt or unsupported JPEG header: libjpeg-turbo cannot read it"
            ) from None
        return "jpeg", int(width), int(height)
    if data.startswith(_PNG_MAGIC):
        # The IHDR chunk comes first: length(4) "IHDR"(4) width(4) height(4), big-endian.
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise UndecodableFrameError("truncated PNG: no IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return "png", int(width), int(height)
    if data.startswith(_BMP_MAGIC) and len(data) >= 26:
        # BITMAPINFOHEADER (or later): width, height as little-endian int32 at offsets 18 and 22.
        width, height = struct.unpack("<ii", data[18:26])
        return "bmp", abs(int(width)), abs(int(height))
    if data.startswith(_RIFF_MAGIC) and data[8:12] == _WEBP_MAGIC:
        return ("webp", *_webp_size(data))
    raise UndecodableFrameError(
        "not a supported image: the bytes start with no JPEG, PNG, BMP or WebP signature"
    )


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    raise UndecodableFrameError("truncated or unsupported WebP header")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageBGR:
    """Decode an encoded frame to an ``(h, w, 3)`` BGR ``uint8`` array.

    Raises :class:`FrameTooLargeError` when ``data`` exceeds ``max_bytes`` or its header claims
    more than ``max_pixels`` pixels (checked before decoding), and :class:`UndecodableFrameError`
    for empty, truncated, corrupt or unsupported bytes.
    """
    if len(data) > max_bytes:
        raise FrameTooLargeError(f"frame is {len(data)} bytes; the limit is {max_bytes}")
    fmt, width, height = image_size(data)
    if width <= 0 or height <= 0:
        raise UndecodableFrameError(f"{fmt} header gives an empty image of {width}x{height}")
    if width * height > max_pixels:
        raise FrameTooLargeError(
            f"{fmt} frame of {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    image = _decode_jpeg(data) if fmt == "jpeg" else _decode_cv2(data, fmt)
    if image.shape[0] != height or image.shape[1] != width:
        raise UndecodableFrameError(
            f"{fmt} header says {width}x{height} but {image.shape[1]}x{image.shape[0]} decoded"
        )
    return image


def _decode_jpeg(data: bytes) -> ImageBGR:
    try:
        # strict: a truncated or corrupt stream raises instead of coming back grey-filled.
        image = simplejpeg.decode_jpeg(
            data, colorspace="BGR", fastdct=False, fastupsample=False, strict=True
        )
    except _SIMPLEJPEG_ERRORS as exc:
        message = str(exc)
        if "colorspace" in message.lower() or "CMYK" in message:
            # libjpeg-turbo converts neither CMYK nor YCCK to BGR; OpenCV does.
            return _decode_cv2(data, "jpeg")
        # libjpeg's text may quote the stream's bytes (markers, offsets): state the rule only.
        raise UndecodableFrameError(
            "corrupt or truncated JPEG: libjpeg-turbo refused the stream (strict decoding)"
        ) from None
    return np.ascontiguousarray(image)


def _decode_cv2(data: bytes, fmt: str) -> ImageBGR:
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UndecodableFrameError(
            f"corrupt or truncated {fmt.upper()}: OpenCV could not decode it"
        )
    return np.asarray(image, dtype=np.uint8)
