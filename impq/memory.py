"""Giving freed memory back to the operating system, so that a long run's resident size follows what it holds;
and what each stage of a run held at its peak.

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
import resource
import threading
import time
import weakref
from pathlib import Path

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


class StageSampler:
    """Wall time and peak resident memory of each stage of a run, one after another. The peak is sampled from
    /proc/self/statm every 50 ms (the kernel's own high-water mark cannot be read per stage without resetting it,
    which would hide the run's peak from whoever started the process); elsewhere the process's peak so far.
    The sampler holds only a weak reference: it ends with `begin(None)` or when a failed run drops its stages."""

    def __init__(self):
        self.record: dict = {}
        self._current: list | None = None       # [name, start, peak bytes]
        self._stop = threading.Event()
        threading.Thread(target=_sample_stages, args=(weakref.ref(self), self._stop), daemon=True).start()

    def begin(self, name: str | None) -> None:
        """End the current stage (if any) and begin `name` (None: end, and stop sampling)."""
        if self._current:
            stage, start, peak = self._current
            self.record[stage] = {"seconds": round(time.perf_counter() - start, 2),
                                  "peak_rss_mb": round(max(peak, _rss_bytes()) / 2 ** 20)}
        self._current = [name, time.perf_counter(), _rss_bytes()] if name else None
        if name is None:
            self._stop.set()


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sample_stages(stages_ref, stop: threading.Event) -> None:
    while not stop.wait(0.05):
        stages = stages_ref()
        if stages is None:
            return
        current = stages._current
        del stages
        if current:
            current[2] = max(current[2], _rss_bytes())
