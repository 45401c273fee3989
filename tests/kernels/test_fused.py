"""Fused ops (RMSNorm, RoPE, one-token GQA attention) against their torch references on
every ISA."""
from __future__ import annotations

import math

import pytest
import torch

from jisu.kernels import ops

from .helpers import ISAS, isa, needs_native, threads

pytestmark = needs_native


@pytest.mark.parametrize("D", [13, 64, 576])
@pytest.mark.parametrize("M", [1, 3, 40])
def test_rms_norm(D, M):
    x = torch.randn(M, D) * 3
    w = torch.randn(D)
    ref = ops.rms_norm_ref(x.double(), w.double(), 1e-5)
    for name in ISAS:
        with isa(name), threads(2):
            out = ops.rms_norm(x, w, 1e-5)
        assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    out3 = ops.rms_norm(x.reshape(1, M, D), w, 1e-5)
    assert out3.shape == (1, M, D)


def _tables(T, D, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    f = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]
    return f.cos(), f.sin()


@pytest.mark.parametrize("T,H,D", [(1, 9, 64), (5, 3, 64), (7, 2, 18)])
def test_rope(T, H, D):
    x = torch.randn(T, H, D)
    c, s = _tables(T, D)
    ref = ops.rope_ref(x, c, s)
    for name in ISAS:
        with isa(name), threads(2):
            out = ops.rope(x, c, s)
            # same float ops as the torch reference (products then add): bitwise equal
            assert torch.equal(out, ref), name
            full_c, full_s = torch.cat([c, c], -1), torch.cat([s, s], -1)  # HF-style [T, D]
            assert torch.equal(ops.rope(x, full_c, full_s), ref)
            y = x.clone()
            ops.rope(y, c, s, out=y)  # in place
            assert torch.equal(y, ref)


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 32), (8, 1, 13)])
@pytest.mark.parametrize("T", [1, 7, 300])
def test_attention_decode(H, Hkv, D, T):
    Tcap = T + 5
    q = torch.randn(H, D)
    k = torch.randn(Hkv, Tcap, D)
    v = torch.randn(Hkv, Tcap, D)
    k[:, T:] = 1e4  # positions past `length` must be ignored
    ref = ops.attention_decode_ref(q.double(), k.double(), v.double(), T, 1 / math.sqrt(D))
    for name in ISAS:
        with isa(name), threads(2):
            out = ops.attention_decode(q, k, v, T)
        assert (out.double() - ref).abs().max() < 2e-5, name


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError):
        ops.attention_decode(torch.randn(9, 64), torch.randn(2, 4, 64), torch.randn(2, 4, 64))
