"""The service loop driven through in-memory ports: no broker, no S3, seconds to run."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import pytest

from inference_service.domain import (
    BBox,
    Detection,
    Finished,
    FrameDetections,
    ImageSize,
    ModelInfo,
    Partition,
    Priority,
    Record,
)
from inference_service.errors import ConfigError, FrameNotFoundError
from inference_service.metrics import Metrics
from inference_service.pipeline import Pipeline, PipelineConfig
from inference_service.ports import Admit, PartitionListener, Published
from inference_service.processing import Backoff, TaskProcessor

TOPIC = "tasks"
INFO = ModelInfo("best.pt", "0" * 64, (320, 320), 0.25, 0.45, "fake/fp32", ("disc",))


def config(**overrides: float) -> PipelineConfig:
    values: dict[str, float] = {
        "max_in_flight": 16,
        "max_in_flight_bytes": 1 << 30,
        "max_poll_records": 8,
        "max_task_bytes": 1 << 20,
        "commit_interval_s": 0.02,
        "shutdown_timeout_s": 5.0,
    }
    values.update(overrides)
    return PipelineConfig(
        max_in_flight=int(values["max_in_flight"]),
        max_in_flight_bytes=int(values["max_in_flight_bytes"]),
        max_poll_records=int(values["max_poll_records"]),
        max_task_bytes=int(values["max_task_bytes"]),
        commit_interval_s=values["commit_interval_s"],
        shutdown_timeout_s=values["shutdown_timeout_s"],
    )


def task_value(video: str, frame: int, pad: int = 0) -> bytes:
    task = {"video_id": video, "frame_id": frame, "s3_key": f"{video}/{frame}.jpg"}
    if pad:
        task["meta"] = {"pad": "x" * pad}
    return json.dumps(task).encode()


# ---------------------------------------------------------------------------------- the fakes
class FakeSource:
    """Partitions of records in memory, with positions, pause state and committed offsets."""

    def __init__(self, partitions: dict[int, list[bytes]]) -> None:
        self.log: dict[Partition, list[bytes]] = {(TOPIC, p): v for p, v in partitions.items()}
        self.position: dict[Partition, int] = dict.fromkeys(self.log, 0)
        self.committed_offsets: dict[Partition, int] = {}
        self.paused = False
        self.pause_changes: list[bool] = []
        self.seeks: list[dict[Partition, int]] = []
        self.listener: PartitionListener | None = None
        self.before_poll: list[Callable[[FakeSource], None]] = []
        self.polls = 0
        self.on_poll: Callable[[], None] | None = None
        self.on_pause_change: Callable[[bool], None] | None = None
        self.held: set[Partition] = set()
        self.unreadable = 0
        """Upcoming ``committed`` calls that cannot read anything (a broker that does not answer)."""
        self.failing_seeks = 0
        """Upcoming ``seek`` calls that fail for every partition."""
        self.committed_calls = 0

    @property
    def ready(self) -> bool:
        return self.listener is not None

    async def open(self, listener: PartitionListener) -> None:
        self.listener = listener
        listener.assigned(list(self.log))

    async def poll(self, max_records: int) -> list[Record]:
        await asyncio.sleep(0.001)
        self.polls += 1
        if self.on_poll is not None:
            self.on_poll()
        for hook in list(self.before_poll):
            hook(self)
        if self.paused:
            return []
        out: list[Record] = []
        for part, values in self.log.items():
            if part in self.held:
                continue
            while self.position[part] < len(values) and len(out) < max_records:
                offset = self.position[part]
                out.append(Record(TOPIC, part[1], offset, b"k", values[offset]))
                self.position[part] += 1
        return out

    async def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.pause_changes.append(paused)
        if self.on_pause_change is not None:
            self.on_pause_change(paused)

    async def committed(self, partitions: Sequence[Partition]) -> dict[Partition, int | None]:
        self.committed_calls += 1
        if self.unreadable:
            self.unreadable -= 1
            return {}
        return {p: self.committed_offsets.get(p) for p in partitions}

    async def seek(self, positions: dict[Partition, int]) -> set[Partition]:
        if self.failing_seeks:
            self.failing_seeks -= 1
            return set()
        self.seeks.append(dict(positions))
        self.position.update(positions)
        return set(positions)

    async def hold(self, partitions: Sequence[Partition]) -> None:
        self.held.update(partitions)

    async def release(self, partitions: Sequence[Partition]) -> None:
        self.held.difference_update(partitions)

    async def close(self) -> None:
        assert self.listener is not None
        self.listener.revoked(list(self.log), lost=False)

    def revoke(self, partition: Partition) -> None:
        """Take ``partition`` away during the next poll (as a rebalance would)."""

        def hook(source: FakeSource) -> None:
            assert source.listener is not None
            source.listener.revoked([partition], lost=False)
            del source.log[partition]
            source.before_poll.remove(hook)

        self.before_poll.append(hook)


class FakeTransactionalSink:
    """Commits each cycle atomically into ``topic``; ``fail`` scripts failed cycles."""

    def __init__(self, source: FakeSource) -> None:
        self.source = source
        self.topic: list[Finished] = []
        self.cycles: list[tuple[float, int]] = []
        self.fail: list[str] = []
        """Per upcoming non-empty cycle: "abort" (nothing committed) or "late" (committed although
        reported failed, as a lost commit answer would look)."""
        self.revocations: list[Partition] = []

    async def open(self) -> None:
        return None

    async def publish(self, finished: list[Finished]) -> Published:
        if not finished:
            return Published()
        first: dict[Partition, int] = {}
        for f in finished:
            first.setdefault(f.partition, f.offset)
        mode = self.fail.pop(0) if self.fail else "ok"
        if mode == "raise":
            raise RuntimeError("a sink bug")
        if mode == "config":
            raise ConfigError("INFERENCE_INSTANCE_ID is shared")
        if mode != "abort":
            self.topic.extend(finished)
            self.cycles.append((time.monotonic(), len(finished)))
            for f in finished:
                self.source.committed_offsets[f.partition] = f.offset + 1
        if mode == "ok":
            return Published(published=finished)
        return Published(rewind=first)

    def revoked(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        self.revocations.extend(partitions)

    async def close(self) -> None:
        return None


class FakeStore:
    def __init__(self, missing: set[str] | None = None) -> None:
        self.missing = missing or set()

    async def get(self, bucket: str, key: str, admit: Admit | None = None) -> bytes:
        if key in self.missing:
            raise FrameNotFoundError(f"no object s3://{bucket}/{key}")
        return key.encode()

    async def check(self, bucket: str) -> None:
        return None


class FakeDetector:
    """Finishes frames after a random delay (random completion order), or when a gate opens."""

    info = INFO

    def __init__(self, seed: int = 0, max_delay_s: float = 0.004) -> None:
        self.rng = random.Random(seed)
        self.max_delay_s = max_delay_s
        self.gates: dict[str, asyncio.Event] = {}

    async def detect(
        self, data: bytes, *, priority: Priority = Priority.PIPELINE
    ) -> FrameDetections:
        video = data.decode().split("/")[0]
        if video in self.gates:
            await self.gates[video].wait()
        await asyncio.sleep(self.rng.random() * self.max_delay_s)
        det = Detection(0, "disc", 0.9, BBox(1, 2, 3, 4))
        return FrameDetections(ImageSize(64, 48), (det,), 0.1, 0.1, 0.1, 0.1)

    def ready(self) -> bool:
        return True


def make_pipeline(
    source: FakeSource,
    sink: FakeTransactionalSink,
    cfg: PipelineConfig,
    detector: FakeDetector | None = None,
    store: FakeStore | None = None,
) -> Pipeline:
    processor = TaskProcessor(
        store or FakeStore(), detector or FakeDetector(), "frames", backoff=Backoff(0.001, 0.002)
    )
    return Pipeline(cfg, source, sink, processor, Metrics(), backoff=Backoff(0.001, 0.002))


async def run_until(pipeline: Pipeline, done: Callable[[], bool], timeout_s: float = 20.0) -> None:
    task = asyncio.ensure_future(pipeline.run())
    deadline = time.monotonic() + timeout_s
    while not done():
        if task.done():
            task.result()
            raise AssertionError("the pipeline stopped by itself")
        if time.monotonic() > deadline:
            pipeline.stop()
            await task
            raise AssertionError("timed out")
        await asyncio.sleep(0.005)
    pipeline.stop()
    await asyncio.wait_for(task, timeout=10)


def published(sink: FakeTransactionalSink) -> dict[Partition, list[int]]:
    out: dict[Partition, list[int]] = {}
    for f in sink.topic:
        out.setdefault(f.partition, []).append(f.offset)
    return out


def frames_of(sink: FakeTransactionalSink) -> list[tuple[str, int]]:
    out = []
    for f in sink.topic:
        assert f.outcome.result is not None
        out.append((f.outcome.result["video_id"], f.outcome.result["frame_id"]))
    return out


# ---------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("seed", range(5))
def test_results_leave_in_consumption_order_per_partition(seed: int) -> None:
    n = 60
    source = FakeSource({p: [task_value(f"v{p}", i) for i in range(n)] for p in range(3)})
    sink = FakeTransactionalSink(source)
    pipeline = make_pipeline(source, sink, config(), FakeDetector(seed))
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == 3 * n))
    got = published(sink)
    assert got == {(TOPIC, p): list(range(n)) for p in range(3)}
    assert all(f.outcome.status == "ok" for f in sink.topic)
    assert len(set(frames_of(sink))) == 3 * n


def test_in_flight_never_exceeds_the_count_limit_and_consumption_pauses() -> None:
    n, limit = 200, 10
    source = FakeSource({0: [task_value("v", i) for i in range(n)]})
    sink = FakeTransactionalSink(source)
    cfg = config(max_in_flight=limit, max_poll_records=64)
    pipeline = make_pipeline(source, sink, cfg, FakeDetector(max_delay_s=0.02))
    seen: list[int] = []
    at_resume: list[int] = []
    source.on_poll = lambda: seen.append(pipeline.in_flight)
    source.on_pause_change = lambda paused: None if paused else at_resume.append(pipeline.in_flight)
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == n))
    assert max(seen) <= limit
    assert max(seen) >= limit * 3 // 4, "the loop never filled the room it has"
    # consumption paused and resumed, alternating (every change a real one), far fewer times than
    # there were records: not a toggle per finished frame
    changes = source.pause_changes
    assert changes[0] is True and len(changes) >= 2
    assert all(a != b for a, b in itertools.pairwise(changes))
    assert len(changes) < n // 4
    # hysteresis: consumption resumes only once in-flight work is down to three quarters
    assert at_resume and max(at_resume) <= limit * 3 // 4


def test_in_flight_bytes_bounded_by_the_byte_limit() -> None:
    n, size = 100, 10_000
    limit = 5 * size
    source = FakeSource({0: [task_value("v", i, pad=size) for i in range(n)]})
    sink = FakeTransactionalSink(source)
    cfg = config(max_in_flight=1000, max_in_flight_bytes=limit, max_poll_records=1)
    pipeline = make_pipeline(source, sink, cfg)
    held: list[int] = []
    source.on_poll = lambda: held.append(pipeline._inflight.nbytes)
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == n))
    record_size = len(task_value("v", 99, pad=size)) + 1
    # the bytes check runs before each poll of at most one record: one record over, at most
    assert max(held) <= limit + record_size
    assert max(held) >= limit - record_size
    assert source.pause_changes[:2] == [True, False]  # the byte limit paused, draining resumed


def test_a_cycle_publishes_once_a_quarter_of_the_room_is_ready() -> None:
    # a long interval: every cycle must come from the ready share (16 // 4 = 4 results)
    n = 64
    source = FakeSource({0: [task_value("v", i) for i in range(n)]})
    sink = FakeTransactionalSink(source)
    cfg = config(max_in_flight=16, max_poll_records=16, commit_interval_s=60.0)
    pipeline = make_pipeline(source, sink, cfg, FakeDetector(max_delay_s=0.0))
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) >= n - 4, timeout_s=10))
    assert sink.cycles, "nothing was published before the interval"
    assert all(size >= 4 for _t, size in sink.cycles)


def test_a_cycle_publishes_on_the_interval_when_few_results_are_ready() -> None:
    n = 5
    source = FakeSource({0: [task_value("v", i) for i in range(n)]})
    sink = FakeTransactionalSink(source)
    cfg = config(max_in_flight=400, commit_interval_s=0.3)
    pipeline = make_pipeline(source, sink, cfg, FakeDetector(max_delay_s=0.0))
    started = time.monotonic()
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == n))
    first_cycle_at = sink.cycles[0][0] - started
    assert 0.25 <= first_cycle_at < 2.0
    assert sink.cycles[0][1] == n  # all five in one cycle: the share (100) was never reached


def test_a_revocation_mid_cycle_drops_that_partition_s_work_unpublished() -> None:
    n = 20
    source = FakeSource(
        {0: [task_value("a", i) for i in range(n)], 1: [task_value("b", i) for i in range(n)]}
    )
    sink = FakeTransactionalSink(source)
    detector = FakeDetector()
    gate = asyncio.Event()
    detector.gates["b"] = gate  # partition 1's frames hang until after the revocation
    held_before: list[Partition] = []
    held_after: list[Partition] = []

    async def scenario() -> None:
        pipeline = make_pipeline(source, sink, config(max_in_flight=64), detector)
        revoked = False

        def revoke_once_b_is_in_flight() -> None:
            nonlocal revoked
            if revoked:
                if not held_after:  # the poll after the revocation: what is still held?
                    held_after.extend([*pipeline._inflight.partitions(), ("checked", -1)])
                return
            if source.position[(TOPIC, 1)] >= 5:
                revoked = True
                held_before.extend(pipeline._inflight.partitions())
                source.revoke((TOPIC, 1))
                asyncio.get_running_loop().call_later(0.05, gate.set)

        source.on_poll = revoke_once_b_is_in_flight
        await run_until(
            pipeline, lambda: len(published(sink).get((TOPIC, 0), [])) == n and gate.is_set()
        )
        await asyncio.sleep(0.1)  # the dropped frames have finished by now: none may appear

    asyncio.run(scenario())
    got = published(sink)
    assert (TOPIC, 1) not in got
    assert got[(TOPIC, 0)] == list(range(n))
    assert (TOPIC, 1) in held_before  # its frames were in flight when it was revoked ...
    assert ("checked", -1) in held_after and (TOPIC, 1) not in held_after  # ... and dropped
    assert sink.revocations and sink.revocations[0] == (TOPIC, 1)


def test_a_failed_cycle_rewinds_to_the_committed_offsets_and_repeats_nothing() -> None:
    n = 40
    source = FakeSource(
        {0: [task_value("v", i) for i in range(n)], 1: [task_value("w", i) for i in range(n)]}
    )
    sink = FakeTransactionalSink(source)
    sink.fail = ["ok", "abort", "ok", "late", "abort"]
    pipeline = make_pipeline(source, sink, config(max_in_flight=8, max_poll_records=4))
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == 2 * n))
    assert len(source.seeks) == 3
    for seek in source.seeks:
        for part, offset in seek.items():
            # every rewind lands on what the group had committed at that moment, never before it
            assert offset <= source.committed_offsets[part]
    got = published(sink)
    assert got == {(TOPIC, 0): list(range(n)), (TOPIC, 1): list(range(n))}  # no duplicate, no gap


def test_a_rewind_without_committed_offsets_resumes_at_the_cycle_s_first_record() -> None:
    n = 12
    source = FakeSource({0: [task_value("v", i) for i in range(n)]})
    sink = FakeTransactionalSink(source)
    sink.fail = ["abort"]
    pipeline = make_pipeline(source, sink, config(max_in_flight=4, max_poll_records=4))
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == n))
    assert source.seeks[0] == {(TOPIC, 0): 0}
    assert published(sink) == {(TOPIC, 0): list(range(n))}


def test_a_partition_whose_committed_offset_cannot_be_read_waits_and_repeats_nothing() -> None:
    """The "late" commit went through although the sink reported the cycle failed; while the
    group's offsets cannot be read the partition is held (never resumed at the cycle's first
    record, which would publish that cycle twice), and it resumes at the committed offset."""
    n = 24
    source = FakeSource({0: [task_value("v", i) for i in range(n)]})
    sink = FakeTransactionalSink(source)
    sink.fail = ["late"]
    source.unreadable = 3
    pipeline = make_pipeline(source, sink, config(max_in_flight=4, max_poll_records=4))
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == n))
    assert source.committed_calls >= 4  # three unreadable answers, then the offsets
    assert len(source.seeks) == 1
    assert source.seeks[0][(TOPIC, 0)] == 4  # where the late commit left the group
    assert published(sink) == {(TOPIC, 0): list(range(n))}  # no duplicate, no gap
    assert not source.held


def test_work_is_dropped_only_once_the_seek_succeeded() -> None:
    """Seeks that fail leave the partition held with its work: nothing past the failed cycle is
    published from the consumer's old position, and the records are not lost."""
    n = 24
    source = FakeSource({0: [task_value("v", i) for i in range(n)]})
    sink = FakeTransactionalSink(source)
    sink.fail = ["ok", "abort"]
    source.failing_seeks = 4
    pipeline = make_pipeline(source, sink, config(max_in_flight=4, max_poll_records=4))
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == n))
    assert len(source.seeks) == 1
    assert published(sink) == {(TOPIC, 0): list(range(n))}


