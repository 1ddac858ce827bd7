"""Value types of the service (stdlib only): tasks, detections, results.

Results follow SPEC.md's schema (``schemas/result.schema.json``); ``Result.to_dict`` is the only
place that shapes the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

from inference_service.errors import ErrorCode

SCHEMA_VERSION = 1
"""``schema_version`` of every result this code writes."""

JsonObject = dict[str, Any]

Partition = tuple[str, int]
"""A source partition: ``(topic, partition)``."""


class Priority(IntEnum):
    """Whose frame a detector serves first: every waiting ``PIPELINE`` frame goes to a worker
    before any ``INTERACTIVE`` one, so that HTTP requests cannot delay the Kafka stream."""

    PIPELINE = 0
    """A frame of a Kafka task (and of the CLI's local detection): the default."""
    INTERACTIVE = 1
    """A frame posted to ``/v1/detect``: served when no pipeline frame waits."""


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed task record, as the pipeline sees it (no client types)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @property
    def source(self) -> Partition:
        return (self.topic, self.partition)

    @property
    def size(self) -> int:
        """Bytes of key and value (what the task-size limit counts)."""
        return len(self.key or b"") + len(self.value or b"")


@dataclass(frozen=True, slots=True)
class Task:
    """One frame to detect, parsed from an ``inference_tasks`` record."""

    video_id: str
    """The video the frame belongs to; also the Kafka key of task and result."""
    frame_id: int
    """The frame's number within its video (>= 0)."""
    s3_key: str
    """The frame's object key within ``bucket`` (never a URI here: URIs are split on parsing)."""
    bucket: str
    """The bucket holding the frame (the task's own or the configured default)."""
    task_id: str
    """The task's id; ``<video_id>:<frame_id>`` when the task gives none."""
    meta: JsonObject | None = None
    """Opaque object copied into the result unchanged."""


def is_bucket_name(name: str) -> bool:
    """Whether ``name`` is an S3 bucket name: 3-63 of a-z, 0-9, '.' and '-' (what a task and
    ``INFERENCE_S3_ALLOWED_BUCKETS`` may name)."""
    return (
        3 <= len(name) <= 63
        and name.isascii()
        and all(c.islower() or c.isdigit() or c in ".-" for c in name)
    )


@dataclass(frozen=True, slots=True)
class BBox:
    """A box in pixels of the original frame, ``x1 <= x2`` and ``y1 <= y2``."""

    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected object."""

    class_id: int
    class_name: str
    confidence: float
    bbox: BBox

    def to_dict(self) -> JsonObject:
        b = self.bbox
        return {
            "class_id": self.class_id,
            "class_name": self.class_name,
            "confidence": round(self.confidence, 5),
            "bbox": {
                "x1": round(b.x1, 2),
                "y1": round(b.y1, 2),
                "x2": round(b.x2, 2),
                "y2": round(b.y2, 2),
            },
        }


@dataclass(frozen=True, slots=True)
class ImageSize:
    """Width and height of a decoded frame, in pixels."""

    width: int
    height: int


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a result and ``/v1/model`` say about the model."""

    name: str
    """The model file's name (e.g. ``best.pt``)."""
    sha256: str
    """sha256 of the model file the operator named."""
    imgsz: tuple[int, int]
    """The model's nominal input size (height, width)."""
    conf: float
    iou: float
    runtime: str
    """``<backend>/<precision>``, e.g. ``openvino/fp32``."""
    classes: tuple[str, ...] = ()
    """Class names by class id, from the model's own metadata."""
    precision: str = "fp32"
    """What the network ran in: ``fp32``, ``bf16`` or ``int8``."""

    def to_dict(self) -> JsonObject:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "imgsz": list(self.imgsz),
            "conf": self.conf,
            "iou": self.iou,
            "runtime": self.runtime,
            "precision": self.precision,
        }


