"""A byte budget for frames held in memory, counted before their bodies are read.

A frame is reserved at an estimate before its GET starts, and the reservation is set to the
object's real size from the response headers before the body is read: the bodies held at once
never exceed the budget by more than one frame, however many tasks are in flight and however large
their objects. The estimate is the largest of the recent frames (the largest allowed before any is
seen), so that fetches of a stream of large frames do not all start at once.
"""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """Bytes reserved by frames being fetched or held; a reservation waits for room."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a byte budget needs a positive limit")
        self.limit = limit
        self.held = 0
        self._room = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        """Reserve ``n`` bytes once they fit (or once nothing else is held: a frame larger than
        the whole budget still goes through, alone)."""
        async with self._room:
            await self._room.wait_for(lambda: self.held == 0 or self.held + n <= self.limit)
            self.held += n

    async def release(self, n: int) -> None:
        async with self._room:
            self.held = max(0, self.held - n)
            self._room.notify_all()


class SizeEstimate:
    """What the next frame will probably weigh: the largest of the last ``window`` frames."""

    def __init__(self, initial: int, window: int = 64) -> None:
        self._initial = initial
        self._recent: deque[int] = deque(maxlen=window)

    def observe(self, size: int) -> None:
        self._recent.append(size)

    def value(self) -> int:
        return max(self._recent) if self._recent else self._initial


class Reservation:
    """One frame's share of a :class:`ByteBudget`, resized once its real size is known."""

    def __init__(self, budget: ByteBudget, estimate: SizeEstimate) -> None:
        self._budget = budget
        self._estimate = estimate
        self.nbytes = 0

    async def start(self) -> None:
        """Reserve the estimate before the fetch starts."""
        self.nbytes = self._estimate.value()
        await self._budget.acquire(self.nbytes)

    async def admit(self, size: int) -> None:
        """Resize to the object's real ``size`` (called before its body is read)."""
        self._estimate.observe(size)
        if size > self.nbytes:
            # Give back the estimate and wait for the whole size: waiting for only the difference
            # while holding the estimate could deadlock two large frames against each other.
            await self._budget.release(self.nbytes)
            self.nbytes = 0
            await self._budget.acquire(size)
        elif size < self.nbytes:
            await self._budget.release(self.nbytes - size)
        self.nbytes = size

    async def close(self) -> None:
        await self._budget.release(self.nbytes)
        self.nbytes = 0


class FrameBudget:
    """The byte budget of one service's frames and the estimate its reservations start from."""

    def __init__(self, limit: int, largest_frame: int) -> None:
        self.bytes = ByteBudget(limit)
        self._estimate = SizeEstimate(initial=min(largest_frame, limit))

    def reservation(self) -> Reservation:
        return Reservation(self.bytes, self._estimate)