def test_a_configuration_error_of_the_sink_stops_the_loop() -> None:
    """Unlike a sink bug (the cycle is retried), a setting to fix ends the service with its
    message: retrying cannot help."""
    source = FakeSource({0: [task_value("v", i) for i in range(8)]})
    sink = FakeTransactionalSink(source)
    sink.fail = ["config"]
    pipeline = make_pipeline(source, sink, config(max_in_flight=4, max_poll_records=4))
    with pytest.raises(ConfigError, match="INFERENCE_INSTANCE_ID"):
        asyncio.run(asyncio.wait_for(pipeline.run(), timeout=10))


def test_bad_tasks_get_error_results_in_their_place() -> None:
    values = [task_value("v", i) for i in range(10)]
    values[3] = b"{not json"
    values[6] = json.dumps({"video_id": "v", "frame_id": "six"}).encode()
    source = FakeSource({0: values})
    sink = FakeTransactionalSink(source)
    store = FakeStore(missing={"v/8.jpg"})
    pipeline = make_pipeline(source, sink, config(), store=store)
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == 10))
    statuses = [f.outcome.status for f in sink.topic]
    assert [f.offset for f in sink.topic] == list(range(10))
    assert statuses[3] == "invalid_task" and sink.topic[3].outcome.result is None
    assert statuses[6] == "invalid_task" and sink.topic[6].outcome.result is not None
    assert statuses[8] == "frame_not_found"
    assert all(s == "ok" for i, s in enumerate(statuses) if i not in (3, 6, 8))
    assert all(sink.topic[i].outcome.dead_letter is not None for i in (3, 6, 8))


