"""The seams the pipeline talks through (Protocols). Adapters implement them; tests fake them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from inference_service.domain import (
    Finished,
    FrameDetections,
    ModelInfo,
    Partition,
    Priority,
    Record,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


Admit = Callable[[int], Awaitable[None]]
"""Awaited with an object's size before its body is read."""


class FrameStore(Protocol):
    """Where frames are read from (S3 in production, a dict in unit tests)."""

    async def get(self, bucket: str, key: str, admit: Admit | None = None) -> bytes:
        """The object's bytes; ``admit(size)`` is awaited with the object's size, from the
        response headers, before its body is read (the frame byte budget waits there).

        Raises ``FrameNotFoundError`` for a missing object or bucket, ``FrameForbiddenError`` when
        the store refuses it to the service (final), ``FrameTooLargeError`` for an object over the
        byte limit, ``StoreUnavailableError`` when the store cannot answer now.
        """
        ...

    async def check(self, bucket: str) -> None:
        """Raise ``StoreUnavailableError`` unless the store answers for ``bucket``."""
        ...


class FrameDetector(Protocol):
    """Synchronous detection of one frame (runs inside a worker process).

    Everything a pool worker calls on its detector: it warms the detector up once (unless
    :attr:`warmed_up` says that was done while loading), then calls :meth:`detect` for encoded
    frames and :meth:`detect_array` for decoded ones, from several threads at once.
    """

    @property
    def info(self) -> ModelInfo: ...

    @property
    def warmed_up(self) -> bool:
        """True once :meth:`warmup` has run (a worker then does not warm it up again)."""
        ...

    def warmup(self) -> None:
        """Run the whole detection path once, so that the first real frame is not slow."""
        ...

    def detect(self, data: bytes) -> FrameDetections:
        """Decode, run the model, post-process.

        Raises ``UndecodableFrameError``, ``FrameTooLargeError`` or ``InferenceFailedError``.
        """
        ...

    def detect_array(self, image: npt.NDArray[np.uint8]) -> FrameDetections:
        """As :meth:`detect`, for a decoded ``H×W×3`` BGR ``uint8`` frame (e.g. a video frame).

        Raises ``UndecodableFrameError`` for another shape or dtype, or ``InferenceFailedError``.
        """
        ...


class AsyncDetector(Protocol):
    """Detection that never blocks the event loop (the worker pool)."""

    @property
    def info(self) -> ModelInfo: ...

    async def detect(
        self, data: bytes, *, priority: Priority = Priority.PIPELINE
    ) -> FrameDetections:
        """As :meth:`FrameDetector.detect`, run elsewhere.

        ``priority``: frames waiting for a worker are served in priority order (the pipeline's
        first), in arrival order within one priority.
        """
        ...

    def ready(self) -> bool:
        """True while the detector can take frames: every worker ready at start, then at least one
        of the serving pool's (a replacement that loads does not make it unready)."""
        ...


class PartitionListener(Protocol):
    """Told of assignment changes by a :class:`TaskSource`, from inside :meth:`TaskSource.poll`.

    Both calls run on the thread that runs the source's poll and return only when their work is
    done: a revoked partition's records must be forgotten before another consumer may take it.
    """

    def assigned(self, partitions: Sequence[Partition]) -> None: ...

    def revoked(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        """``lost``: the session expired, the partitions already have another owner."""
        ...


class TaskSource(Protocol):
    """Where task records come from (a Kafka consumer group in production)."""

    @property
    def ready(self) -> bool:
        """True once the source has joined its group and can be assigned partitions."""
        ...

    async def open(self, listener: PartitionListener) -> None:
        """Subscribe; assignment changes are reported to ``listener`` during :meth:`poll`."""
        ...

    async def poll(self, max_records: int) -> list[Record]:
        """Up to ``max_records`` records in offset order per partition, after a short wait.

        A record delivered again below its partition's position is not returned twice.
        """
        ...

    async def set_paused(self, paused: bool) -> None:
        """Pause or resume every assigned partition, including partitions assigned later."""
        ...

    async def committed(self, partitions: Sequence[Partition]) -> dict[Partition, int | None]:
        """The group's committed offsets of those ``partitions`` it could read, final (no
        transaction pending on them); None where the group has none. A partition left out could
        not be read."""
        ...

    async def seek(self, positions: dict[Partition, int]) -> set[Partition]:
        """Continue each partition at its given offset; the partitions whose seek succeeded."""
        ...

    async def hold(self, partitions: Sequence[Partition]) -> None:
        """Keep ``partitions`` paused, whatever :meth:`set_paused` says, until :meth:`release`
        or their revocation."""
        ...

    async def release(self, partitions: Sequence[Partition]) -> None:
        """End :meth:`hold` of ``partitions`` (they resume unless consumption is paused)."""
        ...

    async def close(self) -> None:
        """Leave the group (revocations are reported first)."""
        ...


@dataclass(frozen=True, slots=True)
class Published:
    """What one :meth:`ResultSink.publish` achieved."""

    published: list[Finished] = field(default_factory=list)
    """The outcomes now on their way to (or in) the output topics, for counting."""
    rewind: dict[Partition, int] = field(default_factory=dict)
    """Partitions whose work since these offsets must be dropped and consumed again."""

    @property
    def failed(self) -> bool:
        return bool(self.rewind)


class ResultSink(Protocol):
    """Where outcomes go, and where the consumed offsets are committed with them.

    Two implementations behind this one interface: transactional (``exactly_once``: results and
    offsets in one transaction) and acknowledging (``at_least_once``: offsets committed only up to
    the last contiguous outcome the broker acknowledged).
    """

    async def open(self) -> None: ...

    async def publish(self, finished: list[Finished]) -> Published:
        """Publish ``finished`` (in order per partition) and commit the offsets after them.

        Also called with nothing finished, so that acknowledged offsets keep being committed.
        """
        ...

    def revoked(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        """Settle ``partitions`` before they are handed over (called inside the source's poll):
        commit what may still be committed, unless ``lost``; forget them either way."""
        ...

    async def close(self) -> None: ...
