"""The native step (cpu/llama_step.cpp with cpu/lowrank.cpp) runs the low-rank terms of packed
weights as the reference model does (PackedLowRank.linear): joined q|k|v and gate|up (one segment per
part) and separate matrices, through prefill, chunks and single tokens, alone and batched."""
from __future__ import annotations

import pytest
import torch

from jisu.engine.native_runner import NativeRunner
from jisu.kernels.formats import Int4Weight, Int8Weight
from jisu.kernels.lowrank import Factors, LowRankWeight, PackedLowRank
from jisu.kernels.packed import pack
from tests.engine.test_native_runner import check_incremental, pair, prompt, rel_err, run_logits, tiny  # noqa: F401
from tests.kernels.helpers import needs_native, paged_step

pytestmark = [needs_native, pytest.mark.usefixtures("one_torch_thread")]


def with_factors(w: dict, ranks, scale: float = 0.3, seed: int = 5) -> dict:
    """Every decoder linear int4 g32 plus random int8 factors of rank ranks(name) (0: none)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(w)
    for n, t in w.items():
        if t.dim() != 2 or "layers." not in n:
            continue
        r = ranks(n)
        q = Int4Weight.quantize_rtn(t, 32)
        if not r:
            out[n] = pack(q)
            continue
        N, K = t.shape
        A = torch.randn(N, r, generator=g) * scale * float(t.abs().mean())
        B = torch.randn(r, K, generator=g)
        out[n] = pack(LowRankWeight(q, Factors.quantize(A, B)))
    return out


def test_native_step_runs_the_factors_joined(tiny):
    cfg, w = tiny
    ref, nat = pair(cfg, with_factors(w, lambda n: 3))
    joined = [f for f in nat.fused if isinstance(f, PackedLowRank)]
    assert joined and all(len(f.seg_rows) > 1 for f in joined)
    check_incremental(ref, nat, prompt())
    # the factors matter: without them the logits are far from the reference's
    plain = NativeRunner(pair(cfg, with_factors(w, lambda n: 0))[0])
    ids = prompt()[0].tolist()
    assert rel_err(run_logits(plain, ids), run_logits(nat, ids)) > 1e-2


def test_native_step_runs_the_factors_separate(tiny):
    """Ranks that differ between q, k and v (and gate / up) keep the matrices apart; some linears
    have no factors at all."""
    cfg, w = tiny
    ranks = {"q_proj": 2, "k_proj": 5, "v_proj": 0, "o_proj": 1, "gate_proj": 4, "up_proj": 3, "down_proj": 6}
    wq = with_factors(w, lambda n: ranks[n.split(".")[-2]])
    ref, nat = pair(cfg, wq)
    assert not any(isinstance(f, PackedLowRank) for f in nat.fused)
    check_incremental(ref, nat, prompt())


def test_batch_invariance_with_factors(tiny):
    cfg, w = tiny
    _, nat = pair(cfg, with_factors(w, lambda n: 3))
    from jisu.engine.kv_cache import PagedKVCache, SeqBlocks

    a, b = prompt(9, seed=2)[0].tolist(), prompt(13, seed=3)[0].tolist()
    alone = paged_step(nat, PagedKVCache(nat.cfg, 16, 4), [SeqBlocks()], [a])
    both = paged_step(nat, PagedKVCache(nat.cfg, 16, 4), [SeqBlocks(), SeqBlocks()], [b, a])
    assert torch.equal(alone, both[len(b):])


def test_int8_base_with_factors(tiny):
    cfg, w = tiny
    wq = dict(w)
    g = torch.Generator().manual_seed(9)
    for n, t in w.items():
        if t.dim() == 2 and "layers." in n:
            f = Factors.quantize(torch.randn(t.shape[0], 2, generator=g) * 0.01,
                                 torch.randn(2, t.shape[1], generator=g))
            wq[n] = pack(LowRankWeight(Int8Weight.quantize_rtn(t), f))
    ref, nat = pair(cfg, wq)
    check_incremental(ref, nat, prompt())
