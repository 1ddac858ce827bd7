"""The one thread that talks to librdkafka, and a watchdog for calls that may hang.

Every call of the service's consumer and producers runs on :class:`KafkaIO`'s single thread, so
polling, rebalance callbacks, transactions and commits never interleave; the event loop only
awaits that thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from inference_service.errors import HungCallError

T = TypeVar("T")

WATCHDOG_S = 25.0
"""A transactional call still running after this long is treated as hung (librdkafka can ignore
the call's own timeout when the coordinator moves or restarts: librdkafka issues #5456, #5511)."""


class KafkaIO:
    """A single-thread executor shared by the Kafka source and sink of one service."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-io")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the I/O thread and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


def bounded(what: str, fn: Callable[..., T], *args: Any, watchdog_s: float = WATCHDOG_S) -> T:
    """Run ``fn`` on a helper thread; raise :class:`HungCallError` if it outlives ``watchdog_s``.

    The helper thread is left behind on a hang: a stuck librdkafka call cannot be interrupted.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"kafka-{what}", daemon=True)
    thread.start()
    thread.join(watchdog_s)
    if thread.is_alive():
        raise HungCallError(f"{what} did not return within {watchdog_s:.0f} s")
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result
