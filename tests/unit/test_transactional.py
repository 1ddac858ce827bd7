"""The exactly_once sink's producer life cycle (fenced replacement, watchdogs, stopping) and the
instance id behind its transactional id, against a scripted stand-in for librdkafka's producer."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaError, KafkaException

from inference_service.adapters.kafka import transactional
from inference_service.adapters.kafka.instance import InstanceId, claim_instance_id
from inference_service.adapters.kafka.io import KafkaIO
from inference_service.adapters.kafka.membership import Membership, read_membership
from inference_service.adapters.kafka.transactional import (
    INIT_TIMEOUT_S,
    INIT_WATCHDOG_S,
    TransactionalSink,
)
from inference_service.domain import Finished, Outcome
from inference_service.errors import ConfigError, KafkaUnavailableError
from inference_service.metrics import Metrics
from inference_service.processing import Backoff
from inference_service.settings import Settings

Script = Callable[["FakeProducer", str], None]
"""Called at each transactional call (``init``, ``commit``) of a producer: may block or raise."""


class FakeProducer:
    """Records what the sink does; ``script`` decides how each call behaves."""

    made: ClassVar[list[FakeProducer]] = []
    script: ClassVar[Script] = staticmethod(lambda producer, call: None)

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.calls: list[str] = []
        self.created = time.monotonic()
        FakeProducer.made.append(self)

    @property
    def index(self) -> int:
        return FakeProducer.made.index(self)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        FakeProducer.script(self, name)

    def init_transactions(self, _timeout: float) -> None:
        self._call("init")

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def produce(self, *_args: Any, **_kwargs: Any) -> None:
        self.calls.append("produce")

    def send_offsets_to_transaction(self, *_args: Any) -> None:
        self.calls.append("offsets")

    def commit_transaction(self, _timeout: float) -> None:
        self._call("commit")

    def abort_transaction(self, _timeout: float) -> None:
        self._call("abort")

    def flush(self, _timeout: float = 0) -> int:
        return 0


def group_metadata(generation: int, member_id: str) -> bytes:
    """librdkafka's serialised group metadata (see ``membership``), as the client hands it out."""
    return (b"CGMDv2:" + struct.pack("=i", generation) + b"group\0" + member_id.encode()
            + b"\0\1")  # fmt: skip


class FakeConsumer:
    metadata = group_metadata(3, "rdkafka-member-1")

    def consumer_group_metadata(self) -> object:
        return self.metadata

    def memberid(self) -> str | None:
        return None


class FakeSource:
    consumer = FakeConsumer()


@pytest.fixture(autouse=True)
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    FakeProducer.made = []
    FakeProducer.script = staticmethod(lambda producer, call: None)
    monkeypatch.setattr(transactional, "Producer", FakeProducer)
    monkeypatch.setattr(transactional, "WATCHDOG_S", 0.3)
    monkeypatch.setattr(transactional, "INIT_WATCHDOG_S", 0.3)
    monkeypatch.setattr(transactional, "_HUNG_LOG_EVERY_S", 0.1)
    yield


def make_sink(stopping: threading.Event | None = None) -> TransactionalSink:
    return TransactionalSink(
        Settings(),
        KafkaIO(),
        FakeSource(),  # type: ignore[arg-type]
        Metrics(),
        stopping=stopping,
        backoff=Backoff(0.01, 0.02),
        instance=InstanceId("replica-a"),
    )


def items() -> list[Finished]:
    outcome = Outcome(key=b"v", result={"ok": True}, dead_letter=None, status="ok",
                      timings_ms={}, payload=b"{}")  # fmt: skip
    return [Finished(("tasks", 0), 7, outcome), Finished(("tasks", 0), 8, outcome)]


def retriable_timeout() -> KafkaException:
    return KafkaException(KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True))


