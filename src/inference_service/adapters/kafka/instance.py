"""This replica's instance id: the stable half of its transactional id.

A transactional id that a restarted replica reuses lets its first ``init_transactions`` fence the
previous incarnation and settle the transaction that one left open (the coordinator aborts it, or
finishes a commit already under way) instead of readers waiting out ``transaction.timeout.ms``.
Two replicas running at once must never share one: each would fence the other.

``INFERENCE_INSTANCE_ID`` names it (a StatefulSet's pod name, say). Unset, it is the host name plus
the lowest *slot* free on this host: slot ``n`` is held by an exclusive lock on a file in the temp
directory for as long as the process lives, so two replicas on one host get ``<host>-0`` and
``<host>-1``, and a replica restarted after a crash (its lock released by the kernel) takes its old
slot again. In a pod the host name is the pod's name and the temp directory its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from inference_service.settings import Settings, env_name

log = logging.getLogger(__name__)

MAX_SLOTS = 256
"""Replicas of one prefix on one host that get distinct slots."""


@dataclass
class InstanceId:
    """A claimed instance id; :meth:`release` gives its slot back (the process's exit does too)."""

    value: str
    _lock: IO[str] | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()
            self._lock = None


def claim_instance_id(settings: Settings, lock_dir: Path | None = None) -> InstanceId:
    """The configured instance id, else ``<host>-<lowest free slot>`` (see the module docstring)."""
    if settings.instance_id:
        return InstanceId(settings.instance_id)
    host = _safe(socket.gethostname()) or "host"
    where = lock_dir or Path(tempfile.gettempdir())
    prefix = _safe(settings.transactional_id_prefix)
    for slot in range(MAX_SLOTS):
        path = where / f"inference-service-{prefix}-{host}-slot-{slot}.lock"
        try:
            handle = path.open("a")
        except OSError as exc:
            fallback = f"{host}-pid-{os.getpid()}"
            log.warning(
                "cannot create the slot lock %s (%s): instance id %s, which a restart does not "
                "reuse; set %s for a stable one",
                path, exc, fallback, env_name("instance_id"),
            )  # fmt: skip
            return InstanceId(fallback)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another replica on this host holds this slot
            handle.close()
            continue
        return InstanceId(f"{host}-{slot}", handle)
    raise RuntimeError(f"all {MAX_SLOTS} instance slots of this host are taken")


def _safe(text: str) -> str:
    """``text`` with only the characters a transactional id and a file name both take."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:200]
