"""Pixels in, boxes out, numpy and OpenCV only: decode, letterbox, YOLOv8 post-processing, drawing.

Nothing here knows about models files or runtimes; every step matches the behaviour of the
reference implementation (ultralytics' predict) so that detections agree with it.
"""

from inference_service.vision.decode import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    ImageBGR,
    decode_image,
    image_size,
)
from inference_service.vision.letterbox import (
    PAD_VALUE,
    LetterboxGeometry,
    Tensor,
    letterbox,
    letterbox_geometry,
    letterbox_image,
    to_tensor,
)
from inference_service.vision.postprocess import RawDetections, nms, postprocess, scale_boxes

__all__ = [
    "IMAGE_SUFFIXES",
    "PAD_VALUE",
    "VIDEO_SUFFIXES",
    "ImageBGR",
    "LetterboxGeometry",
    "RawDetections",
    "Tensor",
    "decode_image",
    "image_size",
    "letterbox",
    "letterbox_geometry",
    "letterbox_image",
    "nms",
    "postprocess",
    "scale_boxes",
    "to_tensor",
]
