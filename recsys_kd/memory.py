"""Process-wide glibc allocator settings: flat peak memory for streaming stages, no page faults per
training step.

Two policies, one per kind of process:

- streaming stages (prepare, reading): :func:`pin_mmap_threshold`, large blocks from fresh mmaps
  returned to the OS on free, so the heap does not fragment as blocks stream through;
- training: :func:`reuse_step_memory`, large blocks kept in the heap for the next step. A training
  step allocates and frees the same activations and gradients every step; served from fresh mmaps,
  every one of their pages faults again on first touch (measured: ~2,600 page faults per step for
  MovieLens' DCN, 25-30% of its CPU time).

Once a process has chosen the training policy, the streaming one (which the reader sets when it is
built) leaves it in place.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Optional

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# glibc's own ceiling for its dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), and its
# rule for the trim threshold that goes with it (twice the mmap threshold): the state a long-running
# glibc process converges to, pinned
STEP_MMAP_THRESHOLD = 32 << 20
STEP_TRIM_THRESHOLD = 2 * STEP_MMAP_THRESHOLD

_training_policy = False


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    """glibc, or None off Linux or without it (the settings are then no-ops)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def pin_mmap_threshold(threshold_bytes: int = 1 << 20) -> bool:
    """Serves glibc allocations above ``threshold_bytes`` from fresh mmaps, returned to the OS on free.

    glibc raises its mmap threshold each time a large block is freed, after which block-sized numpy
    temporaries come from the heap and fragment it: a streaming stage's peak RSS then creeps up
    with the number of blocks processed (measured: +35% from 1M to 5M rows). Pinning the threshold
    turns that off. No-op (returns False) off glibc, and in a process that chose
    :func:`reuse_step_memory`.
    """
    libc = _libc()
    if libc is None or _training_policy:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


def reuse_step_memory() -> bool:
    """Keeps freed blocks below 32 MiB in the heap for reuse (mmap threshold 32 MiB, trim threshold
    64 MiB) for the rest of the process; returns whether glibc took the settings.

    With the streaming policy's 1 MiB mmap threshold (and glibc's 128 KiB trim threshold, which a
    pinned mmap threshold leaves in place) each activation of a [1024, 256] float layer is a fresh
    mmap whose pages fault on first touch, every step; with this policy the next step reuses the
    heap blocks the last one freed. The heap holds at most 64 MiB of freed memory above its
    highest block in use before it returns it to the OS.

    Example::

        reuse_step_memory()  # before the first training step
    """
    global _training_policy
    libc = _libc()
    if libc is None:
        return False
    _training_policy = True
    mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, STEP_MMAP_THRESHOLD)
    trim_set = libc.mallopt(_M_TRIM_THRESHOLD, STEP_TRIM_THRESHOLD)
    return bool(mmap_set and trim_set)
