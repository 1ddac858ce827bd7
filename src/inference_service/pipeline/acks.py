"""at_least_once bookkeeping: which outcomes the broker acknowledged, what may be committed.

An offset may be committed only when every earlier record of its partition has been acknowledged
(result and dead letter alike): committing past an unacknowledged record would lose it on a
restart. Pure logic; the acknowledging sink feeds it from the producer's delivery reports.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from inference_service.domain import Partition


@dataclass(slots=True)
class _Lane:
    """Offsets of one partition published and not yet committed, in order."""

    pending: deque[int] = field(default_factory=deque)
    """Offsets sent, oldest first."""
    waiting: dict[int, int] = field(default_factory=dict)
    """Per offset, the messages (result, dead letter) not yet acknowledged."""
    failed: int | None = None
    """The lowest offset a message of which the broker refused."""
    generation: int = 0
    """Which incarnation of the partition's lane this is: a report for a message sent before the
    lane was reset (a refusal, a revocation) must not count for the offset sent again since."""

    def take_committable(self) -> int | None:
        """Offset to commit (last contiguous acknowledged + 1), removing that prefix."""
        last: int | None = None
        while self.pending and self.waiting.get(self.pending[0], 0) <= 0:
            last = self.pending.popleft()
            self.waiting.pop(last, None)
        return None if last is None else last + 1


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a commit cycle of the acknowledging sink should do."""

    commit: dict[Partition, int]
    """Offsets to commit now (including ones whose earlier commit failed)."""
    rewind: dict[Partition, int]
    """Partitions with a refused message: consume again from that offset."""


class AckLedger:
    """Per partition, the offsets published, acknowledged and committed."""

    def __init__(self) -> None:
        self._lanes: dict[Partition, _Lane] = {}
        self._uncommitted: dict[Partition, int] = {}
        self._generations = 0

    def sent(self, partition: Partition, offset: int, messages: int = 1) -> int:
        """``messages`` messages of the record at ``offset`` were handed to the producer; the
        lane's generation, to give back with each report (:meth:`delivered`)."""
        lane = self._lanes.get(partition)
        if lane is None:
            self._generations += 1
            lane = self._lanes[partition] = _Lane(generation=self._generations)
        if lane.pending and lane.pending[-1] >= offset:
            raise ValueError(f"offset {offset} of {partition} after {lane.pending[-1]}")
        lane.pending.append(offset)
        lane.waiting[offset] = messages
        return lane.generation

    def delivered(self, partition: Partition, offset: int, ok: bool, generation: int) -> None:
        """The broker's answer for one message of the record at ``offset``."""
        lane = self._lanes.get(partition)
        if lane is None or lane.generation != generation or offset not in lane.waiting:
            return  # sent before the lane was reset or forgotten
        if ok:
            lane.waiting[offset] -= 1
        else:
            lane.failed = offset if lane.failed is None else min(lane.failed, offset)

    def settle(self, partitions: Iterable[Partition] | None = None) -> Settlement:
        """Take the committable prefix of the lanes of ``partitions`` (all when None); a lane
        with a refusal is reset. The commit covers those partitions only."""
        chosen = set(self._lanes) if partitions is None else set(partitions)
        rewind: dict[Partition, int] = {}
        for partition, lane in list(self._lanes.items()):
            if partition not in chosen:
                continue
            offset = lane.take_committable()
            if offset is not None:
                self._uncommitted[partition] = offset
            if lane.failed is not None:
                rewind[partition] = lane.failed
                del self._lanes[partition]
        if partitions is None:
            commit = dict(self._uncommitted)
        else:
            commit = {p: o for p, o in self._uncommitted.items() if p in chosen}
        return Settlement(commit=commit, rewind=rewind)

    def committed(self, offsets: dict[Partition, int]) -> None:
        """``offsets`` are committed: no need to commit them again."""
        for partition, offset in offsets.items():
            if self._uncommitted.get(partition) == offset:
                del self._uncommitted[partition]

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Drop the bookkeeping of ``partitions`` (revoked or lost)."""
        for partition in partitions:
            self._lanes.pop(partition, None)
            self._uncommitted.pop(partition, None)

    @property
    def idle(self) -> bool:
        """Nothing awaits an acknowledgement or a commit."""
        return not self._uncommitted and not any(lane.pending for lane in self._lanes.values())
