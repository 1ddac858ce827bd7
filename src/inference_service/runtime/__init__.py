"""Inference backends (OpenVINO, ONNX Runtime) behind one interface, and the choice between them.

Backend modules import their runtime lazily, when a backend is opened.
"""

from inference_service.runtime.base import Batch, HeadOutput, InferenceBackend, ModelFiles
from inference_service.runtime.select import cpu_features, cpu_model, open_backend

__all__ = [
    "Batch",
    "HeadOutput",
    "InferenceBackend",
    "ModelFiles",
    "cpu_features",
    "cpu_model",
    "open_backend",
]
