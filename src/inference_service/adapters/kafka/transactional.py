"""``exactly_once``: each commit cycle is one Kafka transaction (results, dead letters, offsets).

The consumed offsets go into the transaction with the consumer's group metadata, so an instance
that lost its partitions (a zombie) is fenced by the group coordinator; metadata that the
coordinator would not check (a consumer between losing its session and rejoining, see
:mod:`.membership`) is never sent: that cycle is rewound instead. The transactional id is
``<prefix>-<instance id>`` (:mod:`.instance`), the same for every producer this process makes and
for its next incarnation: each new producer's ``init_transactions`` fences the ones before it and
settles the transaction they left open before it returns.

A transaction that fails is aborted (the producer replaced when the error is fatal). A call that
hangs past the watchdog abandons its producer (at most one is kept abandoned: while one still
hangs, the next hang waits for it) and starts a new one under the same id, whose
``init_transactions`` fences the abandoned one. Either way the cycle is reported failed with the
first offset of each of its partitions; the pipeline continues them at the group's committed
offsets once it can read them, so a commit that completed after all is never repeated.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from inference_service.adapters.kafka.config import service_producer_config
from inference_service.adapters.kafka.instance import InstanceId, claim_instance_id
from inference_service.adapters.kafka.io import WATCHDOG_S, Call, KafkaIO
from inference_service.adapters.kafka.membership import read_membership
from inference_service.adapters.kafka.produce import produce_outcome
from inference_service.adapters.kafka.source import KafkaTaskSource
from inference_service.domain import Finished, Partition
from inference_service.errors import ConfigError, HungCallError, KafkaUnavailableError
from inference_service.metrics import Metrics
from inference_service.ports import Published
from inference_service.processing import Backoff, MessageLimits
from inference_service.settings import Settings, env_name

log = logging.getLogger(__name__)

T = TypeVar("T")

CALL_TIMEOUT_S = 10.0
"""Longest wait of one transactional call (send offsets, commit, abort)."""
INIT_TIMEOUT_S = 30.0
"""``init_transactions``' own timeout."""
INIT_WATCHDOG_S = INIT_TIMEOUT_S + 15.0
"""``init_transactions`` is declared hung only well after its own timeout: during a coordinator
outage it times out (and is retried on the same producer) rather than abandoning live producers."""
COMMIT_ATTEMPTS = 3
"""Tries of a commit that fails retriably before the transaction is aborted and rewound."""
FLUSH_ON_CLOSE_S = 10.0
STOPPING_WATCHDOG_S = 5.0
"""The watchdog once the service is stopping: a broker that does not answer must not hold the
shutdown past a pod's grace period (the cycle is rewound; the next owner redoes it)."""
FENCES_BEFORE_GIVING_UP = 3
"""Fenced this many times within ``FENCE_WINDOW_S``, the id is shared with a live replica."""
FENCE_WINDOW_S = 120.0
_HUNG_LOG_EVERY_S = 30.0
_ABANDONED_WAIT_MARGIN_S = 30.0


