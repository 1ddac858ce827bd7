"""The one place a result is assembled: the pipeline, the ``detect`` command and ``POST /v1/detect``
all build their results here, so the three agree on fields, timings and error shape.

``domain.Result.to_dict`` shapes the JSON; this module decides what goes into a ``Result``.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference_service.domain import (
    FrameDetections,
    JsonObject,
    ModelInfo,
    Result,
    ResultError,
    Task,
)
from inference_service.errors import TaskError


@dataclass(frozen=True, slots=True)
class Identity:
    """What a result repeats of its task, so a reader can match the two."""

    task_id: str | None
    """None only for an invalid task that carried no usable id."""
    video_id: str
    frame_id: int | None
    """None only when the task's frame id was missing or of the wrong type."""
    bucket: str
    s3_key: str | None
    meta: JsonObject | None = None

    @classmethod
    def of_task(cls, task: Task) -> Identity:
        return cls(task.task_id, task.video_id, task.frame_id, task.bucket, task.s3_key, task.meta)


def stage_timings(
    found: FrameDetections | None,
    *,
    fetch_ms: float = 0.0,
    total_ms: float,
    queue_ms: float | None = None,
) -> dict[str, float]:
    """``timings_ms`` of a result: every stage that ran, zero for ``fetch``/``decode``/``inference``
    when they did not (a failed frame), ``queue`` only where the frame waited for a worker."""
    timings: dict[str, float] = {"fetch": fetch_ms}
    if queue_ms is not None:
        timings["queue"] = queue_ms
    if found is not None:
        timings.update(
            decode=found.decode_ms,
            preprocess=found.preprocess_ms,
            inference=found.inference_ms,
            postprocess=found.postprocess_ms,
        )
    else:
        timings.update(decode=0.0, inference=0.0)
    timings["total"] = total_ms
    return timings


def build_result(
    identity: Identity,
    model: ModelInfo,
    timings_ms: dict[str, float],
    *,
    found: FrameDetections | None = None,
    error: TaskError | None = None,
    extra: JsonObject | None = None,
) -> Result:
    """An ``ok`` result from ``found`` or an ``error`` result from ``error`` (exactly one)."""
    if (found is None) == (error is None):
        raise ValueError("a result has either detections or an error")
    return Result(
        task_id=identity.task_id,
        video_id=identity.video_id,
        frame_id=identity.frame_id,
        bucket=identity.bucket,
        s3_key=identity.s3_key,
        meta=identity.meta,
        status="ok" if error is None else "error",
        model=model,
        image=found.image if found is not None else None,
        detections=found.detections if found is not None else (),
        timings_ms=timings_ms,
        error=ResultError(error.code, error.message) if error is not None else None,
        extra=dict(extra or {}),
    )
