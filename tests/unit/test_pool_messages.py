"""The pool's typed messages and the worker's handling of them, without a supervisor."""

from __future__ import annotations

import logging
import multiprocessing
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from inference_service.domain import FrameDetections, ImageSize, ModelInfo
from inference_service.errors import InferenceFailedError, TaskError, UndecodableFrameError
from inference_service.pool.messages import (
    Done,
    Failed,
    FrameJob,
    FromWorker,
    RawFrame,
    Ready,
    Started,
    StartFailed,
    Stop,
    ToWorker,
)
from inference_service.pool.worker import answer, warm_up, worker_main

pytestmark = pytest.mark.timeout(60)

INFO = ModelInfo(
    name="fake.pt", sha256="0" * 64, imgsz=(64, 64), conf=0.25, iou=0.45, runtime="fake/fp32"
)
FOUND = FrameDetections(ImageSize(5, 7), (), 1.0, 2.0, 3.0, 4.0)


@dataclass
class FakeDetector:
    """``ok`` → FOUND; ``bad`` → undecodable; anything else → a plain bug. Arrays: their shape."""

    warmed_up: bool = False
    warmups: int = 0
    info: ModelInfo = field(default=INFO)

    def warmup(self) -> None:
        self.warmups += 1
        self.warmed_up = True

    def detect(self, data: bytes) -> FrameDetections:
        if data == b"ok":
            return FOUND
        if data == b"bad":
            raise UndecodableFrameError("not an image")
        raise ValueError("a bug")

    def detect_array(self, image: Any) -> FrameDetections:
        h, w = image.shape[:2]
        return FrameDetections(ImageSize(w, h), (), float(image.sum()), 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class FakeFactory:
    fail: bool = False

    def __call__(self) -> FakeDetector:
        if self.fail:
            raise RuntimeError("no such model")
        return FakeDetector()


@pytest.mark.parametrize(
    "message",
    [
        FrameJob(3, b"\xff\xd8 jpeg"),
        FrameJob(4, RawFrame(bytes(range(6)), 1, 2)),
        Stop(),
        Ready(INFO),
        StartFailed("RuntimeError", "no such model"),
        Started(4),
        Done(5, FOUND),
    ],
)
def test_messages_survive_pickling(message: ToWorker | FromWorker) -> None:
    assert pickle.loads(pickle.dumps(message)) == message


def test_a_failure_keeps_its_error_type_and_message_through_pickling() -> None:
    back = pickle.loads(pickle.dumps(Failed(6, UndecodableFrameError("not an image"))))
    assert isinstance(back, Failed)
    assert back.job_id == 6
    assert type(back.error) is UndecodableFrameError
    assert back.error.message == "not an image"


def test_messages_are_immutable() -> None:
    with pytest.raises(AttributeError):
        Done(1, FOUND).job_id = 2  # type: ignore[misc]


def test_an_encoded_frame_is_answered_with_its_detections() -> None:
    assert answer(FakeDetector(), FrameJob(1, b"ok")) == Done(1, FOUND)


def test_a_raw_frame_goes_to_detect_array_with_its_shape() -> None:
    image = np.zeros((7, 5, 3), dtype=np.uint8)
    image[1, 2] = (1, 2, 3)
    out = answer(FakeDetector(), FrameJob(2, RawFrame(image.tobytes(), 7, 5)))
    assert isinstance(out, Done)
    assert (out.detections.image.width, out.detections.image.height) == (5, 7)
    assert out.detections.decode_ms == 6.0


@pytest.mark.parametrize(
    ("data", "error_type", "text"),
    [
        (b"bad", UndecodableFrameError, "not an image"),
        (b"boom", InferenceFailedError, "ValueError: a bug"),
    ],
)
def test_a_failed_frame_is_answered_with_a_task_error(
    data: bytes, error_type: type[TaskError], text: str
) -> None:
    out = answer(FakeDetector(), FrameJob(3, data))
    assert isinstance(out, Failed)
    assert out.job_id == 3
    assert type(out.error) is error_type
    assert out.error.message == text


def test_warm_up_runs_once_and_skips_a_detector_that_warmed_itself() -> None:
    cold = FakeDetector()
    warm_up(cold)
    assert cold.warmups == 1
    warm = FakeDetector(warmed_up=True)
    warm_up(warm)
    assert warm.warmups == 0


def test_a_load_failure_is_reported_as_start_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging, "basicConfig", lambda **_: None)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    tasks: multiprocessing.Queue[ToWorker] = ctx.Queue()
    worker_main(0, FakeFactory(fail=True), tasks, send, ctx.Event(), 1)
    assert receive.recv() == StartFailed("RuntimeError", "no such model")
    with pytest.raises(EOFError):
        receive.recv()  # the worker closed its end
    tasks.close()


def test_a_worker_process_answers_jobs_and_ends_on_stop() -> None:
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    tasks: multiprocessing.Queue[ToWorker] = ctx.Queue()
    stop = ctx.Event()  # held here: the child opens it by name once it has started
    process = ctx.Process(
        target=worker_main, args=(0, FakeFactory(), tasks, send, stop, 1), daemon=True
    )
    process.start()
    send.close()
    try:
        assert receive.poll(30)
        assert receive.recv() == Ready(INFO)
        tasks.put(FrameJob(1, b"ok"))
        assert receive.poll(10)
        assert receive.recv() == Started(1)  # before the answer: the deadline runs from here
        assert receive.recv() == Done(1, FOUND)
        tasks.put(FrameJob(2, b"bad"))
        assert receive.poll(10)
        assert receive.recv() == Started(2)
        failed = receive.recv()
        assert isinstance(failed, Failed)
        assert type(failed.error) is UndecodableFrameError
        tasks.put(Stop())
        process.join(10)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
            process.join(1)
        tasks.close()
        receive.close()
