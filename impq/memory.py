"""Giving freed memory back to the operating system, so that a long run's resident size follows what it holds.

glibc serves allocations below its mmap threshold from the heap, and raises that threshold (up to 32 MB) each
time a mapped block is freed: a decoder block's 26 MB float32 matrices then land on the heap, and once freed
they stay resident (fragmented) while the next block's arrive. A fixed threshold maps every large tensor on
its own, and `trim` returns what the heap still holds free. Elsewhere (no glibc) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

_M_MMAP_THRESHOLD = -3          # mallopt's parameter number in glibc's malloc.h


@functools.cache       # find_library runs ldconfig: once per process, not once per decoder block
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def map_large_allocations(threshold: int = 16 << 20) -> None:
    """Allocations of `threshold` bytes or more get their own mapping, returned to the system when freed. 16 MB: below
    a decoder block's matrices, above the grid fits' many short-lived temporaries (2.6-10 MB at Phi-2's width),
    which a fresh mapping each would page-fault in anew: at 1 MB, a Q4_K fit of 2560x256 ran about 1.8x slower."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold))


def trim() -> None:
    """Collect garbage, then hand the heap's free pages back to the system."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))
