"""Process memory: returning freed heap to the OS, and the peak resident set.

glibc serves large allocations with mmap only below a threshold that it raises each time such a
block is freed (up to 32 MB); past that, big temporaries come from the heap and their pages stay
resident after they are freed. Compressing a model allocates and frees hundreds of such tensors,
and its peak RSS used to swing between 0.9 and 3 GB from run to run for that reason alone.
`fixed_mmap_threshold()` pins the threshold (glibc then stops adjusting it), so every large
temporary goes back to the OS when it is freed."""
from __future__ import annotations

import gc
import sys

M_TRIM_THRESHOLD = -1   # glibc mallopt parameters
M_MMAP_THRESHOLD = -3


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap(collect: bool = False) -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, inflating RSS)."""
    if collect:
        gc.collect()
    libc = _libc()
    if libc is not None:
        try:
            libc.malloc_trim(0)
        except AttributeError:  # not glibc
            pass


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Allocations of nbytes or more are mmapped (and unmapped when freed) from now on, in the whole
    process; returns False where this is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    try:
        ok = libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1
        libc.mallopt(M_TRIM_THRESHOLD, 4 * int(nbytes))
        return ok
    except AttributeError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far. On Linux VmHWM, because getrusage's ru_maxrss
    carries over across exec the RSS of the parent that spawned this process. (jisu/eval/speed.py
    has a copy: peers' measurement processes run that file without importing jisu.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb if sys.platform == "darwin" else kb * 1024  # Linux reports KiB
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset
