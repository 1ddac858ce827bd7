"""Child processes with the network blocked: what a conversion or quantization test runs them in.

A ``sitecustomize.py`` on the children's ``PYTHONPATH`` makes every connect, name lookup and
``create_connection`` of a non-Unix socket fail and record itself, so a test can assert that a
conversion made offline tried nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SOCKET_BLOCKER = """
import os, socket
_log = os.environ["NET_ATTEMPTS_LOG"]
open(_log + ".loaded", "a").close()
def _record(what, *args):
    with open(_log, "a") as f:
        f.write(f"{what} {args!r}\\n")
    raise OSError("network blocked by the test")
_connect = socket.socket.connect
def connect(self, address, *a):
    if self.family == socket.AF_UNIX:
        return _connect(self, address, *a)
    _record("connect", address)
socket.socket.connect = connect
socket.socket.connect_ex = lambda self, address: _record("connect_ex", address)
socket.getaddrinfo = lambda *a, **k: _record("getaddrinfo", *a)
socket.create_connection = lambda *a, **k: _record("create_connection", *a)
"""


def block_network_in_children(tmp: Path) -> tuple[pytest.MonkeyPatch, Path]:
    """Set the environment that blocks the network in child processes; the patch (undo it when
    done) and the file that records what they tried."""
    blocker = tmp / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SOCKET_BLOCKER)
    attempts = tmp / "net-attempts.log"
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", str(blocker))
    mp.setenv("NET_ATTEMPTS_LOG", str(attempts))
    return mp, attempts
