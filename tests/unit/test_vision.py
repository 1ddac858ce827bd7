"""Decode, letterbox, NMS and post-processing, drawing: numpy/OpenCV only, no model."""

from __future__ import annotations

import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from inference_service.domain import BBox, Detection
from inference_service.errors import FrameTooLargeError, UndecodableFrameError
from inference_service.vision import (
    PAD_VALUE,
    decode_image,
    image_size,
    letterbox,
    letterbox_geometry,
    nms,
    postprocess,
)
from inference_service.vision.draw import annotate
from tests.conftest import CONF, IOU, MAX_DETECTIONS

BIG = 10**9


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def _photo_like(h: int = 360, w: int = 640) -> np.ndarray:
    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (9, 9), 3)
    cv2.circle(img, (w // 3, h // 2), h // 5, (20, 200, 40), -1)
    return img


# --- decode ---------------------------------------------------------------------------------


def test_decode_jpeg_matches_opencv() -> None:
    data = _jpeg(_photo_like())
    ours = decode_image(data, max_bytes=BIG, max_pixels=BIG)
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert ref is not None
    assert ours.shape == ref.shape == (360, 640, 3)
    assert ours.dtype == np.uint8 and ours.flags.c_contiguous
    assert int(np.abs(ours.astype(int) - ref.astype(int)).max()) <= 1


def test_decode_grayscale_and_alpha_give_three_channels_like_imread() -> None:
    gray = _photo_like()[:, :, 1].copy()
    for data in (_jpeg(gray), _png(gray)):
        ours = decode_image(data, max_bytes=BIG, max_pixels=BIG)
        ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert ref is not None
        assert ours.shape == (360, 640, 3)
        assert int(np.abs(ours.astype(int) - ref.astype(int)).max()) <= 1
    bgra = np.dstack([_photo_like(), np.full((360, 640), 128, np.uint8)])
    ours = decode_image(_png(bgra), max_bytes=BIG, max_pixels=BIG)
    assert ours.shape == (360, 640, 3)
    assert np.array_equal(ours, bgra[:, :, :3])


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"hello, world, not an image", "not a supported image"),
        (b"\xff\xd8\xff\xe0garbage", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00", "PNG"),
    ],
)
def test_decode_refuses_non_images(data: bytes, fragment: str) -> None:
    with pytest.raises(UndecodableFrameError, match=fragment):
        decode_image(data, max_bytes=BIG, max_pixels=BIG)


