"""This replica's instance id: the stable half of its transactional id.

A transactional id that a restarted replica reuses lets its first ``init_transactions`` fence the
previous incarnation and settle the transaction that one left open (the coordinator aborts it, or
finishes a commit already under way) instead of readers waiting out ``transaction.timeout.ms``.
Two replicas running at once must never share one: each would fence the other.

``INFERENCE_INSTANCE_ID`` names it (a StatefulSet's pod name, say). Unset, it is the host name plus
the lowest *slot* free on this host: slot ``n`` is held by binding a Unix socket in Linux's
abstract namespace (``\\0inference-service/<prefix>/<host>/<n>``) for as long as the process lives.
The kernel releases it when the process ends, however it ends, and nothing on disk can be cleaned
away under it. Processes that share a network namespace (one host, one pod, ``hostNetwork`` pods
on one node, ``--network host`` containers) see each other's slots and get ``<host>-0``,
``<host>-1``, ...; a replica restarted after a crash takes its old slot again. Separate network
namespaces (ordinary pods) each start at slot 0, with their own host (pod) names.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import socket
from dataclasses import dataclass, field

from inference_service.settings import Settings, env_name

log = logging.getLogger(__name__)

MAX_SLOTS = 256
"""Replicas of one prefix on one host that get distinct slots."""
_MAX_NAME = 100
"""Abstract socket names are limited to 107 bytes; longer ones are hashed."""


@dataclass
class InstanceId:
    """A claimed instance id; :meth:`release` gives its slot back (the process's exit does too)."""

    value: str
    _slot: socket.socket | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._slot is not None:
            with contextlib.suppress(OSError):
                self._slot.close()
            self._slot = None


def claim_instance_id(settings: Settings, namespace: str = "inference-service") -> InstanceId:
    """The configured instance id, else ``<host>-<lowest free slot>`` (see the module docstring).

    ``namespace`` prefixes the slots' socket names (tests use their own).
    """
    if settings.instance_id:
        return InstanceId(settings.instance_id)
    host = _safe(socket.gethostname()) or "host"
    prefix = _safe(settings.transactional_id_prefix)
    for slot in range(MAX_SLOTS):
        name = f"{namespace}/{prefix}/{host}/{slot}"
        if len(name) > _MAX_NAME:
            name = f"{namespace}/{hashlib.sha256(name.encode()).hexdigest()[:40]}/{slot}"
        try:
            sock = _bind_abstract(name)
        except OSError as exc:
            fallback = f"{host}-pid-{os.getpid()}"
            log.warning(
                "cannot hold an instance slot (%s): instance id %s, which a restart does not "
                "reuse; set %s for a stable one",
                exc, fallback, env_name("instance_id"),
            )  # fmt: skip
            return InstanceId(fallback)
        if sock is not None:
            return InstanceId(f"{host}-{slot}", sock)
    raise RuntimeError(f"all {MAX_SLOTS} instance slots of this host are taken")


def _bind_abstract(name: str) -> socket.socket | None:
    """A socket bound to ``name`` in the abstract namespace; None if another process holds it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return sock


def _safe(text: str) -> str:
    """``text`` with only the characters a transactional id and a socket name both take."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:200]
