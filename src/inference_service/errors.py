"""The error tree of the service.

Every failure is an :class:`InferenceError`. Callers test the class flags, not lists of types::

    InferenceError                 retriable  poison
    ├── TaskError                      no       yes   the task or its frame is bad; never retried
    │   ├── InvalidTaskError           (code: invalid_task)
    │   │   └── NotJsonError           (not even JSON: dead letter only, no result)
    │   ├── FrameNotFoundError         (code: frame_not_found)
    │   ├── FrameForbiddenError        (code: frame_forbidden)
    │   ├── UndecodableFrameError      (code: undecodable_frame)
    │   ├── FrameTooLargeError         (code: frame_too_large)
    │   ├── InferenceFailedError       (code: inference_failed)
    │   ├── InferenceTimeoutError      (code: inference_timeout)
    │   ├── ResultTooLargeError        (code: result_too_large)
    │   └── InternalError              (code: internal_error; a bug, caught at the record)
    ├── TransientError                 yes       no   the world is briefly unwell (S3 or Kafka down)
    │   ├── StoreUnavailableError
    │   ├── KafkaUnavailableError
    │   └── HungCallError              a client call outlived its watchdog
    ├── ConfigError                    no        no   start-up refuses a setting or a model
    │   ├── ModelError
    │   └── TopicMissingError          a topic a command reads does not exist
    └── CommandError                   no        no   a command's own input cannot be used (exit 2)

A poison error becomes an error result (``status: "error"``) plus a DLQ copy; a retriable one pauses
consumption and is retried with backoff; a configuration error stops start-up with its message.
Callers branch on ``retriable`` and ``poison``, not on lists of classes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """The ``error.code`` values of a result (SPEC.md, Results)."""

    INVALID_TASK = "invalid_task"
    FRAME_NOT_FOUND = "frame_not_found"
    FRAME_FORBIDDEN = "frame_forbidden"
    UNDECODABLE_FRAME = "undecodable_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    INFERENCE_FAILED = "inference_failed"
    INFERENCE_TIMEOUT = "inference_timeout"
    RESULT_TOO_LARGE = "result_too_large"
    INTERNAL_ERROR = "internal_error"


class InferenceError(Exception):
    """Root of every error the service raises on purpose."""

    retriable: bool = False
    """True when the same operation may succeed later (retry with backoff, no error result)."""
    poison: bool = False
    """True when the input itself is bad: the task gets an error result and a DLQ copy."""


class TaskError(InferenceError):
    """A task that cannot succeed however often it is tried."""

    poison = True
    code: ErrorCode = ErrorCode.INVALID_TASK

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidTaskError(TaskError):
    """The task record is not a valid task (not JSON, wrong types, missing fields)."""

    code = ErrorCode.INVALID_TASK

    def __init__(self, message: str, *, readable: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.readable = readable
        """What of the record could be read, for the identity of its error result."""


class NotJsonError(InvalidTaskError):
    """The record's value is not a JSON object at all: it goes to the dead-letter topic only."""


class FrameNotFoundError(TaskError):
    """The frame's object (or its bucket) does not exist."""

    code = ErrorCode.FRAME_NOT_FOUND


class FrameForbiddenError(TaskError):
    """The store refuses the frame to the service: access denied (on AWS also a missing key
    without ``s3:ListBucket``), the bucket in another region, another final 4xx."""

    code = ErrorCode.FRAME_FORBIDDEN


class UndecodableFrameError(TaskError):
    """The frame's bytes are not an image that can be decoded."""

    code = ErrorCode.UNDECODABLE_FRAME


class FrameTooLargeError(TaskError):
    """The frame exceeds the byte or pixel limits (a decompression bomb is refused here)."""

    code = ErrorCode.FRAME_TOO_LARGE


class InferenceFailedError(TaskError):
    """The model failed on this frame, also after the retry on a fresh worker."""

    code = ErrorCode.INFERENCE_FAILED


class InferenceTimeoutError(TaskError):
    """Detection on this frame outlived ``frame_timeout_s``, also when retried alone on a worker."""

    code = ErrorCode.INFERENCE_TIMEOUT


class ResultTooLargeError(TaskError):
    """The task's result (or dead letter) is over the smallest message limit on its path."""

    code = ErrorCode.RESULT_TOO_LARGE


class InternalError(TaskError):
    """Handling the record failed unexpectedly (a bug): the record still gets its result."""

    code = ErrorCode.INTERNAL_ERROR


class TransientError(InferenceError):
    """A dependency is unavailable for now; the operation is retried with backoff."""

    retriable = True


class StoreUnavailableError(TransientError):
    """The object store cannot be reached or answers with a server error."""


class KafkaUnavailableError(TransientError):
    """The Kafka brokers cannot be reached."""


class HungCallError(TransientError):
    """A client call did not return within its watchdog; the client is replaced."""


class ConfigError(InferenceError):
    """A setting or the model cannot be used; start-up stops with this message."""


class ModelError(ConfigError):
    """The model file is missing, unreadable, or not a YOLOv8 detection model."""


class TopicMissingError(ConfigError):
    """A Kafka topic that a command reads does not exist."""


class CommandError(InferenceError):
    """A command's own input (a file, a video, an argument) cannot be used; the command exits 2."""
