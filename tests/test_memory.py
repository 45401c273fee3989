"""jisu.memory: freed temporaries go back to the OS once the mmap threshold is pinned."""
import subprocess
import sys

import pytest

from jisu.memory import peak_rss_bytes

SCRIPT = r"""
import sys
import torch
from jisu.memory import fixed_mmap_threshold

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

pinned = sys.argv[1] == "1"
if pinned:
    assert fixed_mmap_threshold(1 << 20)
# one freed 16 MB block makes glibc raise its threshold to 16 MB (unless pinned) ...
t = torch.ones(4 << 20)
del t
base = rss()
# ... so these 4 MB blocks then come from the heap; a live block above them keeps the heap from
# shrinking when they are freed
keep = [torch.ones(1 << 20) for _ in range(40)]
top = torch.ones(50_000)
del keep
print((rss() - base) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_pinned_threshold_returns_freed_temporaries():
    def grown(pinned: bool) -> float:
        return float(subprocess.run([sys.executable, "-c", SCRIPT, "1" if pinned else "0"], capture_output=True,
                                    text=True, check=True).stdout)

    assert grown(True) < 16  # 160 MB were allocated and freed
    if grown(False) < 100:
        pytest.skip("this allocator returns such blocks by itself")


def test_peak_rss_is_positive():
    assert peak_rss_bytes() > 10 * 2**20


def test_loading_keeps_a_threshold_pinned_for_the_process(monkeypatch):
    """jisu.load inside a compress run (which pins the threshold for its whole process) leaves the
    process's pin in place afterwards."""
    from jisu import memory

    calls = []
    monkeypatch.setattr(memory, "fixed_mmap_threshold", lambda n=1 << 20: calls.append(n) or True)
    monkeypatch.setattr(memory, "_pinned", 1 << 20)
    with memory.loading_heap(256 << 10):
        pass
    assert calls == [256 << 10, 1 << 20]


KV_SCRIPT = r"""
import gc
import torch
from jisu.memory import zeroed_tensors

w = torch.zeros(1, 4, 32, 64)       # torch's own first-use allocations before the baseline
w[:, :, :16] = 1.0
assert not w[:, :, 16:32].any() and bool((w[:, :, :16] == 1).all())
del w

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

base = rss()
kv = zeroed_tensors(8, (1, 4, 4096, 64))          # 8 x 4 MB, one mapping
untouched = rss() - base
for t in kv:
    t[:, :, :16] = 1.0                              # a few positions written: a few pages resident
written = rss() - base
assert all(not t[:, :, 16:32].any() and bool((t[:, :, :16] == 1).all()) for t in kv)
keep = torch.ones(50_000)                           # a live block after the cache ...
del kv, t
gc.collect()
print(untouched / 2**20, written / 2**20, (rss() - base) / 2**20)   # ... does not keep it resident
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous mappings")
def test_kv_cache_memory_is_resident_only_where_written_and_freed_whole():
    out = subprocess.run([sys.executable, "-c", KV_SCRIPT], capture_output=True, text=True, check=True).stdout
    untouched, written, after = (float(v) for v in out.split())
    assert untouched < 4 and written < 8 and after < 4   # of the 32 MB the cache spans


def test_zeroed_tensors_are_independent_zero_views():
    import torch

    from jisu.memory import zeroed_tensors

    for shape in [(2, 3, 5, 4), (1, 2, 4096, 64)]:      # below and above the mapping's size
        ts = zeroed_tensors(3, shape)
        assert [tuple(t.shape) for t in ts] == [shape] * 3
        assert all(t.is_contiguous() and t.dtype == torch.float32 and not t.any() for t in ts)
        ts[1].fill_(2.0)
        assert not ts[0].any() and not ts[2].any() and bool((ts[1] == 2).all())


def test_huge_page_arena_carves_aligned_copies():
    import torch

    from jisu.memory import HUGE_PAGE, HugePageArena

    a = torch.randn(100, 7)
    b = torch.arange(10, dtype=torch.int64)
    arena = HugePageArena(HugePageArena.size_of(a) + HugePageArena.size_of(b))
    ca, cb = arena.take(a), arena.take(b)
    assert torch.equal(ca, a) and torch.equal(cb, b) and ca.dtype == a.dtype and cb.shape == b.shape
    assert ca.data_ptr() % HUGE_PAGE == 0 and cb.data_ptr() % HugePageArena.ALIGN == 0
    assert arena.holds(ca) and arena.holds(cb) and not arena.holds(a)
    ca[0, 0] = 123.0  # a copy, not a view of the source
    assert a[0, 0] != 123.0
    with pytest.raises(MemoryError):
        arena.take(torch.zeros(1))
