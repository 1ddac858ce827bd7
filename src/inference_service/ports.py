"""The seams the pipeline talks through (Protocols). Adapters implement them; tests fake them."""

from __future__ import annotations

from typing import Protocol

from inference_service.domain import FrameDetections, ModelInfo


class FrameStore(Protocol):
    """Where frames are read from (S3 in production, a dict in unit tests)."""

    async def get(self, bucket: str, key: str) -> bytes:
        """The object's bytes.

        Raises ``FrameNotFoundError`` for a missing object or bucket, ``FrameTooLargeError`` for an
        object over the byte limit, ``StoreUnavailableError`` when the store cannot answer now.
        """
        ...

    async def check(self, bucket: str) -> None:
        """Raise ``StoreUnavailableError`` unless the store answers for ``bucket``."""
        ...


class FrameDetector(Protocol):
    """Synchronous detection of one encoded frame (runs inside a worker process)."""

    @property
    def info(self) -> ModelInfo: ...

    def detect(self, data: bytes) -> FrameDetections:
        """Decode, run the model, post-process.

        Raises ``UndecodableFrameError``, ``FrameTooLargeError`` or ``InferenceFailedError``.
        """
        ...


class AsyncDetector(Protocol):
    """Detection that never blocks the event loop (the worker pool)."""

    @property
    def info(self) -> ModelInfo: ...

    async def detect(self, data: bytes) -> FrameDetections:
        """As :meth:`FrameDetector.detect`, run elsewhere."""
        ...

    def ready(self) -> bool:
        """True once every worker has loaded and warmed its model."""
        ...
