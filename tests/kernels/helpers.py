"""Shared helpers for the kernel tests: format builders, references, ISA switching."""
from __future__ import annotations

import contextlib

import pytest
import torch

from jisu.kernels import _native
from jisu.kernels.formats import CodebookWeight, Int2Weight, Int3Weight, Int4Weight, Int8Weight

K = _native.K
needs_native = pytest.mark.skipif(K is None, reason="jisu._kernels not built")
ISAS = K.available_isas() if K is not None else []

# name -> builder(w): every format/variant the kernels support
FORMATS = {
    "q4_0": lambda w: Int4Weight.quantize_rtn(w, 32),
    "q4_1": lambda w: Int4Weight.quantize_rtn(w, 32, sym=False),
    "int4_g64": lambda w: Int4Weight.quantize_rtn(w, 64),
    "int4_g128_asym": lambda w: Int4Weight.quantize_rtn(w, 128, sym=False),
    "q8_0": lambda w: Int8Weight.quantize_rtn(w, 32),
    "int8_pc": lambda w: Int8Weight.quantize_rtn(w, None),
    "int3_g32": lambda w: Int3Weight.quantize_rtn(w, 32),
    "int3_g64_asym": lambda w: Int3Weight.quantize_rtn(w, 64, sym=False),
    "int2_g32_asym": lambda w: Int2Weight.quantize_rtn(w, 32, sym=False),
    "int2_g128": lambda w: Int2Weight.quantize_rtn(w, 128),
    "nf4_g64": lambda w: CodebookWeight.quantize_rtn(w, 64, "nf4"),
    "kmeans": lambda w: CodebookWeight.quantize_rtn(w, None, "kmeans", iters=3),
    "kmeans_g32": lambda w: CodebookWeight.quantize_rtn(w, 32, "kmeans", iters=3),
}


def quantize_act_ref(x: torch.Tensor) -> torch.Tensor:
    """The kernels' activation quantization (int8 per 32 values, llama.cpp Q8_0 style),
    returned dequantized: d = amax/127, q = round_half_even(x * (1/d))."""
    shp = x.shape
    xb = x.reshape(-1, shp[-1] // 32, 32).to(torch.float32)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None])
    return (q * d[..., None]).reshape(shp)


def check_close(out, ref, mag, rel=2e-5, what=""):
    """|out - ref| <= rel * mag elementwise, mag = the sum of |terms| of each dot product."""
    err = (out.double() - ref.double()).abs()
    bound = rel * mag.double() + 1e-6
    bad = err > bound
    assert not bad.any(), f"{what}: max err {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3g}"


@contextlib.contextmanager
def isa(name: str):
    old = K.get_isa()
    K.set_isa(name)
    try:
        yield
    finally:
        K.set_isa(old)


@contextlib.contextmanager
def threads(n: int):
    old = K.get_num_threads()
    old_min = K.get_min_bytes_per_thread()
    K.set_num_threads(n)
    K.set_min_bytes_per_thread(0)  # split even tiny problems so threading is exercised
    try:
        yield
    finally:
        K.set_num_threads(old)
        K.set_min_bytes_per_thread(old_min)


def assert_same_packed_ints(whole: dict, sliced: dict) -> None:
    """Every packed integer weight of `whole` has the same bytes in `sliced` (two loads of a model)."""
    import torch

    from jisu.kernels.packed import PackedInt

    n = 0
    for name, w in whole.items():
        if isinstance(w, PackedInt):
            assert torch.equal(w.data, sliced[name].data), name
            n += 1
    assert n > 0


def paged_step(runner, kv, seqs, chunks, rows=None):
    """One engine-style step: each sequence in `seqs` appends its chunk (token ids) after its cached
    positions in the paged cache `kv`; returns the logits rows [sum(len(c)) or len(rows), V]."""
    from jisu.engine.batch import StepBatch

    starts = [s.num_tokens for s in seqs]
    for s, c in zip(seqs, chunks):
        kv.reserve(s, len(c))
    flat = [t for c in chunks for t in c]
    step = StepBatch(flat, [len(c) for c in chunks], starts, [s.block_table for s in seqs],
                     list(range(len(flat))) if rows is None else list(rows), [0] * len(seqs))
    with torch.inference_mode():
        return runner.run(step, kv)


def assert_batch_equals_rows_alone(x: torch.Tensor, w, refine: float) -> None:
    """Under activation setting `refine`, linear(x, w) and a slice of it split across 1, 2 and 3
    threads equal each row of x alone, bit for bit."""
    from jisu.kernels import ops

    old = ops.get_act_refine()
    ops.set_act_refine(refine)
    try:
        alone = torch.cat([ops.linear(x[m:m + 1], w) for m in range(x.shape[0])])
        for nt in (1, 2, 3):
            with threads(nt):
                assert torch.equal(ops.linear(x, w), alone), nt
                assert torch.equal(ops.linear(x[3:17], w), alone[3:17]), nt
    finally:
        ops.set_act_refine(old)
