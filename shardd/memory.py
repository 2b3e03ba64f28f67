"""Process memory helpers for the worker: keep the C allocator from hoarding freed values.

A worker's values are bytes objects; those over 512 bytes come from glibc malloc. glibc
serves blocks of at least M_MMAP_THRESHOLD (128 KiB) with their own mmap, returned to the
kernel on free, but it *raises* that threshold to the size of any mmapped block freed
(up to 32 MiB). After a few 1 MiB values are evicted, every later 1 MiB value lands in
the heap, where freed space is reused but fragmented and rarely given back: RSS drifts far
above what the store accounts (the failure behind dragonfly#224-style reports). Setting the
threshold explicitly turns that adjustment off (mallopt(3)); a lower trim threshold gives
heap tops back sooner.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("shardd.memory")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# glibc's initial default: blocks from 128 KiB up get their own mapping.
MMAP_THRESHOLD = 128 * 1024
TRIM_THRESHOLD = 1024 * 1024


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.warning("mallopt failed; RSS may drift above max_memory with large values")
    return ok