def test_an_oversized_record_becomes_an_invalid_task_result() -> None:
    values = [task_value("v", 0), task_value("v", 1, pad=5000), task_value("v", 2)]
    source = FakeSource({0: values})
    sink = FakeTransactionalSink(source)
    pipeline = make_pipeline(source, sink, config(max_task_bytes=1000))
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == 3))
    assert [f.outcome.status for f in sink.topic] == ["ok", "invalid_task", "ok"]
    assert "INFERENCE_MAX_TASK_BYTES" in sink.topic[1].outcome.result["error"]["message"]  # type: ignore[index]


def test_stop_finishes_in_flight_work_and_publishes_it() -> None:
    n = 30
    source = FakeSource({0: [task_value("v", i) for i in range(n)]})
    sink = FakeTransactionalSink(source)
    pipeline = make_pipeline(
        source,
        sink,
        config(max_in_flight=64, max_poll_records=64, commit_interval_s=60.0),
        FakeDetector(max_delay_s=0.05),
    )

    async def scenario() -> None:
        task = asyncio.ensure_future(pipeline.run())
        while source.position[(TOPIC, 0)] < n:
            await asyncio.sleep(0.001)
        pipeline.stop()  # everything consumed, nothing published yet (interval 60 s)
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert published(sink) == {(TOPIC, 0): list(range(n))}


