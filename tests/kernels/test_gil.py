"""Native calls release the GIL: a Python thread keeps running while another thread is inside a
long kernel call, and concurrent native calls from several threads stay correct (they run one
at a time under the library's own lock)."""
from __future__ import annotations

import threading
import time

import torch

from jisu.kernels.formats import Int4Weight
from jisu.kernels.packed import pack

from .helpers import needs_native

pytestmark = needs_native


def _big_linear():
    g = torch.Generator().manual_seed(0)
    w = pack(Int4Weight.quantize_rtn(torch.randn(2048, 2048, generator=g), 32))
    x = torch.randn(256, 2048, generator=g)
    return w, x


def test_python_runs_during_a_native_call():
    w, x = _big_linear()
    w.linear(x)  # warm up (scratch buffers, thread pool)
    t0 = time.perf_counter()
    for _ in range(3):
        w.linear(x)
    per_call = (time.perf_counter() - t0) / 3
    calls = max(3, int(0.3 / max(per_call, 1e-4)))  # ~0.3 s of native work

    inside = threading.Event()
    done = threading.Event()

    def work():
        inside.set()
        for _ in range(calls):
            w.linear(x)
        done.set()

    th = threading.Thread(target=work)
    th.start()
    inside.wait()
    count = 0
    while not done.is_set():
        count += 1
    th.join()
    # holding the GIL, the worker would let this loop run only at its own few bytecodes between
    # calls (a handful of switch intervals); released, the loop runs the whole time
    assert count > 100_000, f"Python made only {count} iterations in {calls} native calls"


def test_concurrent_calls_are_correct():
    w, x = _big_linear()
    x = x[:8].contiguous()
    ref = w.linear(x)
    results = [None] * 4
    errors = []

    def work(i):
        try:
            for _ in range(20):
                y = w.linear(x)
                if not torch.equal(y, ref):
                    errors.append(i)
            results[i] = y
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ths = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert not errors
    assert all(torch.equal(r, ref) for r in results)