def test_decode_refuses_truncated_jpeg_and_png() -> None:
    img = _photo_like()
    for data in (_jpeg(img), _png(img)):
        with pytest.raises(UndecodableFrameError):
            decode_image(data[: len(data) // 2], max_bytes=BIG, max_pixels=BIG)


def test_decode_refuses_too_many_bytes() -> None:
    data = _jpeg(_photo_like())
    with pytest.raises(FrameTooLargeError, match="bytes"):
        decode_image(data, max_bytes=len(data) - 1, max_pixels=BIG)


def _png_bomb(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (8-bit grey), with a tiny deflate stream."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 64, 9)  # the first rows only: enough to claim it
    sig = b"\x89PNG\r\n\x1a\n"
    return sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_decode_refuses_png_bomb_before_decoding() -> None:
    data = _png_bomb(100_000, 100_000)
    assert len(data) < 20_000
    assert image_size(data) == ("png", 100_000, 100_000)
    start = time.perf_counter()
    with pytest.raises(FrameTooLargeError, match="100000x100000"):
        decode_image(data, max_bytes=BIG, max_pixels=50_000_000)
    assert time.perf_counter() - start < 0.1


def test_decode_refuses_jpeg_bomb_before_decoding() -> None:
    data = bytearray(_jpeg(_photo_like(64, 64)))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)  # height, width
    with pytest.raises(FrameTooLargeError, match="60000x60000"):
        decode_image(bytes(data), max_bytes=BIG, max_pixels=50_000_000)


def test_decode_pixel_limit_applies_to_real_frames() -> None:
    data = _jpeg(_photo_like(100, 100))
    with pytest.raises(FrameTooLargeError):
        decode_image(data, max_bytes=BIG, max_pixels=9_999)
    assert decode_image(data, max_bytes=BIG, max_pixels=10_000).shape == (100, 100, 3)


# --- letterbox ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_hw", "target", "auto", "input_hw", "resized_hw", "pads"),
    [
        ((720, 1280), 640, True, (384, 640), (360, 640), (12, 12, 0, 0)),  # 16:9 video frame
        ((1280, 720), 640, True, (640, 384), (640, 360), (0, 0, 12, 12)),  # portrait
        ((720, 1280), 320, True, (192, 320), (180, 320), (6, 6, 0, 0)),
        ((720, 1280), 640, False, (640, 640), (360, 640), (140, 140, 0, 0)),  # static model
        ((1, 1), 640, True, (640, 640), (640, 640), (0, 0, 0, 0)),  # tiny: scaled up
        ((7, 3000), 640, True, (32, 640), (1, 640), (15, 16, 0, 0)),  # thin: >= 1 pixel kept
        ((481, 643), 640, True, (480, 640), (479, 640), (0, 1, 0, 0)),  # odd: round(d/2 -/+ 0.1)
        ((333, 334), 320, True, (320, 320), (319, 320), (0, 1, 0, 0)),
    ],
)
def test_letterbox_geometry(
    image_hw: tuple[int, int],
    target: int,
    auto: bool,
    input_hw: tuple[int, int],
    resized_hw: tuple[int, int],
    pads: tuple[int, int, int, int],
) -> None:
    geo = letterbox_geometry(image_hw, (target, target), 32, auto=auto)
    assert geo.input_hw == input_hw
    assert geo.resized_hw == resized_hw
    assert (geo.top, geo.bottom, geo.left, geo.right) == pads
    assert geo.input_hw[0] % 32 == 0 or not auto
    assert geo.input_hw[1] % 32 == 0 or not auto


def test_letterbox_tensor_layout_rgb_scale_and_padding() -> None:
    image = np.zeros((720, 1280, 3), np.uint8)
    image[:, :] = (255, 0, 0)  # pure blue in BGR
    tensor, geo = letterbox(image, (640, 640), 32)
    assert tensor.shape == (1, 3, 384, 640)
    assert tensor.dtype == np.float32 and tensor.flags.c_contiguous
    inner = tensor[0, :, geo.top : geo.top + geo.resized_hw[0], :]
    assert np.all(inner[0] == 0.0) and np.all(inner[1] == 0.0) and np.all(inner[2] == 1.0)
    assert PAD_VALUE == 114  # the reference's grey
    pad = np.float32(PAD_VALUE) / np.float32(255)
    assert np.all(tensor[0, :, : geo.top, :] == pad)
    assert np.all(tensor[0, :, geo.top + geo.resized_hw[0] :, :] == pad)


def test_letterbox_matches_opencv_resize_exactly() -> None:
    image = _photo_like(721, 1283)
    tensor, geo = letterbox(image, (640, 640), 32)
    h, w = geo.resized_hw
    expected = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
    got = tensor[0, :, geo.top : geo.top + h, geo.left : geo.left + w].transpose(1, 2, 0)
    assert np.array_equal(got, expected.astype(np.float32) / np.float32(255))


# --- NMS and post-processing ----------------------------------------------------------------


def _boxes(*rows: tuple[float, float, float, float]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)


def test_nms_suppresses_overlap_above_threshold_keeps_best() -> None:
    boxes = _boxes((0, 0, 10, 10), (1, 0, 11, 10), (50, 50, 60, 60))
    scores = np.asarray([0.8, 0.9, 0.5], np.float32)
    assert nms(boxes, scores, IOU, MAX_DETECTIONS).tolist() == [1, 2]


def test_nms_iou_equal_to_threshold_is_kept() -> None:
    boxes = _boxes((0, 0, 10, 10), (0, 0, 10, 4.5))  # IoU exactly 0.45
    scores = np.asarray([0.9, 0.8], np.float32)
    assert nms(boxes, scores, 0.45, MAX_DETECTIONS).tolist() == [0, 1]
    assert nms(boxes, scores, 0.44, MAX_DETECTIONS).tolist() == [0]


def test_nms_chain_suppression_is_greedy() -> None:
    # B overlaps A and C; A beats B, so B is gone and C survives although B would suppress C.
    boxes = _boxes((0, 0, 10, 10), (3, 0, 13, 10), (6, 0, 16, 10))
    scores = np.asarray([0.9, 0.8, 0.7], np.float32)
    assert nms(boxes, scores, IOU, MAX_DETECTIONS).tolist() == [0, 2]


def test_nms_max_det() -> None:
    boxes = np.asarray([(i * 20, 0, i * 20 + 10, 10) for i in range(50)], np.float32)
    scores = np.linspace(0.9, 0.3, 50, dtype=np.float32)
    assert nms(boxes, scores, IOU, 7).tolist() == list(range(7))


def _head(
    rows: list[tuple[float, float, float, float, int, float]], nc: int = 3, pad: int = 10
) -> np.ndarray:
    """A (1, 4 + nc, N) head from (cx, cy, w, h, class, score) rows plus empty anchors."""
    head = np.zeros((1, 4 + nc, len(rows) + pad), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(rows):
        head[0, :4, i] = (cx, cy, w, h)
        head[0, 4 + cls, i] = score
        head[0, 4 + (cls + 1) % nc, i] = score / 2  # a weaker second class
    return head


def test_postprocess_class_aware_threshold_order_and_rescale() -> None:
    geo = letterbox_geometry((720, 1280), (640, 640), 32)  # gain 0.5, 12 px top padding
    head = _head(
        [
            (100, 112, 40, 40, 0, 0.60),
            (102, 112, 40, 40, 0, 0.70),  # suppresses the first (same class)
            (102, 112, 40, 40, 1, 0.50),  # same place, other class: kept
            (300, 200, 20, 20, 2, CONF),  # exactly the threshold: dropped (strictly greater)
            (630, 370, 40, 40, 2, 0.90),  # runs off the frame: clipped
        ]
    )
    raw = postprocess(head, geo, conf=CONF, iou=IOU, max_det=MAX_DETECTIONS)
    assert raw.class_ids.tolist() == [2, 0, 1]
    assert np.allclose(raw.scores, [0.9, 0.7, 0.5])
    assert np.allclose(
        raw.boxes[1], [(102 - 20) * 2, (112 - 20 - 12) * 2, (122) * 2, (132 - 12) * 2]
    )
    assert np.allclose(raw.boxes[0], [(610) * 2, (350 - 12) * 2, 1280, 720])


def test_postprocess_empty() -> None:
    geo = letterbox_geometry((720, 1280), (640, 640), 32)
    raw = postprocess(
        np.zeros((1, 84, 5040), np.float32), geo, conf=CONF, iou=IOU, max_det=MAX_DETECTIONS
    )
    assert len(raw) == 0 and raw.boxes.shape == (0, 4)


def test_postprocess_is_fast_for_thousands_of_candidates() -> None:
    rng = np.random.default_rng(0)
    n = 8400
    head = np.zeros((1, 84, n), np.float32)
    head[0, 0] = rng.uniform(0, 640, n)
    head[0, 1] = rng.uniform(0, 640, n)
    head[0, 2:4] = rng.uniform(10, 200, (2, n))
    head[0, 4:] = rng.uniform(0, 0.35, (80, n))
    geo = letterbox_geometry((640, 640), (640, 640), 32)
    postprocess(head, geo, conf=0.001, iou=IOU, max_det=MAX_DETECTIONS)
    start = time.perf_counter()
    raw = postprocess(head, geo, conf=0.001, iou=IOU, max_det=MAX_DETECTIONS)
    assert time.perf_counter() - start < 0.25
    assert 0 < len(raw) <= MAX_DETECTIONS
    assert np.all(np.diff(raw.scores) <= 0)


# --- draw -----------------------------------------------------------------------------------


def test_annotate_draws_on_a_copy() -> None:
    image = np.zeros((200, 300, 3), np.uint8)
    det = Detection(class_id=1, class_name="square", confidence=0.87, bbox=BBox(20, 30, 120, 150))
    out = annotate(image, [det])
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not image.any()
    assert out[30, 60].any()  # the box's top edge
    assert not out[100, 250].any()


@pytest.mark.parametrize(
    "data",
    [
        b"SECRET-CONTENT, not an image",
        b"\xff\xd8\xff\xe0SECRET\xde\xad\xbe\xef",  # a JPEG signature, then garbage
    ],
)
def test_refusals_state_the_rule_not_the_content(data: bytes) -> None:
    """A result is read by whoever sent the task: its message never quotes the object's bytes."""
    with pytest.raises(UndecodableFrameError) as err:
        decode_image(data, max_bytes=BIG, max_pixels=BIG)
    message = err.value.message
    assert "SECRET" not in message and data[:8].hex(" ") not in message, message
    assert "de ad" not in message.lower() and "0xde" not in message.lower(), message
