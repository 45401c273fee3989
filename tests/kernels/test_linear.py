"""Quantized and fp32 linear kernels: every ISA against the scalar path and the torch
dequantize-then-matmul reference, odd shapes, threads, and M-independence of each row."""
from __future__ import annotations

import pytest
import torch

from jisu.kernels import ops
from jisu.kernels.packed import pack

from .helpers import FORMATS, ISAS, check_close, isa, needs_native, quantize_act_ref, threads

pytestmark = needs_native

SHAPES = [(1, 64), (3, 128), (67, 256), (8, 576), (200, 192)]  # (N, K)
MS = [1, 2, 3, 7, 33, 256]


def _weight(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.05


def _x(M, K, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, :32] *= 10  # blocks with different scales
    return x


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_linear_all_isas(fmt):
    for (N, K) in SHAPES:
        if K % 128 and fmt in ("int4_g128_asym", "int2_g128"):
            continue
        if K % 64 and fmt in ("int4_g64", "int3_g64_asym", "nf4_g64"):
            continue
        p = pack(FORMATS[fmt](_weight(N, K, N * 1000 + K)))
        wd = p.dequantize().double()
        for M in MS:
            if M == 256 and N * K > 20000:
                continue  # keep the scalar path quick
            x = _x(M, K, M)
            xq = quantize_act_ref(x).double()
            ref = xq @ wd.T
            mag = xq.abs() @ wd.abs().T
            outs = {}
            for name in ISAS:
                with isa(name):
                    outs[name] = ops.linear(x, p)
                check_close(outs[name], ref, mag, what=f"{fmt} {name} N={N} K={K} M={M}")
            # int8-activation paths do the same integer math and float steps everywhere
            for name in ISAS:
                assert torch.equal(outs[name], outs["scalar"]), f"{fmt} {name} != scalar (N={N} K={K} M={M})"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_row_result_independent_of_batch(fmt):
    """Row i of an M=17 batch equals the same row computed alone, bitwise, on every ISA
    and thread count (the serving engine relies on batched == single greedy outputs)."""
    N, K = 67, 256
    p = pack(FORMATS[fmt](_weight(N, K, 7)))
    x = _x(17, K, 3)
    for name in ISAS:
        for nt in (1, 2):
            with isa(name), threads(nt):
                batch = ops.linear(x, p)
                for i in (0, 5, 16):
                    single = ops.linear(x[i:i + 1], p)
                    assert torch.equal(single[0], batch[i]), f"{fmt} {name} threads={nt} row {i}"


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "int3_g32", "nf4_g64"])
def test_threads_give_identical_results(fmt):
    p = pack(FORMATS[fmt](_weight(300, 256, 1)))
    for M in (1, 5, 40):
        x = _x(M, 256, M)
        with threads(1):
            a = ops.linear(x, p)
        with threads(2):
            b = ops.linear(x, p)
        assert torch.equal(a, b)


def test_bias_leading_dims_and_noncontiguous():
    N, K = 67, 128
    p = pack(FORMATS["q4_1"](_weight(N, K, 2)))
    bias = torch.randn(N)
    x = _x(6, 2 * K, 9)[:, ::2]  # non-contiguous view [6, K]
    x3 = x.reshape(2, 3, K)
    out = ops.linear(x3, p, bias)
    assert out.shape == (2, 3, N)
    ref = ops.linear(x.contiguous(), p) + bias
    assert torch.equal(out.reshape(6, N), ref)


def test_fp32_linear():
    for (N, K) in [(1, 5), (3, 13), (67, 256), (130, 576), (9, 1000)]:
        w = _weight(N, K, N + K)
        bias = torch.randn(N)
        for M in (1, 2, 3, 7, 33):
            x = _x(M, K, M) if K >= 32 else torch.randn(M, K)
            ref = x.double() @ w.double().T + bias.double()
            mag = x.abs().double() @ w.abs().double().T + bias.abs().double()
            outs = {}
            for name in ISAS:
                with isa(name):
                    outs[name] = ops.linear(x, w, bias)
                check_close(outs[name], ref, mag, rel=1e-5, what=f"fp32 {name} N={N} K={K} M={M}")
            for name in ISAS:  # the packed fp32 weight takes the same native path
                with isa(name):
                    assert torch.equal(pack(w).linear(x, bias), outs[name])
        # per-row result independent of M
        x = _x(17, K, 1) if K >= 32 else torch.randn(17, K)
        for name in ISAS:
            with isa(name), threads(2):
                batch = ops.linear(x, w)
                assert torch.equal(ops.linear(x[4:5], w)[0], batch[4])


