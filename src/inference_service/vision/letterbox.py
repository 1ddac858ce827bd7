"""Letterbox a BGR frame into the network's input tensor, exactly as the reference does.

Matches the behaviour of ultralytics' ``LetterBox`` as its predictor uses it for a ``.pt`` model or
a dynamic export (``rect=True`` in predict, so ``auto=True``): the scale ``r = min(H/h, W/w)``
(scaling up allowed), each resized side ``max(round(side * r), 1)`` with Python's rounding,
``cv2.INTER_LINEAR``, the padding reduced modulo the stride (the minimum rectangle: 1280x720 at
640 gives a 384x640 input) and split as ``round(d/2 - 0.1)`` before and ``round(d/2 + 0.1)`` after,
filled with 114. Then BGR to RGB, ``/ 255`` in float32, CHW with a batch axis of one. With a model
of static input shape, ``auto`` is off and the input is padded to the full target size.

The heavy parts (resize, border fill, the float conversion) run in OpenCV and numpy loops that
release the GIL, so several threads can letterbox at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from inference_service.vision.decode import ImageBGR

Tensor = npt.NDArray[np.float32]
"""A float32 array, here ``(1, 3, H, W)`` RGB in ``[0, 1]``."""

PAD_VALUE = 114
"""Grey of the padding, as the reference's."""

_SCALE = np.float32(255.0)


@dataclass(frozen=True, slots=True)
class LetterboxGeometry:
    """Where a frame lies inside the network input."""

    image_hw: tuple[int, int]
    """The original frame's (height, width)."""
    input_hw: tuple[int, int]
    """The network input's (height, width), padding included."""
    resized_hw: tuple[int, int]
    """The resized frame's (height, width) before padding."""
    top: int
    bottom: int
    left: int
    right: int


def letterbox_geometry(
    image_hw: tuple[int, int], target_hw: tuple[int, int], stride: int, *, auto: bool = True
) -> LetterboxGeometry:
    """The reference's letterbox geometry of a ``image_hw`` frame for a ``target_hw`` input.

    ``auto`` pads to the next multiple of ``stride`` only (a dynamic-shape model); otherwise the
    input is exactly ``target_hw``.
    """
    h, w = image_hw
    if h <= 0 or w <= 0:
        raise ValueError(f"empty image of {w}x{h}")
    th, tw = target_hw
    r = min(th / h, tw / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw: float = tw - new_w
    dh: float = th - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return LetterboxGeometry(
        image_hw=(h, w),
        input_hw=(new_h + top + bottom, new_w + left + right),
        resized_hw=(new_h, new_w),
        top=top,
        bottom=bottom,
        left=left,
        right=right,
    )


def letterbox(
    image: ImageBGR, target_hw: tuple[int, int], stride: int, *, auto: bool = True
) -> tuple[Tensor, LetterboxGeometry]:
    """The ``(1, 3, H, W)`` float32 RGB input tensor of ``image`` and its geometry."""
    geo = letterbox_geometry((image.shape[0], image.shape[1]), target_hw, stride, auto=auto)
    return to_tensor(image, geo), geo


def letterbox_image(image: ImageBGR, geo: LetterboxGeometry) -> ImageBGR:
    """``image`` resized and padded (grey 114) to the network input laid out by ``geo``, still BGR
    ``uint8`` ``(H, W, 3)``: what a runtime that converts pixels itself takes."""
    new_h, new_w = geo.resized_hw
    if (image.shape[0], image.shape[1]) != (new_h, new_w):
        image = np.asarray(
            cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR), dtype=np.uint8
        )
    padded = cv2.copyMakeBorder(
        image,
        geo.top,
        geo.bottom,
        geo.left,
        geo.right,
        cv2.BORDER_CONSTANT,
        value=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )
    return np.asarray(padded, dtype=np.uint8)


def to_tensor(image: ImageBGR, geo: LetterboxGeometry) -> Tensor:
    """Resize, pad, swap to RGB and scale ``image`` into a new ``(1, 3, H, W)`` tensor."""
    return to_batch(letterbox_image(image, geo)[np.newaxis])


def to_batch(images: npt.NDArray[np.uint8]) -> Tensor:
    """``(n, H, W, 3)`` uint8 BGR → ``(n, 3, H, W)`` float32 RGB in ``[0, 1]`` (as ultralytics)."""
    n, h, w, _ = images.shape
    out = np.empty((n, 3, h, w), dtype=np.float32)
    for i in range(n):
        blue, green, red = cv2.split(images[i])
        for channel, plane in enumerate((red, green, blue)):
            np.divide(plane, _SCALE, out=out[i, channel], dtype=np.float32)
    return out
