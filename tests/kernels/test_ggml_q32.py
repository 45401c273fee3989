"""The GGML kind's Q5_0, Q5_1, IQ4_NL, F16 and BF16 kernels: row decoding against gguf's numpy
dequantization, linear against the dequantized matrix, batch invariance, every ISA against scalar,
and the C++ cross-ISA check (natively, and for NEON under qemu-aarch64)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from jisu.kernels import ops
from jisu.kernels.packed_ggml import PackedGGML, as_bytes, native_types

from .helpers import ISAS, assert_batch_equals_rows_alone, check_close, isa, needs_native, quantize_act_ref, threads
from .cpp_check import AARCH64, X86, needs_qemu, needs_x86, run_check

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
TYPES = [T.Q5_0, T.Q5_1, T.IQ4_NL, T.F16, T.BF16]
QUANT = {T.Q5_0, T.Q5_1, T.IQ4_NL}


def make_rows(qtype, N: int, K: int, seed: int = 0) -> np.ndarray:
    """Raw bytes [N, row_bytes] of a random valid matrix: quantized by gguf where it can, else
    (IQ4_NL) random blocks whose f16 scales are overwritten with sane values."""
    rng = np.random.default_rng(seed)
    if qtype == T.IQ4_NL:
        raw = rng.integers(0, 256, size=(N, K // 32, 18), dtype=np.uint8)
        d = (rng.uniform(0.002, 0.02, size=(N, K // 32)) * rng.choice([-1, 1], size=(N, K // 32))).astype(np.float16)
        raw[:, :, :2] = d.view(np.uint8).reshape(N, K // 32, 2)
        return raw.reshape(N, -1)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    w[:, 5] += 0.3  # uneven blocks (nonzero Q5_1 minimums)
    return np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(N, -1)


def packed(qtype, N, K, seed=0) -> PackedGGML:
    raw = make_rows(qtype, N, K, seed)
    return PackedGGML(as_bytes(raw), N, K, int(qtype))


def reference(qtype, raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))


@pytest.fixture
def no_refine():
    old = ops.get_act_refine()
    ops.set_act_refine(0.0)
    yield
    ops.set_act_refine(old)


@needs_native
def test_types_are_native():
    assert {int(t) for t in TYPES} <= native_types()


@needs_native
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_equal_gguf_dequantize(qtype):
    N, K = 11, 320
    raw = make_rows(qtype, N, K)
    w = PackedGGML(as_bytes(raw), N, K, int(qtype))
    ids = torch.tensor([[0, 3], [10, 7]])
    ref = reference(qtype, raw)
    assert torch.equal(w.rows(ids), ref[ids])
    assert torch.equal(w.dequantize(), ref)


@needs_native
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("K", [256, 896, 2048])
def test_linear_matches_dequantized(qtype, K, no_refine):
    """Quantized types: exactly the dequantized matrix times the int8-rounded activations, up to
    float rounding (2e-5 of the sum of |terms|); within 1e-2 of the output norm of the unrounded
    product. 16-bit types: x @ W.T within 2e-5 of the sum of |terms|."""
    N, M = 37, 5
    w = packed(qtype, N, K, seed=K)
    wd = w.dequantize().double()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K))
    x[:, 7] *= 20  # an outlier channel
    b = torch.randn(N)
    out = ops.linear(x, w, b)
    xs = quantize_act_ref(x) if qtype in QUANT else x
    ref = xs.double() @ wd.T + b.double()
    check_close(out, ref, xs.double().abs() @ wd.abs().T, what=qtype.name)
    exact = x.double() @ wd.T + b.double()
    assert (out.double() - exact).norm() <= 1e-2 * exact.norm()


@needs_native
@pytest.mark.parametrize("qtype", sorted(QUANT), ids=lambda t: t.name)
def test_precise_activations(qtype):
    """Every activation block refined (~15-bit activations): within 2e-4 of the output norm (the
    residual codes' rounding, d/256 per value, is ~5e-5 of the activations' scale)."""
    N, K, M = 29, 1024, 4
    w = packed(qtype, N, K, seed=3)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    x[:, 100] *= 30
    old = ops.get_act_refine()
    ops.set_act_refine(ops.PRECISE)
    try:
        out = ops.linear(x, w)
    finally:
        ops.set_act_refine(old)
    exact = x.double() @ w.dequantize().double().T
    assert (out.double() - exact).norm() <= 2e-4 * exact.norm()


@needs_native
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("refine", [0.0, 1.5, ops.PRECISE])
def test_batch_invariance(qtype, refine):
    """A row of M = 2-9 (16-bit weights: activation rows streamed together) or 33 equals the same row alone,
    bit for bit, also split across threads."""
    N, K = 45, 768
    w = packed(qtype, N, K, seed=5)
    x = torch.randn(33, K, generator=torch.Generator().manual_seed(2))
    x[:, 33] *= 25
    old = ops.get_act_refine()
    ops.set_act_refine(refine)
    try:
        alone = torch.cat([ops.linear(x[m:m + 1], w) for m in range(33)])
        for M in (2, 3, 4, 7, 8, 9, 33):
            assert torch.equal(ops.linear(x[:M], w), alone[:M])
        with threads(2):
            assert torch.equal(ops.linear(x[:3], w), alone[:3])
            assert torch.equal(ops.linear(x, w), alone)
    finally:
        ops.set_act_refine(old)


@needs_native
@pytest.mark.parametrize("qtype", sorted(QUANT, key=lambda t: t.name), ids=lambda t: t.name)
@pytest.mark.parametrize("refine", [0.0, 1.5, ops.PRECISE])
def test_batches_quantized_by_several_threads_equal_rows_alone(qtype, refine):
    """A batch big enough that several threads quantize its activations (and, on CPUs with AMX-INT8, lay
    them out as tile operands, 16 rows a unit; 45 rows end in a partial unit) gives every row bitwise what
    it gives alone."""
    N, K, M = 35, 2048, 45
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(7))
    x[:, 97] *= 30
    assert_batch_equals_rows_alone(x, packed(qtype, N, K, seed=6), refine)


@needs_native
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_isa_matches_scalar(qtype):
    """Bitwise: each ISA repeats the scalar reference's float operations in its order."""
    N, K = 21, 1024 + (3 if qtype not in QUANT else 0)
    w = packed(qtype, N, K, seed=9)
    x = torch.randn(19, K, generator=torch.Generator().manual_seed(4))
    x[:, 64] *= 40
    old = ops.get_act_refine()
    try:
        for refine in (0.0, 1.5, ops.PRECISE):
            ops.set_act_refine(refine)
            with isa("scalar"):
                ref = [ops.linear(x[:M], w) for M in (1, 2, 4, 8, 9, 19)]
            for name in ISAS:
                with isa(name):
                    got = [ops.linear(x[:M], w) for M in (1, 2, 4, 8, 9, 19)]  # 19: tile multiplies with AMX
                for r, g in zip(ref, got):
                    assert torch.equal(r, g), f"{name} refine={refine}"
    finally:
        ops.set_act_refine(old)


@needs_x86
def test_cpp_check_x86(tmp_path):
    out = run_check("ggml_q32_check", X86, tmp_path)
    assert "testing avx2" in out and "0 failures in all" in out, out


@needs_qemu
def test_cpp_check_neon_under_qemu(tmp_path):
    out = run_check("ggml_q32_check", AARCH64, tmp_path)
    assert "testing neon" in out and "0 failures in all" in out, out


@needs_native
@pytest.mark.parametrize("qtype", sorted(set(TYPES) - set(QUANT)), ids=lambda t: t.name)
def test_half_types_in_chunks_of_activation_rows(qtype):
    """16-bit weights with long rows: the activation rows go in chunks that fit the cache (12 rows at
    K = 8960); every row equals the same row alone, bit for bit, on one and on two threads."""
    N, K, M = 10, 8960, 31
    w = packed(qtype, N, K, seed=9)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(4))
    alone = torch.cat([ops.linear(x[m:m + 1], w) for m in range(M)])
    assert torch.equal(ops.linear(x, w), alone)
    with threads(2):
        assert torch.equal(ops.linear(x, w), alone)
    exact = x.double() @ w.dequantize().double().T
    assert (ops.linear(x, w).double() - exact).norm() <= 1e-5 * exact.norm()