def test_a_sink_that_raises_fails_the_cycle_and_the_loop_goes_on() -> None:
    n = 16
    source = FakeSource({0: [task_value("v", i) for i in range(n)]})
    sink = FakeTransactionalSink(source)
    sink.fail = ["raise", "ok", "raise"]
    pipeline = make_pipeline(source, sink, config(max_in_flight=4, max_poll_records=4))
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == n))
    assert len(source.seeks) == 2
    assert published(sink) == {(TOPIC, 0): list(range(n))}


# ---------------------------------------------------------------------------------- model swap
class SwappingModels:
    """Two fake models behind a lease, as the model slot offers one: after :meth:`switch`, the
    records started from then on use the second."""

    def __init__(self, seed: int = 0, max_delay_s: float = 0.004) -> None:
        self.old = FakeDetector(seed, max_delay_s)
        self.new = FakeDetector(seed + 1, max_delay_s)
        self.new.info = replace(INFO, sha256="1" * 64)
        self.serving = self.old

    def switch(self) -> None:
        self.serving = self.new

    @contextlib.contextmanager
    def lease(self) -> Iterator[FakeDetector]:
        yield self.serving


def swapping_pipeline(
    source: FakeSource, sink: FakeTransactionalSink, cfg: PipelineConfig, models: SwappingModels
) -> Pipeline:
    processor = TaskProcessor(
        FakeStore(), models.old, "frames", backoff=Backoff(0.001, 0.002), lease=models.lease
    )
    return Pipeline(cfg, source, sink, processor, Metrics(), backoff=Backoff(0.001, 0.002))


