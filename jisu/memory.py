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
    global _pinned
    libc = _libc()
    if libc is None:
        return False
    try:
        ok = libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1
        libc.mallopt(M_TRIM_THRESHOLD, 4 * int(nbytes))
    except AttributeError:
        return False
    _pinned = int(nbytes) if ok else _pinned
    return ok


_pinned = None  # the threshold fixed_mmap_threshold last set (glibc offers no way to read it)


DYNAMIC_MAX = 32 << 20  # the largest mmap threshold glibc's own adjustment reaches (64-bit)


class loading_heap:
    """While loading a model: allocations of `nbytes` or more are mmapped, so conversion
    temporaries leave RSS when freed instead of raising the peak; on exit the thresholds go back to
    a pin set for the whole process (compress), else to where glibc's own adjustment ends up after
    such frees (mmap 32 MB, trim 64 MB), so the steady-state loop reuses heap memory without page
    faults; then the heap is trimmed."""

    def __init__(self, nbytes: int = 256 << 10):
        self.nbytes = nbytes

    def __enter__(self):
        self.before = _pinned
        fixed_mmap_threshold(self.nbytes)
        return self

    def __exit__(self, *exc):
        global _pinned
        if self.before is not None:  # a threshold pinned for the whole process (compress): keep it
            fixed_mmap_threshold(self.before)
        else:
            libc = _libc()
            if libc is not None:
                try:
                    libc.mallopt(M_MMAP_THRESHOLD, DYNAMIC_MAX)
                    libc.mallopt(M_TRIM_THRESHOLD, 2 * DYNAMIC_MAX)
                except AttributeError:
                    pass
            _pinned = None
        trim_heap()
        return False


def _proc_kib(path: str, key: str) -> int | None:
    """A "Key:  N kB" field of a /proc file, in bytes, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes() -> int | None:
    """Memory the kernel says can be allocated without swapping (MemAvailable), or None."""
    return _proc_kib("/proc/meminfo", "MemAvailable:")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far. On Linux VmHWM, because getrusage's ru_maxrss
    carries over across exec the RSS of the parent that spawned this process. (Peers' measurement
    processes load this file by path, without the jisu package: it imports nothing from jisu.)"""
    hwm = _proc_kib("/proc/self/status", "VmHWM:")
    if hwm is not None:
        return hwm
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb if sys.platform == "darwin" else kb * 1024  # Linux reports KiB
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset


def _file_maps():
    """(start, end, inode, path) of each of this process's file-backed mappings (/proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/") and parts[4] != "0":
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    yield lo, hi, parts[4], parts[5]
    except (OSError, ValueError):
        return


def file_mapping(path: str) -> tuple[int, int] | None:
    """(start, end) address of this process's mapping of the file `path` (the first one found in
    /proc/self/maps), or None."""
    import os

    try:
        ino, real = str(os.stat(path).st_ino), os.path.realpath(path)
    except OSError:
        return None
    return next(((lo, hi) for lo, hi, i, p in _file_maps() if i == ino and os.path.realpath(p) == real), None)


def release_mapped(ptr: int, nbytes: int, mapping: tuple[int, int]) -> None:
    """Drop the resident pages of [ptr, ptr + nbytes) inside the read-only file mapping `mapping`
    (from file_mapping): they count in RSS once read, and touched again they come back from the
    page cache. Ranges outside the mapping are left alone (on anonymous memory this would zero it)."""
    import mmap

    libc = _libc()
    if libc is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    lo, hi = max(ptr, mapping[0]), min(ptr + nbytes, mapping[1])
    a, b = -(-lo // page) * page, hi // page * page     # whole pages inside the range only
    if b > a:
        import ctypes

        libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), mmap.MADV_DONTNEED)


HUGE_PAGE = 2 << 20


def huge_pages_on() -> bool:
    """Whether an advised anonymous mapping gets transparent huge pages here (Linux THP mode
    "always" or "madvise"), unless JISU_HUGE_PAGES=0 turns their use off."""
    import os

    if os.environ.get("JISU_HUGE_PAGES", "1").strip() in ("0", "off", "no", "false"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # Linux; COLLAPSE since 6.1


def collapse_huge(ptr: int, nbytes: int) -> bool:
    """Ask Linux to back the whole 2 MB pages inside the anonymous memory [ptr, ptr + nbytes) with
    huge pages now, in place (MADV_COLLAPSE; no copy, so no second buffer). False where the kernel
    refuses (older than 6.1, THP off, a file mapping) or the range holds no whole huge page."""
    libc = _libc()
    a, b = -(-ptr // HUGE_PAGE) * HUGE_PAGE, (ptr + nbytes) // HUGE_PAGE * HUGE_PAGE
    if libc is None or b <= a:
        return False
    import ctypes

    libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), MADV_HUGEPAGE)
    return libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), MADV_COLLAPSE) == 0


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of each of this process's file-backed mappings, sorted."""
    return sorted((lo, hi) for lo, hi, _, _ in _file_maps())