def test_a_hung_commit_is_replaced_under_the_same_transactional_id() -> None:
    """The replacement's init_transactions is what fences the abandoned producer: it must carry
    the same transactional id (not a new generation's), and it runs before the cycle is
    reported failed, i.e. before the pipeline reads the committed offsets."""
    release = threading.Event()

    def script(producer: FakeProducer, call: str) -> None:
        if producer.index == 0 and call == "commit":
            release.wait(10)

    FakeProducer.script = staticmethod(script)
    sink = make_sink()

    async def go() -> Any:
        await sink.open()
        return await sink.publish(items())

    outcome = asyncio.run(go())
    release.set()
    assert outcome.rewind == {("tasks", 0): 7}
    ids = {p.config["transactional.id"] for p in FakeProducer.made}
    assert ids == {"inference-service-inference-group-replica-a"}  # prefix, group, instance
    assert len(FakeProducer.made) == 2
    assert FakeProducer.made[1].calls == ["init"]  # initialised (fencing) before publish returned


def test_init_transactions_timing_out_is_retried_on_the_same_producer() -> None:
    """A coordinator outage makes init_transactions time out (its own timeout, under a longer
    watchdog): the same producer tries again; no live producer is abandoned."""
    failures = [retriable_timeout(), retriable_timeout(), retriable_timeout()]

    def script(_producer: FakeProducer, call: str) -> None:
        if call == "init" and failures:
            raise failures.pop()

    FakeProducer.script = staticmethod(script)
    sink = make_sink()
    asyncio.run(sink.open())
    assert len(FakeProducer.made) == 1
    assert FakeProducer.made[0].calls == ["init"] * 4
    # The real watchdog outlasts the call's own timeout, so a timeout is never taken for a hang.
    assert INIT_WATCHDOG_S > INIT_TIMEOUT_S


def test_at_most_one_producer_is_kept_abandoned() -> None:
    """A second hang waits for the first abandoned producer's call to return before it abandons
    another: stuck producers (and their threads) never pile up."""
    first_stuck = threading.Event()
    returned_at: list[float] = []

    def script(producer: FakeProducer, call: str) -> None:
        if producer.index == 0 and call == "commit":
            first_stuck.wait(10)
            returned_at.append(time.monotonic())
        if producer.index == 1 and call == "init":
            time.sleep(0.6)  # hangs past the (patched) init watchdog

    FakeProducer.script = staticmethod(script)
    sink = make_sink()
    threading.Timer(1.2, first_stuck.set).start()

    async def go() -> Any:
        await sink.open()
        return await sink.publish(items())

    outcome = asyncio.run(go())
    assert outcome.failed
    assert len(FakeProducer.made) == 3
    assert returned_at, "the first abandoned call returned"
    # The third producer was made only after the first abandoned one's call had returned.
    assert FakeProducer.made[2].created >= returned_at[0]


def test_a_transactional_id_shared_with_a_live_replica_stops_the_service() -> None:
    """Fenced again and again: another running replica has this id. Replacing the producer each
    time would fence that one in turn, forever; the service stops naming the setting instead."""

    def script(_producer: FakeProducer, call: str) -> None:
        if call == "commit":
            raise KafkaException(KafkaError(KafkaError.PRODUCER_FENCED, "fenced", fatal=True))

    FakeProducer.script = staticmethod(script)
    sink = make_sink()

    async def go() -> None:
        await sink.open()
        for _ in range(transactional.FENCES_BEFORE_GIVING_UP):
            outcome = await sink.publish(items())
            assert outcome.failed

    with pytest.raises(ConfigError, match="INFERENCE_INSTANCE_ID"):
        asyncio.run(go())


def _failing_init(_producer: FakeProducer, call: str) -> None:
    if call == "init":
        time.sleep(0.05)
        raise retriable_timeout()


def _hung_init(_producer: FakeProducer, call: str) -> None:
    if call == "init":
        time.sleep(5)


@pytest.mark.parametrize("script", [_failing_init, _hung_init], ids=["failing", "hung"])
def test_stopping_ends_start_up_during_a_coordinator_outage(script: Script) -> None:
    """SIGTERM while init_transactions keeps failing or hangs ends start-up promptly."""
    FakeProducer.script = staticmethod(script)
    stopping = threading.Event()
    sink = make_sink(stopping)
    threading.Timer(0.3, stopping.set).start()
    started = time.monotonic()
    with pytest.raises(KafkaUnavailableError):
        asyncio.run(sink.open())
    assert time.monotonic() - started < 2
    assert len(FakeProducer.made) <= 2  # the hung one abandoned once at most