def test_torch_fallback_matches(monkeypatch):
    """Without the native path (simulated) a packed weight dequantizes then matmuls."""
    p = pack(FORMATS["q4_0"](_weight(67, 128, 4)))
    x = _x(3, 128, 1)
    native = ops.linear(x, p)
    monkeypatch.setattr(p, "_addr", 0)
    with pytest.warns(RuntimeWarning):
        import jisu.kernels._native as nat
        monkeypatch.setattr(nat, "_warned", False)
        fb = ops.linear(x, p)
    ref = x.double() @ p.dequantize().double().T
    # the fallback does not quantize activations: compare both to the exact product
    assert (fb.double() - ref).abs().max() < 1e-4
    assert (native.double() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_dequantize_matmul():
    p = pack(FORMATS["q4_0"](_weight(67, 128, 4)))
    x = _x(3, 128, 1)
    ref = x.double() @ p.dequantize().double().T
    p.to("cuda")
    out = ops.linear(x.cuda(), p).cpu()
    assert (out.double() - ref).abs().max() < 1e-3


@pytest.fixture
def act_refine():
    """Sets ops.set_act_refine for a test and restores it afterwards."""
    before = ops.get_act_refine()
    yield ops.set_act_refine
    ops.set_act_refine(before)


def _x_outliers(M, K, seed):
    x = _x(M, K, seed)
    x[:, 5::97] *= 40.0  # outlier channels, as in the default model's down_proj inputs
    return x


def quantize_act_refined_ref(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The kernels' activations with refined blocks, dequantized: a block whose amax exceeds
    threshold x the row's mean block amax is d * (q + q2 / 128), q2 = round(128 (x/d - q))."""
    shp = x.shape
    xb = x.reshape(-1, shp[-1] // 32, 32).to(torch.float32)
    amax = xb.abs().amax(-1)
    d = amax / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    v = xb * inv[..., None]
    q = torch.round(v)
    q2 = torch.round((v - q) * 128.0)
    refined = amax > threshold * amax.mean(-1, keepdim=True)
    y = torch.where(refined[..., None], (q + q2 / 128.0), q) * d[..., None]
    return y.reshape(shp)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "int8_pc", "int3_g64_asym", "int2_g32_asym"])
@pytest.mark.parametrize("threshold", [1.5, ops.PRECISE])
def test_refined_activations_all_isas(fmt, threshold, act_refine):
    """With refinement on, every INT kernel computes dot(w, d (q + q2/128)) on the refined blocks:
    bitwise equal across ISAs and batch sizes, and equal to the torch reference of that math."""
    N, K = 67, 256
    p = pack(FORMATS[fmt](_weight(N, K, 11)))
    wd = p.dequantize().double()
    act_refine(threshold)
    for M in (1, 2, 3, 4, 7, 33):
        x = _x_outliers(M, K, M)
        xr = quantize_act_refined_ref(x, threshold).double()
        ref = xr @ wd.T
        outs = {}
        for name in ISAS:
            with isa(name):
                outs[name] = ops.linear(x, p)
            check_close(outs[name], ref, xr.abs() @ wd.abs().T, what=f"{fmt} {name} M={M}")
        for name in ISAS:
            assert torch.equal(outs[name], outs["scalar"]), f"{fmt} {name} != scalar (M={M})"
        for i in range(M):  # each row as computed alone
            assert torch.equal(ops.linear(x[i:i + 1], p), outs[ISAS[0]][i:i + 1])


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "int8_pc", "int3_g32", "int2_g32_asym"])
def test_precise_activations_match_the_fp32_product(fmt, act_refine):
    """ops.PRECISE refines every block: the packed linear is the float product with the dequantized
    weights to ~1e-4 of its magnitude (plain int8 blocks: ~1e-2), on outlier-heavy inputs too; every
    ISA gives the scalar kernel's result bit for bit, and each row what it gives alone (the GEMM's
    fused residual pass against the GEMV's; 19 rows: full passes and a tail; a zero row and a zero
    block, which are not refined, among them)."""
    N, K = 200, 576
    p = pack(FORMATS[fmt](_weight(N, K, 3)))
    wd = p.dequantize().double()
    x = _x_outliers(19, K, 4)
    x[5] = 0.0
    x[7, 64:96] = 0.0
    ref = x.double() @ wd.T
    mag = (x.double().abs() @ wd.abs().T).max()
    act_refine(0.0)
    plain = float((ops.linear(x, p).double() - ref).abs().max() / mag)
    act_refine(ops.PRECISE)
    outs = {}
    for name in ISAS:
        with isa(name):
            outs[name] = ops.linear(x, p)
            err = float((outs[name].double() - ref).abs().max() / mag)
            assert err < 2e-4 and err < plain / 30, (name, err, plain)
            for i in range(x.shape[0]):
                assert torch.equal(ops.linear(x[i:i + 1], p), outs[name][i:i + 1]), (name, i)
    for name in ISAS:
        assert torch.equal(outs[name], outs["scalar"]), name


def test_act_refine_rejects_bad_thresholds(act_refine):
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            act_refine(bad)
