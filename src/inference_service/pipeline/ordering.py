"""In-flight records per partition, released strictly in consumption order.

Frames of a partition are processed in parallel, but their outcomes leave only from the head of the
partition's lane: a finished record waits for every earlier one of its partition. Pure asyncio
bookkeeping, no Kafka: the pipeline adds records as it consumes them and takes the finished
prefix of every lane when it publishes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

from inference_service.domain import Finished, Outcome, Partition


@dataclass(slots=True)
class Slot:
    """One consumed record whose outcome is being computed."""

    offset: int
    work: asyncio.Task[Outcome]
    nbytes: int


class InFlight:
    """Lanes of in-flight records, one per partition."""

    def __init__(self) -> None:
        self._lanes: dict[Partition, deque[Slot]] = {}
        self._count = 0
        self._bytes = 0

    @property
    def count(self) -> int:
        """Records consumed and not yet taken for publishing."""
        return self._count

    @property
    def nbytes(self) -> int:
        """Sum of the record sizes in flight."""
        return self._bytes

    def add(
        self, partition: Partition, offset: int, work: asyncio.Task[Outcome], nbytes: int
    ) -> None:
        lane = self._lanes.setdefault(partition, deque())
        if lane and lane[-1].offset >= offset:
            raise ValueError(
                f"offset {offset} of {partition} after {lane[-1].offset}: lanes only grow"
            )
        lane.append(Slot(offset, work, nbytes))
        self._count += 1
        self._bytes += nbytes

    def ready(self) -> int:
        """How many records :meth:`take_finished` would return now."""
        total = 0
        for lane in self._lanes.values():
            for slot in lane:
                if not slot.work.done():
                    break
                total += 1
        return total

    def take_finished(
        self,
        skip: Collection[Partition] = (),
        same: Callable[[Outcome], object] | None = None,
    ) -> list[Finished]:
        """Remove and return the finished prefix of every lane but ``skip``'s, in order within
        each lane.

        ``same``: what every outcome taken by one call shares (the model that produced it); each
        lane's prefix then stops at its first outcome that differs from the first one taken, and
        the rest waits for the next call.
        """
        out: list[Finished] = []
        first: list[object] = []  # the shared value, once the first outcome is taken
        for partition, lane in self._lanes.items():
            if partition in skip:
                continue
            while lane and lane[0].work.done():
                outcome = lane[0].work.result()
                if same is not None:
                    value = same(outcome)
                    if not first:
                        first.append(value)
                    elif value != first[0]:
                        break
                slot = lane.popleft()
                self._count -= 1
                self._bytes -= slot.nbytes
                out.append(Finished(partition, slot.offset, outcome))
        return out

    def drop(self, partitions: list[Partition] | None = None) -> dict[Partition, int]:
        """Cancel and forget the work of ``partitions`` (all when None).

        Returns the first dropped offset of each partition: where to rewind to.
        """
        chosen = list(self._lanes) if partitions is None else partitions
        first: dict[Partition, int] = {}
        for partition in chosen:
            lane = self._lanes.pop(partition, None)
            if not lane:
                continue
            first[partition] = lane[0].offset
            for slot in lane:
                slot.work.cancel()
                self._count -= 1
                self._bytes -= slot.nbytes
        return first

    def partitions(self) -> list[Partition]:
        return [p for p, lane in self._lanes.items() if lane]

    async def wait_all(self, timeout: float) -> bool:
        """Wait until every in-flight work is done; False on timeout."""
        pending = [slot.work for lane in self._lanes.values() for slot in lane]
        if not pending:
            return True
        _done, not_done = await asyncio.wait(pending, timeout=timeout)
        return not not_done