def model_of(f: Finished) -> str:
    """The first character of the sha256 the result carries ("0" old, "1" new)."""
    assert f.outcome.result is not None
    sha: str = f.outcome.result["model"]["sha256"]
    assert sha == f.outcome.model_sha256
    return sha[0]


def cycles_of(sink: FakeTransactionalSink) -> list[list[Finished]]:
    out, start = [], 0
    for _at, n in sink.cycles:
        out.append(sink.topic[start : start + n])
        start += n
    return out


def test_records_started_before_a_swap_keep_the_old_model_and_cycles_never_mix() -> None:
    n = 10
    source = FakeSource({p: [task_value(f"v{p}", i) for i in range(n)] for p in range(2)})
    sink = FakeTransactionalSink(source)
    models = SwappingModels()
    models.old.gates["v0"] = asyncio.Event()  # partition 0's old records wait for the switch

    def maybe_switch() -> None:
        if source.polls == 3:
            models.switch()
            for p in range(2):
                source.log[(TOPIC, p)].extend(task_value(f"v{p}", i) for i in range(n, 2 * n))
            models.old.gates["v0"].set()  # detected after the switch, on the old model

    source.on_poll = maybe_switch
    cfg = config(max_in_flight=64, max_poll_records=64)
    pipeline = swapping_pipeline(source, sink, cfg, models)
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == 4 * n))
    assert published(sink) == {(TOPIC, p): list(range(2 * n)) for p in range(2)}
    for p in range(2):
        lane = [model_of(f) for f in sink.topic if f.partition == (TOPIC, p)]
        assert lane == ["0"] * n + ["1"] * n, (p, lane)
    for cycle in cycles_of(sink):
        assert len({model_of(f) for f in cycle}) == 1, [model_of(f) for f in cycle]


