"""The one thread that talks to librdkafka, and a watchdog for calls that may hang.

Every call of the service's consumer and producers runs on :class:`KafkaIO`'s single thread, so
polling, rebalance callbacks, transactions and commits never interleave; the event loop only
awaits that thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from inference_service.errors import HungCallError

T = TypeVar("T")

WATCHDOG_S = 25.0
"""A transactional call still running after this long is treated as hung (librdkafka can ignore
the call's own timeout when the coordinator moves or restarts: librdkafka issues #5456, #5511)."""
_STOP_CHECK_S = 0.2
"""How often a wait on a :class:`Call` looks at its stop flag."""


class KafkaIO:
    """A single-thread executor shared by the Kafka source and sink of one service."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-io")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the I/O thread and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class Call(Generic[T]):
    """``fn(*args)`` running on a helper thread of its own, to be waited for in slices.

    A librdkafka call cannot be interrupted: a hung one is left behind, and :attr:`done` tells
    whether it has returned since.
    """

    def __init__(self, what: str, fn: Callable[..., T], *args: Any) -> None:
        self.what = what
        self._box: dict[str, Any] = {}

        def target() -> None:
            try:
                self._box["result"] = fn(*args)
            except BaseException as exc:
                self._box["error"] = exc

        self._thread = threading.Thread(target=target, name=f"kafka-{what}", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout_s: float, stopping: threading.Event | None = None) -> bool:
        """Wait up to ``timeout_s`` (less once ``stopping`` is set); True once the call returned."""
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive():
            left = deadline - time.monotonic()
            if left <= 0 or (stopping is not None and stopping.is_set()):
                return False
            self._thread.join(min(left, _STOP_CHECK_S))
        return True

    def result(self) -> T:
        """What the call returned; raises what it raised. Only after :meth:`wait` returned True."""
        if "error" in self._box:
            raise self._box["error"]
        value: T = self._box["result"]
        return value


def bounded(what: str, fn: Callable[..., T], *args: Any, watchdog_s: float = WATCHDOG_S) -> T:
    """Run ``fn`` on a helper thread; raise :class:`HungCallError` if it outlives ``watchdog_s``.

    The helper thread is left behind on a hang: a stuck librdkafka call cannot be interrupted.
    """
    call = Call(what, fn, *args)
    if not call.wait(watchdog_s):
        raise HungCallError(f"{what} did not return within {watchdog_s:.0f} s")
    return call.result()
