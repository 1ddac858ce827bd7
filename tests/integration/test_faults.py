"""Exactly once (and at least once) through broker crashes, hangs and rebalance storms.

Each test runs the real service against the local stack's Apache Kafka broker and hits that
broker or the replicas with real signals: SIGKILL and a restart, SIGSTOP past every watchdog,
replicas started and stopped every few seconds. Results are read ``read_committed`` from the
start, each record once by its offset, so a duplicate is one task at two offsets; a reader's
own re-read never counts. ``scripts/fault_runs`` runs this file ten times in a row.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import ROOT, Pipeline, Service, render_jpegs, task, validate_result
from tests.integration.test_service import stack, wait_metric

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.model, pytest.mark.slow]

FAST_FAILOVER = {
    "INFERENCE_TRANSACTION_TIMEOUT_MS": "20000",
    "INFERENCE_SESSION_TIMEOUT_MS": "6000",
    "INFERENCE_MAX_IN_FLIGHT": "24",
}
"""Settings that keep a dead replica's partitions from waiting long (the defaults work the same,
only slower)."""


# ------------------------------------------------------------------------------------ the broker
def broker_pid() -> int:
    """The pid (and process group) of the local stack's Kafka broker."""
    state = Path(os.environ.get("STACK_DIR") or ROOT / ".stack")
    return int((state / "kafka" / "pid").read_text().strip())


def signal_broker(sig: signal.Signals) -> None:
    os.killpg(broker_pid(), sig)


def restart_broker() -> None:
    """Start the broker again (``scripts/stack up`` starts what is not running, waits until ready)."""
    pid = broker_pid()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    stack("up")


# ------------------------------------------------------------------------------------ the stream
@pytest.fixture
def pipeline6(pipeline: Pipeline, unique_topic: Callable[..., str]) -> Pipeline:
    """The ``pipeline`` fixture with a 6-partition tasks topic."""
    pipeline.tasks_topic = unique_topic(6, "tasks")
    return pipeline


def upload(pipeline: Pipeline, s3: Any, videos: int, frames: int) -> list[tuple[bytes, bytes]]:
    """Frames of ``videos`` videos in S3; their tasks, interleaved video by video."""
    jpegs = render_jpegs(8, seed=11)
    for n, jpeg in enumerate(jpegs):
        s3.put_object(Bucket=pipeline.bucket, Key=f"frames/{n}.jpg", Body=jpeg)
    return [
        task(f"video-{v}", f, f"frames/{(f + v) % len(jpegs)}.jpg")
        for f in range(frames)
        for v in range(videos)
    ]


class Stream:
    """Produces tasks at a steady rate from a thread (the broker may be down meanwhile: the
    producer buffers and retries)."""

    def __init__(self, pipeline: Pipeline, tasks: list[tuple[bytes, bytes]], per_s: float) -> None:
        self._pipeline = pipeline
        self._tasks = tasks
        self._gap = 1.0 / per_s
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._thread.join(timeout=600)

    def _run(self) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self._pipeline.bootstrap, "linger.ms": 5,
                             "enable.idempotence": True, "message.timeout.ms": 600000,
                             "log_level": 0})  # fmt: skip
        for key, value in self._tasks:
            producer.produce(self._pipeline.tasks_topic, key=key, value=value)
            producer.poll(0)
            self.sent += 1
            time.sleep(self._gap)
        assert producer.flush(600) == 0


@dataclass
class Tally:
    """What a ``read_committed`` reader found: each record once, by its offset."""

    by_offset: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)

    @property
    def counts(self) -> Counter[str]:
        return Counter(r["task_id"] for r in self.by_offset.values())

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.counts.values())

    def lost(self, tasks: list[tuple[bytes, bytes]]) -> list[str]:
        expected = {_task_id(v) for _, v in tasks}
        return sorted(expected - set(self.counts))

    def assert_ordered(self) -> None:
        """Per video, in offset order, frame ids never go back except where a duplicate repeats
        what came before (at_least_once)."""
        by_video: dict[str, list[int]] = defaultdict(list)
        for (_p, _o), r in sorted(self.by_offset.items()):
            by_video[r["video_id"]].append(r["frame_id"])
        for video, frames in by_video.items():
            seen: set[int] = set()
            last = -1
            for f in frames:
                if f in seen:
                    continue
                assert f > last, f"{video}: frame {f} after {last}"
                seen.add(f)
                last = f


