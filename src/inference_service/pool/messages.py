"""What travels between the pool's supervisor and its worker processes.

Each worker has two channels, both carrying pickled instances of these module-level classes::

    supervisor ── task queue:  FrameJob | Stop ──────────────────────► worker
    supervisor ◄── result pipe: Ready | StartFailed | Started | Done | Failed ── worker

A frame travels as its encoded bytes or as a :class:`RawFrame` (a decoded frame's raw buffer),
never as a pickled array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from inference_service.domain import FrameDetections, ModelInfo
from inference_service.errors import TaskError

# --- payloads --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawFrame:
    """A decoded BGR frame sent as its raw ``uint8`` buffer (no pickled array)."""

    data: bytes
    """The ``height × width × 3`` pixels, row-major, BGR."""
    height: int
    """Rows of the frame."""
    width: int
    """Columns of the frame."""


Payload: TypeAlias = bytes | RawFrame
"""One frame to detect on: encoded bytes (JPEG, PNG, ...) or a decoded frame's buffer."""

# --- supervisor → worker ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrameJob:
    """Detect on one frame and answer with :class:`Done` or :class:`Failed`."""

    job_id: int
    """The supervisor's id of the frame, echoed in the answer."""
    payload: Payload
    """The frame."""


@dataclass(frozen=True, slots=True)
class Stop:
    """No more work: the puller thread that takes this ends, and with it the worker."""


ToWorker: TypeAlias = FrameJob | Stop
"""Everything a worker's task queue carries."""

# --- worker → supervisor ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker has loaded and warmed its model and takes frames from now on."""

    info: ModelInfo
    """What the worker's detector says about its model."""


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The worker could not load or warm its model and has ended (start-up then fails)."""

    error_type: str
    """The class name of the exception the detector factory or warm-up raised."""
    message: str
    """That exception's text."""


@dataclass(frozen=True, slots=True)
class Started:
    """A puller has taken one frame and starts on it: its deadline (``frame_timeout_s``) runs from
    here, and only started frames can be blamed for a worker's death."""

    job_id: int
    """The id of the :class:`FrameJob` taken."""


@dataclass(frozen=True, slots=True)
class Done:
    """The detections of one frame."""

    job_id: int
    """The id of the :class:`FrameJob` answered."""
    detections: FrameDetections
    """What the detector found."""


@dataclass(frozen=True, slots=True)
class Failed:
    """One frame the detector could not answer."""

    job_id: int
    """The id of the :class:`FrameJob` answered."""
    error: TaskError
    """The detector's own task error, or ``InferenceFailedError`` wrapping any other exception."""


FromWorker: TypeAlias = Ready | StartFailed | Started | Done | Failed
"""Everything a worker's result pipe carries."""
