"""ONNX Runtime backend: CPU execution provider (CUDA where asked for and present), fp32 only."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from inference_service.errors import ConfigError, ModelError
from inference_service.runtime.base import Batch, HeadOutput, Images, to_batch
from inference_service.settings import env_name

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


class OnnxRuntimeBackend:
    """One ``InferenceSession``; ``session.run`` is thread-safe and releases the GIL.

    ``threads`` is the session's intra-op thread count (inter-op: 1, sequential execution); all
    graph optimisations are enabled, and idle intra-op threads do not spin. ``precision`` must be
    ``fp32``: ONNX Runtime's CPU provider has no bf16 path for this model, so ``bf16`` is refused
    with a :class:`ConfigError` naming OpenVINO.
    """

    def __init__(
        self, onnx_path: Path, *, precision: str = "fp32", threads: int = 1, cuda: bool = False
    ) -> None:
        if precision != "fp32":
            raise ConfigError(
                f"{env_name('precision')}={precision} is not supported by ONNX Runtime; use "
                f"{env_name('runtime')}=openvino for bf16, or {env_name('precision')}=fp32"
            )
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Idle intra-op threads sleep instead of spinning: spinning threads steal the cores that
        # the other worker processes need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [CPU_PROVIDER]
        if cuda:
            if CUDA_PROVIDER not in ort.get_available_providers():
                raise ConfigError(
                    f"{env_name('runtime')}=onnxruntime-cuda: this ONNX Runtime has no CUDA "
                    f"provider (available: {', '.join(ort.get_available_providers())})"
                )
            providers = [CUDA_PROVIDER, CPU_PROVIDER]
        try:
            self._session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors for bad files
            raise ModelError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._name = "onnxruntime-cuda" if cuda else "onnxruntime"
        log.info(
            "ONNX Runtime %s loaded %s (providers %s, %d intra-op threads)",
            ort.__version__,
            onnx_path,
            ",".join(self._session.get_providers()),
            options.intra_op_num_threads,
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def precision(self) -> str:
        return "fp32"

    def infer(self, batch: Batch) -> HeadOutput:
        outputs = self._session.run([self._output], {self._input: batch})
        return np.asarray(outputs[0], dtype=np.float32)

    def infer_images(self, images: Images) -> HeadOutput:
        return self.infer(to_batch(images))

    def close(self) -> None:
        self._session = None