@pytest.mark.parametrize("seed", range(3))
def test_a_swap_mid_stream_gives_each_partition_old_then_new(seed: int) -> None:
    n = 60
    source = FakeSource({p: [task_value(f"v{p}", i) for i in range(n)] for p in range(3)})
    sink = FakeTransactionalSink(source)
    models = SwappingModels(seed, max_delay_s=0.01)
    source.on_poll = lambda: models.switch() if len(sink.topic) >= 40 else None
    pipeline = swapping_pipeline(source, sink, config(max_in_flight=24), models)
    asyncio.run(run_until(pipeline, lambda: len(sink.topic) == 3 * n))
    assert published(sink) == {(TOPIC, p): list(range(n)) for p in range(3)}
    for p in range(3):
        lane = "".join(model_of(f) for f in sink.topic if f.partition == (TOPIC, p))
        assert lane == "0" * lane.count("0") + "1" * lane.count("1"), lane
    assert {model_of(f) for f in sink.topic} == {"0", "1"}
    for cycle in cycles_of(sink):
        assert len({model_of(f) for f in cycle}) == 1


def test_a_stop_publishes_the_outcomes_of_both_models() -> None:
    n = 8
    source = FakeSource({0: [task_value("v", i) for i in range(n)]})
    sink = FakeTransactionalSink(source)
    models = SwappingModels()

    def maybe_switch() -> None:
        if source.polls == 3:
            models.switch()
            source.log[(TOPIC, 0)].extend(task_value("v", i) for i in range(n, 2 * n))

    source.on_poll = maybe_switch
    cfg = config(max_in_flight=64, max_poll_records=64, commit_interval_s=60.0)
    pipeline = swapping_pipeline(source, sink, cfg, models)

    async def scenario() -> None:
        task = asyncio.ensure_future(pipeline.run())
        while source.position[(TOPIC, 0)] < 2 * n:
            await asyncio.sleep(0.001)
        pipeline.stop()  # all consumed, nothing published yet: the drain publishes both models
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert published(sink) == {(TOPIC, 0): list(range(2 * n))}
    assert [len(c) for c in cycles_of(sink)] == [n, n]