def read_all(pipeline: Pipeline, expected: int, timeout: float = 300.0) -> Tally:
    """Read the results topic from the start until ``expected`` distinct tasks, then 5 s more."""
    from confluent_kafka import Consumer

    consumer = Consumer({
        "bootstrap.servers": pipeline.bootstrap,
        "group.id": f"fault-reader-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    })  # fmt: skip
    consumer.subscribe([pipeline.results_topic])
    tally = Tally()
    deadline = time.monotonic() + timeout
    settle: float | None = None
    try:
        while time.monotonic() < deadline:
            if settle is None and len(tally.counts) >= expected:
                settle = time.monotonic() + 5
            if settle is not None and time.monotonic() > settle:
                break
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            result = json.loads(msg.value() or b"")
            validate_result(result)
            partition, offset = msg.partition(), msg.offset()
            assert partition is not None and offset is not None
            tally.by_offset[(partition, offset)] = result
    finally:
        consumer.close()
    return tally


def _task_id(value: bytes) -> str:
    body = json.loads(value)
    return f"{body['video_id']}:{body['frame_id']}"


def task_records(pipeline: Pipeline) -> Counter[str]:
    """How many records of each task the tasks topic holds: a producer that re-sent a batch
    (the test's own, through the broker's outage) makes two records, and two results are then
    what the service owes."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": pipeline.bootstrap, "group.id": "task-count",
                         "enable.auto.commit": False, "log_level": 0})  # fmt: skip
    counts: Counter[str] = Counter()
    try:
        meta = consumer.list_topics(pipeline.tasks_topic, timeout=10)
        for n in meta.topics[pipeline.tasks_topic].partitions:
            tp = TopicPartition(pipeline.tasks_topic, n)
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(pipeline.tasks_topic, n, low)])
            seen = low
            deadline = time.monotonic() + 60
            while seen < high and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                counts[_task_id(msg.value() or b"")] += 1
                seen = (msg.offset() or 0) + 1
    finally:
        consumer.close()
    return counts


def check(
    tally: Tally,
    tasks: list[tuple[bytes, bytes]],
    delivery: str,
    in_flight: int,
    pipeline: Pipeline,
) -> None:
    """Nothing lost; exactly one result per task record (exactly_once) or no more extra results
    than were in flight (at_least_once); all ok; per-video order."""
    lost = tally.lost(tasks)
    assert not lost, f"{len(lost)} lost: {lost[:10]}"
    records = task_records(pipeline)
    resent = sum(n - 1 for n in records.values())
    extra = Counter({t: n - records.get(t, 1) for t, n in tally.counts.items()})
    duplicates = sum(n for n in extra.values() if n > 0)
    print(f"\n{len(tasks)} tasks, {duplicates} duplicates ({delivery}); "
          f"{resent} task records sent twice by the test's producer")  # fmt: skip
    if delivery == "exactly_once":
        assert duplicates == 0, extra.most_common(5)
    else:
        assert duplicates <= in_flight, (duplicates, in_flight)
    assert all(r["status"] == "ok" for r in tally.by_offset.values())
    tally.assert_ordered()


def time_to_resume(services: list[Service], what: str, timeout: float = 300.0) -> float:
    """Seconds until the replicas publish a result more than they had published when called."""
    started = time.monotonic()

    def total() -> float:
        n = 0.0
        for svc in services:
            with contextlib.suppress(OSError):
                n += svc.metric("inference_results_total")
        return n

    before = total()
    while time.monotonic() - started < timeout:
        if total() > before:
            took = time.monotonic() - started
            print(f"\n{what}: first new result {took:.1f} s later")
            return took
        time.sleep(0.2)
    raise AssertionError(f"no new result {timeout:.0f} s after {what}")


@pytest.fixture
def broker_restored() -> Iterator[None]:
    """Whatever a test did to the broker, it runs and answers again afterwards."""
    yield
    with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
        signal_broker(signal.SIGCONT)
    stack("up")


# ------------------------------------------------------------------------------------ the tests
def two_replicas(pipeline: Pipeline, delivery: str) -> tuple[dict[str, str], Service, Service]:
    """The fast-failover settings for ``delivery`` and two replicas started with them, ready."""
    opts = {**FAST_FAILOVER, "INFERENCE_DELIVERY": delivery}
    a, b = pipeline.service(**opts), pipeline.service(**opts)
    a.wait_ready()
    b.wait_ready()
    return opts, a, b


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
@pytest.mark.usefixtures("broker_restored")
def test_broker_killed_while_transactions_are_open(
    pipeline6: Pipeline, s3_client: Any, delivery: str
) -> None:
    """SIGKILL of the broker under a steady stream into two replicas, restarted after 4 s."""
    tasks = upload(pipeline6, s3_client, videos=6, frames=50)
    opts, a, b = two_replicas(pipeline6, delivery)
    with Stream(pipeline6, tasks, per_s=25):
        wait_metric(a, "inference_results_total", 10)
        signal_broker(signal.SIGKILL)
        time.sleep(4)
        restart_broker()
        time_to_resume([a, b], "broker restarted (SIGKILL)")
    tally = read_all(pipeline6, len(tasks))
    check(tally, tasks, delivery, 2 * 2 * int(opts["INFERENCE_MAX_IN_FLIGHT"]), pipeline6)
    assert a.proc is not None and a.proc.poll() is None, a.log_tail()
    assert b.proc is not None and b.proc.poll() is None, b.log_tail()


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
@pytest.mark.usefixtures("broker_restored")
def test_broker_frozen_past_every_watchdog(
    pipeline6: Pipeline, s3_client: Any, delivery: str
) -> None:
    """SIGSTOP for 105 s (past the 25 s call watchdog, init_transactions' 45 s and the offset
    fetch's own timeout), then SIGCONT: every call in flight hangs, producers are abandoned and
    replaced under the same transactional id; 0 lost, and 0 duplicates under exactly_once."""
    tasks = upload(pipeline6, s3_client, videos=6, frames=40)
    opts, a, b = two_replicas(pipeline6, delivery)
    with Stream(pipeline6, tasks, per_s=20):
        wait_metric(a, "inference_results_total", 10)
        signal_broker(signal.SIGSTOP)
        try:
            time.sleep(105)
        finally:
            signal_broker(signal.SIGCONT)
        time_to_resume([a, b], "broker resumed (SIGCONT after 105 s)")
    tally = read_all(pipeline6, len(tasks), timeout=400)
    check(tally, tasks, delivery, 2 * 2 * int(opts["INFERENCE_MAX_IN_FLIGHT"]), pipeline6)
    for svc in (a, b):
        assert svc.proc is not None and svc.proc.poll() is None, svc.log_tail()


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_rebalance_storm(pipeline6: Pipeline, s3_client: Any, delivery: str) -> None:
    """For a minute, replicas are started and stopped (SIGTERM and SIGKILL mixed) every few
    seconds while a backlog drains over 6 partitions; then one replica finishes it."""
    tasks = upload(pipeline6, s3_client, videos=6, frames=80)
    opts = {**FAST_FAILOVER, "INFERENCE_DELIVERY": delivery}
    rng = random.Random(20261202)
    pipeline6.produce(tasks)
    live: list[Service] = [pipeline6.service(**opts)]
    live[0].wait_ready()
    kills = 0
    end = time.monotonic() + 60
    while time.monotonic() < end:
        time.sleep(rng.uniform(2, 5))
        if len(live) < 3 and (len(live) < 2 or rng.random() < 0.5):
            live.append(pipeline6.service(**opts))
            continue
        victim = live.pop(rng.randrange(len(live)))
        if rng.random() < 0.5:
            victim.signal(signal.SIGKILL)
            kills += 1
        else:
            victim.signal(signal.SIGTERM)
        victim.wait(timeout=90)
    if not live:
        live.append(pipeline6.service(**opts))
    tally = read_all(pipeline6, len(tasks), timeout=400)
    print(f"storm: {len(pipeline6.services)} replicas started, {kills} SIGKILLed")
    # at_least_once: a SIGKILLed replica may repeat what it had in flight (published, offsets not
    # yet committed); a SIGTERMed one commits before it leaves.
    check(tally, tasks, delivery, (kills + 1) * 2 * int(opts["INFERENCE_MAX_IN_FLIGHT"]), pipeline6)


class Watermarks:
    """The results topic's end offsets as a ``read_uncommitted`` and a ``read_committed`` reader
    see them: where they differ, a transaction is open on that partition (the last stable
    offset stops at its first record until it is committed or aborted)."""

    def __init__(self, pipeline: Pipeline, partitions: int = 3) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self._tps = [TopicPartition(pipeline.results_topic, p) for p in range(partitions)]

        def reader(level: str) -> Any:
            return Consumer({"bootstrap.servers": pipeline.bootstrap, "group.id": f"wm-{level}",
                             "isolation.level": level, "log_level": 0})  # fmt: skip

        self._readers = {level: reader(level) for level in ("read_uncommitted", "read_committed")}

    def open_transactions(self) -> int:
        """Partitions whose last stable offset is behind their high watermark."""
        behind = 0
        for tp in self._tps:
            _lo, high = self._readers["read_uncommitted"].get_watermark_offsets(tp, timeout=5)
            _lo, stable = self._readers["read_committed"].get_watermark_offsets(tp, timeout=5)
            behind += stable < high
        return behind

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


def test_a_replica_killed_and_restarted_with_its_instance_id_resumes_at_once(
    pipeline: Pipeline, s3_client: Any
) -> None:
    """The replica is SIGKILLed while one of its transactions is open (caught by freezing it at
    random moments until the results topic shows an open transaction). Restarted with the same
    instance id, its init_transactions fences its previous incarnation and aborts that
    transaction: ``read_committed`` readers are unblocked and see new results well before the
    transaction timeout (60 s) would have aborted it. What is left is start-up (model, workers)
    and the group noticing the dead member (its session timeout, 6 s here)."""
    tasks = upload(pipeline, s3_client, videos=3, frames=160)
    opts = {"INFERENCE_INSTANCE_ID": f"fixed-{uuid.uuid4().hex[:6]}",
            "INFERENCE_TRANSACTION_TIMEOUT_MS": "60000",
            "INFERENCE_SESSION_TIMEOUT_MS": "6000"}  # fmt: skip
    first = pipeline.service(**opts)
    first.wait_ready()
    # A steady stream while the freezes look for an open transaction: a backlog produced at
    # once can drain before one is caught (a fresh-clone run did), and then none opens again.
    marks = Watermarks(pipeline)
    rng = random.Random(7)
    with Stream(pipeline, tasks, per_s=20):
        wait_metric(first, "inference_results_total", 10)
        unblocked, recovery = _kill_with_a_transaction_open_and_restart(
            pipeline, first, marks, rng, opts
        )
    tally = read_all(pipeline, len(tasks))
    print(f"\nrecovery: {recovery:.1f} s from the restart to the first new result "
          f"(readers unblocked after {unblocked:.1f} s)")  # fmt: skip
    check(tally, tasks, "exactly_once", 0, pipeline)
    assert recovery < 10, f"first new result {recovery:.1f} s after the restart"


def _kill_with_a_transaction_open_and_restart(
    pipeline: Pipeline,
    first: Service,
    marks: Watermarks,
    rng: random.Random,
    opts: dict[str, str],
) -> tuple[float, float]:
    """Freeze ``first`` at random moments until a transaction of it is open, SIGKILL it there
    and restart it under the same id (the stream goes on meanwhile): (readers unblocked, first
    new result) in seconds after the restart."""
    try:
        for _ in range(300):
            # The service's threads, librdkafka's included, stand still.
            first.signal(signal.SIGSTOP)
            if marks.open_transactions():
                time.sleep(0.5)  # a commit already sent completes without the frozen client
                if marks.open_transactions():
                    break
            first.signal(signal.SIGCONT)
            time.sleep(rng.uniform(0.0, 0.05))
        else:
            pytest.fail("never caught the service with a transaction open")
        first.signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert marks.open_transactions(), "the dead replica's transaction is open"
        started = time.monotonic()
        second = pipeline.service(**opts)
        deadline = started + 60
        while marks.open_transactions() and time.monotonic() < deadline:
            time.sleep(0.1)
        unblocked = time.monotonic() - started
        wait_metric(second, "inference_results_total", 1, timeout=60)
        return unblocked, time.monotonic() - started
    finally:
        marks.close()


def test_sigterm_to_the_whole_process_group_drains_without_restarting_workers(
    pipeline: Pipeline, s3_client: Any
) -> None:
    """systemd and a terminal's Ctrl-C signal every process of the group: the workers keep
    answering while the service drains (they ignore the signal), none is restarted, the service
    exits 0, and a successor finishes the rest exactly once."""
    tasks = upload(pipeline, s3_client, videos=3, frames=60)
    svc = pipeline.service()
    svc.wait_ready()
    pipeline.produce(tasks)
    wait_metric(svc, "inference_results_total", 20)
    assert svc.proc is not None
    os.killpg(svc.proc.pid, signal.SIGTERM)
    assert svc.wait(timeout=60) == 0, svc.log_tail()
    log = svc.log_path.read_text(errors="replace")
    assert "died with exit code" not in log, svc.log_tail()
    assert "stopped cleanly" in log
    pipeline.service()
    tally = read_all(pipeline, len(tasks))
    check(tally, tasks, "exactly_once", 0, pipeline)
