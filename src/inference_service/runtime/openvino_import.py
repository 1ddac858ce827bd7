"""``import openvino`` without its usage telemetry.

OpenVINO's first import starts ``openvino_telemetry``, which looks up and contacts an analytics
service unless a consent file in the user's home says no or ``CI=true`` is set (its only switch
besides ``TF_BUILD``/``JENKINS_URL``; measured: a name lookup from every process that imports
it). The service reaches nothing but its Kafka and S3, so the first import runs with ``CI=true``
and the variable is restored afterwards: the consent is decided once, at import.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType


@contextlib.contextmanager
def telemetry_off() -> Iterator[None]:
    """``CI=true`` for the block (OpenVINO's telemetry reads it when it starts), then restored."""
    previous = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = previous


_IMPORT_LOCK = threading.Lock()
"""Two threads importing it first must not interleave the save and restore of ``CI``."""


def import_openvino() -> ModuleType:
    """The ``openvino`` module, its first import made with telemetry off."""
    with _IMPORT_LOCK:
        module = sys.modules.get("openvino")
        if module is not None:
            return module
        with telemetry_off():
            import openvino

        loaded: ModuleType = openvino
        return loaded