# ------------------------------------------------------------------------------------ instance ids
def test_replicas_on_one_host_get_distinct_slots_and_a_restart_takes_its_old_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "node/7")
    settings = Settings()
    space = f"test-{uuid.uuid4().hex}"
    a = claim_instance_id(settings, space)
    b = claim_instance_id(settings, space)
    assert (a.value, b.value) == ("node_7-0", "node_7-1")
    a.release()  # as the kernel does when a crashed replica's process ends
    c = claim_instance_id(settings, space)
    assert c.value == "node_7-0"
    b.release()
    c.release()


def test_a_slot_is_held_by_the_process_not_by_its_children() -> None:
    """A worker process spawned by the service must not keep the slot after the service died."""
    space = f"test-{uuid.uuid4().hex}"
    claim = claim_instance_id(Settings(), space)
    code = (
        "import sys; from inference_service.adapters.kafka.instance import claim_instance_id;"
        "from inference_service.settings import Settings;"
        f"print(claim_instance_id(Settings(), {space!r}).value)"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip().endswith("-1")  # another process sees slot 0 taken
    claim.release()
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert again.stdout.strip().endswith("-0")


def test_a_configured_instance_id_is_used_as_it_is() -> None:
    claim = claim_instance_id(Settings(instance_id="pod-3"))
    assert claim.value == "pod-3"
    assert claim._slot is None


def test_an_instance_id_a_transactional_id_cannot_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="instance_id"):
        Settings(instance_id="pod 3; rm")


@pytest.mark.parametrize(
    ("generation", "member_id"),
    [(-1, ""), (-1, "rdkafka-member-1"), (4, "")],
    ids=["no-membership", "generation-reset", "member-reset"],
)
def test_offsets_are_never_sent_with_metadata_the_coordinator_would_not_check(
    monkeypatch: pytest.MonkeyPatch, generation: int, member_id: str
) -> None:
    """Between losing its session and rejoining, librdkafka's group metadata carries generation
    -1 and/or no member id; the coordinator accepts a transactional offset commit without them
    (an empty group takes it as an outside producer's), so sending it would commit partitions
    another member has started again. The cycle is rewound without a transaction."""
    monkeypatch.setattr(FakeConsumer, "metadata", group_metadata(generation, member_id))
    sink = make_sink()

    async def go() -> Any:
        await sink.open()
        return await sink.publish(items())

    outcome = asyncio.run(go())
    assert outcome.rewind == {("tasks", 0): 7}
    assert outcome.published == []
    assert FakeProducer.made[0].calls == ["init"]  # no begin, no produce, no offsets


def test_a_live_membership_commits() -> None:
    sink = make_sink()

    async def go() -> Any:
        await sink.open()
        return await sink.publish(items())

    outcome = asyncio.run(go())
    assert not outcome.failed
    assert FakeProducer.made[0].calls == ["init", "begin", "produce", "produce", "offsets",
                                          "commit"]  # fmt: skip


def test_the_membership_is_read_from_librdkafkas_own_metadata() -> None:
    """The format parsed is the one the installed librdkafka writes: a consumer that has not
    joined its group carries generation -1 and no member id."""
    from confluent_kafka import Consumer

    consumer = Consumer({"group.id": "g-membership", "bootstrap.servers": "127.0.0.1:9",
                         "log_level": 0})  # fmt: skip
    try:
        membership = read_membership(consumer.consumer_group_metadata())
    finally:
        consumer.close()
    assert membership == Membership(-1, "")
    assert not membership.live
    assert read_membership(group_metadata(7, "m")) == Membership(7, "m")
    assert read_membership(group_metadata(7, "m")).live  # type: ignore[union-attr]
    assert read_membership(b"CGMDv9:...") is None
    assert read_membership(b"CGMDv2:\1\0") is None
