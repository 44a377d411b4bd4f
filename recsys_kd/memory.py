"""Process-wide memory settings that keep streaming stages' peak memory flat in the input size."""

from __future__ import annotations

import ctypes
import functools
import sys

_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=1)
def pin_mmap_threshold(threshold_bytes: int = 1 << 20) -> bool:
    """Serves glibc allocations above ``threshold_bytes`` from fresh mmaps, returned to the OS on free.

    glibc raises its mmap threshold each time a large block is freed, after which block-sized numpy
    temporaries come from the heap and fragment it: a streaming stage's peak RSS then creeps up
    with the number of blocks processed (measured: +35% from 1M to 5M rows). Pinning the threshold
    turns that off. No-op (returns False) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
