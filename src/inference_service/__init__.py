"""Inference Service: Kafka frame tasks in, YOLOv8 detections out.

The package is layered, dependencies pointing inward:

- ``domain`` and ``errors`` (stdlib only): value types and the error tree;
- ``ports``: the Protocols the pipeline talks to (frame store, detector, ...);
- ``vision``: decode, letterbox, YOLOv8 head decode, NMS (numpy/OpenCV only);
- ``runtime``: inference backends (OpenVINO, ONNX Runtime) behind one interface;
- ``model``: resolving the one model setting into a runnable artifact;
- ``pool`` and ``pipeline``: worker processes and the ordered task pipeline;
- adapters (``kafka``, ``s3``, local files), ``http``, ``cli``;
- ``app``: the composition root that wires settings to adapters;
- ``api``: :class:`Detector`, the detector to embed (``from inference_service import Detector``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inference_service.api import Detector

__all__ = ["Detector", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use, so that ``import inference_service.errors`` (or the CLI) does not load
    # numpy, OpenCV and the runtimes.
    if name == "Detector":
        from inference_service.api import Detector

        return Detector
    raise AttributeError(f"module 'inference_service' has no attribute {name!r}")
