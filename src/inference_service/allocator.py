"""Make the C allocator give large blocks back to the operating system as soon as they are freed.

Frames pass through the service as large buffers (S3 bodies, the pickled jobs on each worker's
queue, decoded pixels), tens of MB each. glibc's ``malloc`` serves blocks above its mmap threshold
with ``mmap`` and unmaps them on ``free``, but it raises that threshold to the size of every such
block freed (up to 32 MiB on 64-bit), after which blocks of frame size come from its heaps and
arenas instead, where freed memory stays resident: measured here, a pool fed 64 undecodable
30 MB frames three at a time grew by 460-550 MB and kept it, against 213 MB, flat from the first
round on, with the threshold fixed. Fixing the threshold (``mallopt(M_MMAP_THRESHOLD, …)``) also
turns that adjustment off. Other C libraries (musl) already return large blocks; there this does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 1 << 20
"""Blocks of this size and above are mapped and unmapped one by one (glibc's default is 128 KiB,
raised dynamically; 1 MiB keeps the many mid-sized allocations of decoding in the heap)."""
_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def release_large_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` for this process; False where not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    except (OSError, AttributeError) as exc:
        log.debug("mallopt unavailable: %s", exc)
        return False
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", threshold)
    return ok