@dataclass(frozen=True, slots=True)
class FrameDetections:
    """What the detector returns for one frame."""

    image: ImageSize
    detections: tuple[Detection, ...]
    """Highest confidence first."""
    decode_ms: float
    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float


@dataclass(frozen=True, slots=True)
class ResultError:
    """The ``error`` object of a failed result."""

    code: ErrorCode
    message: str


@dataclass(slots=True)
class Result:
    """One result record for ``inference_results``."""

    task_id: str | None
    """None only for an invalid task that carried no usable id."""
    video_id: str
    frame_id: int | None
    """None only for an invalid task whose frame_id was missing or of the wrong type."""
    bucket: str
    s3_key: str | None
    status: Literal["ok", "error"]
    model: ModelInfo
    meta: JsonObject | None = None
    image: ImageSize | None = None
    detections: tuple[Detection, ...] = ()
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: ResultError | None = None
    extra: JsonObject = field(default_factory=dict)
    """Additional top-level fields (e.g. ``source`` of the ``detect`` command)."""

    def to_dict(self) -> JsonObject:
        out: JsonObject = {
            "schema_version": SCHEMA_VERSION,
            "task_id": self.task_id,
            "video_id": self.video_id,
            "frame_id": self.frame_id,
            "bucket": self.bucket,
            "s3_key": self.s3_key,
            "meta": self.meta,
            "status": self.status,
            "image": (
                {"width": self.image.width, "height": self.image.height} if self.image else None
            ),
            "detections": [d.to_dict() for d in self.detections],
            "model": self.model.to_dict(),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }
        if self.error is not None:
            out["error"] = {"code": str(self.error.code), "message": self.error.message}
        out.update(self.extra)
        return out


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A copy of a bad task for the dead-letter topic, with headers saying why."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to publish for one record: a result (unless not even JSON), a dead letter or not."""

    key: bytes | None
    result: JsonObject | None
    dead_letter: DeadLetter | None
    status: str
    """``ok`` or the error code, for metrics."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    payload: bytes | None = None
    """``result`` encoded as strict JSON, checked against the topic's size limit."""
    model_sha256: str = ""
    """sha256 of the model whose identity the result carries (the one that detected it): the
    pipeline never commits outcomes of two models in one cycle."""


@dataclass(frozen=True, slots=True)
class Finished:
    """A record whose outcome is ready to publish, in its partition's order."""

    partition: Partition
    offset: int
    outcome: Outcome


SwapOutcome = Literal["swapped", "unchanged", "failed", "busy", "refused"]
"""How a model swap ended: the new model serves; it is the serving one already (same sha256);
it failed to load, warm or detect (the old one serves on); another swap was under way; the
service is stopping or not started yet."""


@dataclass(frozen=True, slots=True)
class SwapReport:
    """One model swap's outcome (``/v1/model`` shows the last one)."""

    outcome: SwapOutcome
    trigger: str
    """What asked for it: ``http``, ``sighup`` or ``poll``."""
    requested: str
    """The model path or URI asked for."""
    started_at: float
    """Unix time the swap began."""
    seconds: float
    """How long it took (loading, warming and the smoke detection of the new workers)."""
    model: ModelInfo | None = None
    """The model serving once it ended."""
    previous: ModelInfo | None = None
    """The model serving before (only where it was replaced)."""
    stage: str = ""
    """Where a failed swap failed: ``model`` (the path or URI itself), ``load`` (loading and
    warming) or ``smoke`` (a detection on a synthetic frame)."""
    error: str = ""

    def to_dict(self) -> JsonObject:
        out: JsonObject = {
            "outcome": self.outcome,
            "trigger": self.trigger,
            "requested": self.requested,
            "started_at": round(self.started_at, 3),
            "seconds": round(self.seconds, 3),
            "model": self.model.to_dict() if self.model is not None else None,
            "previous": self.previous.to_dict() if self.previous is not None else None,
        }
        if self.outcome == "failed" or self.error:
            out["stage"] = self.stage
            out["error"] = self.error
        return out
