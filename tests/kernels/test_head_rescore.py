"""The native step's LM head in faithful steps (module.cpp linear_head): plain int8 activation blocks
for every vocabulary row, then the refined product again for the rows whose refined logit could be
the largest. Its argmax and that row's logit are the refined linear's bit for bit, on every quantized
weight kind and ISA, also on near-tied rows where plain int8 blocks pick another token; every other
row keeps its plain value; the row norms bound the decoded rows; off, or outside
dense refinement, it is the linear itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jisu.kernels import ops
from jisu.kernels.formats import Int4Weight, Int8Weight
from jisu.kernels.packed import pack

from .helpers import ISAS, isa, needs_native
from . import test_ggml_kq as kq

pytestmark = needs_native


def _int(kind, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, K, generator=g) * 0.05
    w = base + torch.randn(N, K, generator=g) * 0.001  # near-tied rows
    return pack({"q8_0": lambda: Int8Weight.quantize_rtn(w, 32), "q4_0": lambda: Int4Weight.quantize_rtn(w, 32),
                 "q4_1": lambda: Int4Weight.quantize_rtn(w, 32, sym=False)}[kind]())


def _kquant(name, N, K, seed):
    from jisu.kernels.packed_ggml import PackedGGML, as_bytes

    rng = np.random.default_rng(seed)
    raw = np.repeat(kq.make_blocks(name, 1, K, seed), N, axis=0)
    bb = kq.KQ_TYPES[name][1]
    scales = set(kq.KQ_TYPES[name][2]) | {o + 1 for o in kq.KQ_TYPES[name][2]}
    for n in range(N):  # near-tied rows: a few code bytes of each row changed
        for _ in range(8):
            sb, o = rng.integers(0, K // 256), rng.integers(0, bb)
            if o not in scales:
                raw[n, sb * bb + o] = rng.integers(0, 256)
    return PackedGGML(as_bytes(raw), N, K, kq.KQ_TYPES[name][0])


WEIGHTS = {k: (lambda k: lambda N, K, s: _int(k, N, K, s))(k) for k in ("q8_0", "q4_0", "q4_1")}
WEIGHTS.update({k: (lambda k: lambda N, K, s: _kquant(k, N, K, s))(k) for k in ("Q4_K", "Q6_K", "IQ4_XS")})


def _x(M, K, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, ::37] *= 20.0  # outliers: large plain int8 errors in their blocks
    return x


@pytest.fixture
def setting():
    before, head = ops.get_act_refine(), ops.get_head_rescore()
    yield
    ops.set_act_refine(before)
    ops.set_head_rescore(head)


def _flipping_rows(W, K: int, want: int = 8) -> torch.Tensor:
    """Activation rows (outliers included) on which plain int8 blocks and the refined product pick
    different rows of W: found among 2048 random ones."""
    x = _x(2048, K, 7)
    ops.set_act_refine(0.0)
    plain = ops.linear(x, W).argmax(-1)
    ops.set_act_refine(ops.PRECISE)
    ref = ops.linear(x, W).argmax(-1)
    flips = x[plain != ref][:want]
    assert flips.shape[0] >= 2, "no near-tie found"
    return torch.cat([flips, _x(3, K, 8)])  # and a few ordinary rows


@pytest.mark.parametrize("kind", list(WEIGHTS))
def test_argmax_is_the_refined_linears(kind, setting):
    N, K = 200, 512
    W = WEIGHTS[kind](N, K, 3)
    norms = ops.head_row_norms(W)
    assert (norms.double() >= W.dequantize().double().norm(dim=1)).all()
    rows = _flipping_rows(W, K)
    for name in ISAS:
        with isa(name):
            for x in (rows[:1], rows[1:4], rows):
                ops.set_act_refine(0.0)
                plain = ops.linear(x, W)
                ops.set_act_refine(ops.PRECISE)
                ref = ops.linear(x, W)
                ops.set_head_rescore(True)
                out, done = ops.linear_head(x, W, norms)
                if kind == "q8_0":  # refined at the plain blocks' cost: the linear itself, whatever the rows
                    assert not done and torch.equal(out, ref)
                    continue
                assert done
                top = ref.argmax(-1)
                assert torch.equal(out.argmax(-1), top)
                r = torch.arange(x.shape[0])
                assert torch.equal(out[r, top], ref[r, top])
                # every logit is the refined one (rows recomputed) or the plain one (rows that cannot win)
                assert ((out == ref) | (out == plain)).all()
                ops.set_head_rescore(False)
                off, done = ops.linear_head(x, W, norms)
                assert not done and torch.equal(off, ref)
                ops.set_head_rescore(True)
                ops.set_act_refine(0.0)
                fast, done = ops.linear_head(x, W, norms)
                assert not done and torch.equal(fast, plain)
            if kind != "q8_0":
                assert (plain.argmax(-1) != top).any()  # the near-ties plain int8 blocks decide otherwise


@pytest.mark.parametrize("kind", ["q4_0", "Q4_K"])
def test_rows_alone_equal_batched(kind, setting):
    """Batch invariance: a row's head output does not depend on the other rows of the step (the
    one-row GEMV alone, the panels / tiles in the batch)."""
    W = WEIGHTS[kind](300, 512, 5)
    norms = ops.head_row_norms(W)
    ops.set_act_refine(ops.PRECISE)
    ops.set_head_rescore(True)
    x = _x(9, 512, 2)
    out, _ = ops.linear_head(x, W, norms)
    for m in range(9):
        alone, _ = ops.linear_head(x[m:m + 1], W, norms)
        assert torch.equal(alone[0], out[m])


@pytest.mark.parametrize("kind", ["q4_0", "Q6_K"])
def test_few_rows_are_recomputed(kind, setting):
    """Rows far from the top keep their plain values: the plain pass is most of the work."""
    from jisu.kernels.packed_ggml import PackedGGML, as_bytes

    N, K = 4096, 512
    if kind == "q4_0":
        W = pack(Int4Weight.quantize_rtn(torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.05, 32))
    else:
        W = PackedGGML(as_bytes(kq.make_blocks(kind, N, K, 1)), N, K, kq.KQ_TYPES[kind][0])
    norms = ops.head_row_norms(W)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(2))
    ops.set_act_refine(ops.PRECISE)
    ref = ops.linear(x, W)
    ops.set_head_rescore(True)
    out, done = ops.linear_head(x, W, norms)
    assert done and torch.equal(out.argmax(-1), ref.argmax(-1))
    same = (out == ref).sum(-1)
    assert (same >= 1).all() and (same < N // 20).all(), same
