"""The one interface every inference backend implements, and what a backend is opened from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from inference_service.vision.letterbox import to_batch

__all__ = ["Batch", "HeadOutput", "Images", "InferenceBackend", "ModelFiles", "to_batch"]

Batch = npt.NDArray[np.float32]
"""A ``(n, 3, H, W)`` float32 RGB input in ``[0, 1]``."""
Images = npt.NDArray[np.uint8]
"""A ``(n, H, W, 3)`` uint8 BGR input (letterboxed frames as decoded), for ``infer_images``."""
HeadOutput = npt.NDArray[np.float32]
"""The network's ``(n, 4 + classes, anchors)`` float32 output."""


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """The runnable files of one model (the runtime layer knows nothing else about models)."""

    sha256: str
    """Identity of the model, used to key cached measurements."""
    onnx: Path | None = None
    """An ONNX file (ONNX Runtime needs it; OpenVINO can read it too)."""
    openvino_xml: Path | None = None
    """An OpenVINO IR ``.xml`` (its ``.bin`` beside it), preferred by OpenVINO."""
    ncnn_dir: Path | None = None
    """A directory with the ncnn model of the head's raw outputs (``model.ncnn.param``/``.bin``)."""
    openvino_int8_xml: Path | None = None
    """The int8 (quantized) OpenVINO IR ``.xml``, which precision ``int8`` runs."""


class InferenceBackend(Protocol):
    """A loaded network that turns an input batch into the raw head output.

    ``infer`` is thread-safe: several threads of one process may call it at once, and it releases
    the GIL while the network runs.
    """

    @property
    def name(self) -> str:
        """``openvino``, ``onnxruntime`` or ``ncnn`` (``-cuda`` / ``-gpu``: an accelerator)."""
        ...

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``int8``."""
        ...

    def infer(self, batch: Batch) -> HeadOutput:
        """Run the network on ``batch``; any input height and width the model accepts."""
        ...

    def infer_images(self, images: Images) -> HeadOutput:
        """Run the network on letterboxed BGR ``uint8`` frames: the backend converts them to the
        network's input (``to_batch``, or inside the network where the runtime can)."""
        ...

    def close(self) -> None:
        """Release the backend's resources; ``infer`` must not be called afterwards."""
        ...