class TransactionalSink:
    """:class:`~inference_service.ports.ResultSink` for ``exactly_once``."""

    def __init__(
        self,
        settings: Settings,
        io: KafkaIO,
        source: KafkaTaskSource,
        metrics: Metrics,
        limits: MessageLimits | None = None,
        stopping: threading.Event | None = None,
        backoff: Backoff | None = None,
        instance: InstanceId | None = None,
    ) -> None:
        self._s = settings
        self._limits = limits
        self._stopping = stopping or threading.Event()
        self._io = io
        self._source = source
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self._instance = instance
        self._producer: Producer | None = None
        self._abandoned: tuple[Producer, Call[Any]] | None = None
        """A producer stuck inside librdkafka and its hung call, kept referenced (destroying it
        would block on that call) until the call returns."""
        self._hung: Call[Any] | None = None
        """The last call that outlived its watchdog (set by :meth:`_bounded`)."""
        self._leaked: list[Producer] = []
        """Abandoned producers whose call never returned, kept referenced to the end."""
        self._fences: list[float] = []

    @property
    def transactional_id(self) -> str:
        """``<prefix>-<group>-<instance id>``: the same for every producer of this instance; the
        group keeps two deployments with the same host or pod names apart."""
        if self._instance is None:
            self._instance = claim_instance_id(self._s)
        return f"{self._s.transactional_id_prefix}-{self._s.group_id}-{self._instance.value}"

    async def open(self) -> None:
        await self._io.call(self._open)

    async def publish(self, finished: list[Finished]) -> Published:
        if not finished:
            return Published()
        return await self._io.call(self._commit_transaction, finished)

    def revoked(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        """Nothing to settle: only committed transactions count, and none is open between cycles."""

    async def close(self) -> None:
        try:
            if self._producer is not None:
                await self._io.call(self._producer.flush, FLUSH_ON_CLOSE_S)
        finally:
            if self._instance is not None:
                self._instance.release()

    # ------------------------------------------------------------------ on the I/O thread
    def _open(self) -> None:
        log.info("transactional id %s", self.transactional_id)
        self._producer = self._start_producer()

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            self._producer = self._start_producer()
        return self._producer

    def _start_producer(self) -> Producer:
        """A producer under this instance's transactional id, its transactions initialised.

        Its ``init_transactions`` fences every earlier producer of the id (an abandoned one, or
        the previous incarnation's) and returns only once the transaction they left open is
        settled, so committed offsets read afterwards are final. Retries until it succeeds or the
        service stops (then :class:`KafkaUnavailableError`).
        """
        producer = self._new_producer()
        attempt = 0
        while True:
            if self._stopping.is_set():
                raise KafkaUnavailableError("stopping before the transactional producer started")
            call: Call[None] = Call("init_transactions", producer.init_transactions, INIT_TIMEOUT_S)
            if not self._wait_out(call, INIT_WATCHDOG_S):
                if self._stopping.is_set():
                    raise KafkaUnavailableError("stopping while init_transactions did not return")
                log.error(
                    "init_transactions did not return within %.0f s; trying a new producer",
                    INIT_WATCHDOG_S,
                )
                self._abandon(producer, call)
                producer = self._new_producer()
                continue
            try:
                call.result()
                return producer
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if not err.retriable():
                    raise
                delay = self._backoff.delay(attempt)
                log.warning("init_transactions failed (%s); retrying in %.1f s", err, delay)
                self._stopping.wait(delay)
                attempt += 1

    def _new_producer(self) -> Producer:
        return Producer(service_producer_config(self._s, self.transactional_id, self._limits))

    def _wait_out(self, call: Call[Any], watchdog_s: float) -> bool:
        """Wait for ``call`` up to ``watchdog_s``; False if it is still running then (or the
        service stops first)."""
        return call.wait(watchdog_s, self._stopping)

    def _bounded(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` under the watchdog; :class:`HungCallError` (``_hung`` set) on a hang."""
        watchdog = STOPPING_WATCHDOG_S if self._stopping.is_set() else WATCHDOG_S
        call: Call[T] = Call(what, fn, *args)
        if not call.wait(watchdog):
            self._hung = call
            raise HungCallError(f"{what} did not return within {watchdog:.0f} s")
        return call.result()

    def _abandon(self, producer: Producer, call: Call[Any]) -> None:
        """Keep ``producer`` (stuck in ``call``) referenced. At most one is kept: while an earlier
        one still hangs this waits for it first, up to the transaction timeout and a margin (by
        then the broker has aborted its transaction; a call that still has not returned is a
        librdkafka bug, and its producer is kept referenced to the end)."""
        if self._abandoned is not None:
            old_call = self._abandoned[1]
            limit = self._s.transaction_timeout_ms / 1000 + _ABANDONED_WAIT_MARGIN_S
            waited = 0.0
            while waited < limit and not old_call.wait(_HUNG_LOG_EVERY_S, self._stopping):
                if self._stopping.is_set():
                    break
                waited += _HUNG_LOG_EVERY_S
                log.error(
                    "a producer abandoned in %s is still stuck after %.0f s more; waiting for it "
                    "(up to %.0f s) before abandoning another",
                    old_call.what, waited, limit,
                )  # fmt: skip
            self._release_abandoned(keep=not old_call.done)
        self._abandoned = (producer, call)
        if self._producer is producer:
            self._producer = None

    def _release_abandoned(self, *, keep: bool = False) -> None:
        """Let go of the abandoned producer: destroyed on a thread of its own (destroying waits
        for librdkafka's threads, which must not hold up the I/O thread), or with ``keep``
        referenced to the end."""
        if self._abandoned is None:
            return
        holder = [self._abandoned[0]]
        self._abandoned = None
        if keep:
            self._leaked.extend(holder)
            return
        threading.Thread(target=holder.clear, name="kafka-dispose", daemon=True).start()

    def _fenced(self) -> None:
        """Count a fence; past :data:`FENCES_BEFORE_GIVING_UP` in the window another running
        replica uses this transactional id, and the service stops saying so."""
        now = time.monotonic()
        self._fences = [t for t in self._fences if now - t < FENCE_WINDOW_S] + [now]
        if len(self._fences) >= FENCES_BEFORE_GIVING_UP:
            raise ConfigError(
                f"fenced {len(self._fences)} times in {FENCE_WINDOW_S:.0f} s: another running "
                f"replica uses transactional id {self.transactional_id}. Give each replica its "
                f"own {env_name('instance_id')} (replicas that share a host name without sharing "
                "a temp directory, e.g. pods with hostNetwork, get the same default)"
            )

    def _commit_transaction(self, items: list[Finished]) -> Published:
        """One transaction with the results and the offsets after them."""
        offsets: dict[Partition, int] = {}
        first: dict[Partition, int] = {}
        for f in items:
            offsets[f.partition] = f.offset + 1
            first.setdefault(f.partition, f.offset)
        try:
            producer = self._ensure_producer()
        except (KafkaException, KafkaUnavailableError) as exc:
            self._metrics.transactions.labels("failed").inc()
            log.warning("no transactional producer (%s); rewinding", exc)
            return Published(rewind=first)
        if self._abandoned is not None and self._abandoned[1].done:
            self._release_abandoned()
        try:
            group_metadata = self._source.consumer.consumer_group_metadata()
        except KafkaException as exc:
            self._metrics.transactions.labels("failed").inc()
            log.warning("no group metadata (%s); rewinding", exc)
            return Published(rewind=first)
        if not self._member(group_metadata):
            self._metrics.transactions.labels("failed").inc()
            log.warning(
                "the consumer is not a member of group %s right now (its session ended; the "
                "loss of its partitions is being served): %d results not committed, rewinding",
                self._s.group_id, len(items),
            )  # fmt: skip
            return Published(rewind=first)
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        started = time.monotonic()
        try:
            producer.begin_transaction()
            for f in items:
                produce_outcome(producer, self._s, f)
            self._bounded(
                "send_offsets_to_transaction",
                producer.send_offsets_to_transaction,
                tps,
                group_metadata,
                CALL_TIMEOUT_S,
            )
            self._commit_with_retries(producer)
        except HungCallError as exc:
            self._metrics.transactions.labels("aborted").inc()
            log.error("%s; abandoning the producer, replacing it and rewinding", exc)
            self._replace_hung(producer)
            return Published(rewind=first)
        except Exception as exc:
            self._metrics.transactions.labels("aborted").inc()
            if not isinstance(exc, KafkaException):
                # Not the broker: a bug while producing. Abort, so no half cycle stays open.
                log.exception("transaction failed unexpectedly; aborting and rewinding")
                self._abort_quietly(producer)
                return Published(rewind=first)
            err: KafkaError = exc.args[0]
            if err.fatal():
                log.error("fatal producer error, replacing the producer: %s", err)
                if err.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED):
                    self._fenced()  # raises once the id is evidently shared
                self._replace_producer(producer)
            else:
                log.warning("transaction failed (%s); aborting and rewinding", err)
                self._abort_quietly(producer)
            return Published(rewind=first)
        self._metrics.transactions.labels("committed").inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "committed %d results in %.0f ms, offsets %s",
                len(items),
                (time.monotonic() - started) * 1000,
                {f"{t}[{p}]": (first[(t, p)], o) for (t, p), o in offsets.items()},
            )
        return Published(published=items)

    def _member(self, group_metadata: object) -> bool:
        """Whether offsets sent with ``group_metadata`` are checked by the group coordinator
        (see :mod:`.membership`); librdkafka's member id where the format is not the known one."""
        membership = read_membership(group_metadata)
        if membership is not None:
            return membership.live
        return bool(self._source.consumer.memberid())

    def _commit_with_retries(self, producer: Producer) -> None:
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                self._bounded("commit_transaction", producer.commit_transaction, CALL_TIMEOUT_S)
                return
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                last = attempt == COMMIT_ATTEMPTS - 1
                if not err.retriable() or err.txn_requires_abort() or last:
                    raise
                log.warning("commit failed (%s); retrying", err)
                self._stopping.wait(self._backoff.delay(attempt))

    def _replace_hung(self, producer: Producer) -> None:
        """Abandon ``producer`` (its call hung) and start its replacement at once: the
        replacement's ``init_transactions`` fences it before any committed offset is read."""
        hung = self._hung
        self._hung = None
        if hung is not None:
            self._abandon(producer, hung)
        self._restart_producer()

    def _replace_producer(self, producer: Producer) -> None:
        with contextlib.suppress(Exception):
            producer.flush(0)
        self._restart_producer()

    def _restart_producer(self) -> None:
        """A new producer under the same id now; if it cannot start, the next cycle tries again."""
        self._producer = None
        try:
            self._producer = self._start_producer()
        except (KafkaException, KafkaUnavailableError) as exc:
            log.warning("the replacement producer did not start (%s); retried next cycle", exc)

    def _abort_quietly(self, producer: Producer) -> None:
        try:
            self._bounded("abort_transaction", producer.abort_transaction, CALL_TIMEOUT_S)
        except HungCallError as exc:
            log.error("%s; abandoning the producer", exc)
            self._replace_hung(producer)
        except KafkaException as exc:
            log.warning("abort failed (%s); replacing the producer", exc)
            self._replace_producer(producer)