def mapping_holding(ptr: int, maps: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The mapping of `maps` (from file_mappings) that holds address ptr, or None."""
    import bisect

    i = bisect.bisect_right(maps, (ptr, float("inf"))) - 1
    return maps[i] if i >= 0 and maps[i][0] <= ptr < maps[i][1] else None


class HugePageArena:
    """One anonymous mapping, advised for transparent huge pages (Linux `madvise` mode), that
    tensors are copied into back to back (64-byte aligned). The fp32 GEMV over 450 MB streamed
    38-49 GB/s from 2 MB pages against 30-43 GB/s from 4 KB pages in interleaved runs on a 2-core
    Zen 4 (likely the hardware prefetchers stopping at every 4 KB boundary, and the TLB misses).
    One mapping for all of them wastes at most one partial huge page (a mapping per tensor would
    round each one up to 2 MB). Where huge pages are off the mapping simply uses small pages."""

    ALIGN = 64

    def __init__(self, nbytes: int):
        import mmap

        import torch

        self.nbytes = int(nbytes)
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        # private: a shared anonymous mapping is shmem, which follows its own (usually off) THP setting
        self._map = mmap.mmap(-1, self.nbytes + HUGE_PAGE, flags=flags) if flags else mmap.mmap(-1, self.nbytes + HUGE_PAGE)
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # kernel without THP
                pass
        base = torch.frombuffer(self._map, dtype=torch.uint8)  # its storage keeps the mapping alive
        start = (-base.data_ptr()) % HUGE_PAGE
        self._buf = base[start:start + self.nbytes]
        self._used = 0

    @staticmethod
    def round_up(nbytes: int) -> int:
        """The arena bytes a tensor of nbytes takes."""
        return (nbytes + HugePageArena.ALIGN - 1) // HugePageArena.ALIGN * HugePageArena.ALIGN

    @staticmethod
    def size_of(t) -> int:
        return HugePageArena.round_up(t.numel() * t.element_size())

    def empty(self, shape, dtype):
        """An uninitialised contiguous tensor carved from the arena."""
        import math

        import torch

        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if self._used + n > self.nbytes:
            raise MemoryError(f"arena of {self.nbytes} bytes is full ({self._used} used, {n} more asked)")
        out = self._buf[self._used:self._used + n].view(dtype).view(tuple(shape))
        self._used += self.round_up(n)
        return out

    def holds(self, t) -> bool:
        """Whether tensor t's bytes lie in this arena."""
        a = self._buf.data_ptr()
        return a <= t.data_ptr() < a + self.nbytes

    def take(self, t):
        """A copy of tensor t in the arena."""
        out = self.empty(t.shape, t.dtype)
        out.copy_(t)
        return out


def zeroed_tensors(n: int, shape: tuple, dtype=None) -> list:
    """n zero-filled CPU tensors of `shape`, views of one anonymous memory mapping: its pages become
    resident only as positions are written (no fill to pay for), and all of them go back to the OS
    when the last view is freed (a cache taken from the heap instead leaves its freed pages there,
    and caches of other sizes fragment it: RSS then grows by several MB over a few generate calls).
    dtype: a torch dtype (default float32)."""
    import math
    import mmap

    import torch

    dtype = dtype or torch.float32
    per = math.prod(shape)
    nbytes = max(1, n * per * torch.empty(0, dtype=dtype).element_size())
    if nbytes < (1 << 20):  # small caches: the heap is cheaper than a mapping
        return [torch.zeros(shape, dtype=dtype) for _ in range(n)]
    flat = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype)  # the tensor keeps the mapping alive
    return [flat[i * per:(i + 1) * per].view(shape) for i in range(n)]
