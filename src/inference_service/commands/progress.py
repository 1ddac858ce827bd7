"""Progress of long commands: a tqdm bar on a terminal, a log line every few seconds otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

LOG_EVERY_S = 5.0
"""Seconds between progress lines when stderr is not a terminal."""


class Progress:
    """Counts frames of one command (``name``) and shows the rate."""

    def __init__(self, name: str, total: int | None = None) -> None:
        self._name = name
        self._bar: Any = None
        self._done = 0
        self._started = time.monotonic()
        self._last_log = self._started
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="frame", file=sys.stderr, dynamic_ncols=True, desc=name
            )

    @property
    def done(self) -> int:
        return self._done

    def update(self, n: int = 1) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.info(
                "%s: %d frames, %.1f frames/s",
                self._name,
                self._done,
                self._done / (now - self._started),
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elapsed = time.monotonic() - self._started
        log.info(
            "%s: %d frames in %.1f s (%.1f frames/s)",
            self._name,
            self._done,
            elapsed,
            self._done / elapsed if elapsed > 0 else 0.0,
        )
