"""Weight formats: RTN quantizers, dequantize references, exact GGUF Q4_0/Q4_1/Q8_0
conversion (checked against the gguf package's own dequantizer) and the packed layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jisu.kernels.formats import (NF4_TABLE, CodebookWeight, Int2Weight, Int3Weight, Int4Weight,
                                  Int8Weight)
from jisu.kernels.packed import PackedCodebook, PackedInt, pack

from .helpers import FORMATS

gguf = pytest.importorskip("gguf")


def _raw_blocks(n_blocks, qtype, seed):
    """Random but valid GGUF blocks: finite f16 scales, random quant bytes."""
    rng = np.random.default_rng(seed)
    bsize, tsize = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, tsize), dtype=np.uint8)
    nh = 2 if qtype == gguf.GGMLQuantizationType.Q4_1 else 1
    halves = (rng.standard_normal((n_blocks, nh)) * 0.01).astype(np.float16)
    raw[:, : 2 * nh] = halves.view(np.uint8).reshape(n_blocks, 2 * nh)
    return raw


def _from_gguf(raw, qtype, N, K):
    """GGUF block bytes -> jisu format (what the GGUF loader does), without loss."""
    nb = K // 32
    raw = raw.reshape(N, nb, -1)
    d = torch.from_numpy(raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        q = torch.from_numpy(raw[:, :, 2:].copy().view(np.int8)).reshape(N, K)
        return Int8Weight(q, d, 32)
    off = 4 if qtype == gguf.GGMLQuantizationType.Q4_1 else 2
    qs = torch.from_numpy(raw[:, :, off:].copy())  # [N, nb, 16]
    codes = torch.cat([qs & 15, qs >> 4], dim=2).reshape(N, K)  # low nibbles first
    if qtype == gguf.GGMLQuantizationType.Q4_1:
        m = torch.from_numpy(raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        return Int4Weight(codes, d, 32, m)
    return Int4Weight(codes, d, 32, None)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("N", [1, 3, 67])
def test_gguf_blocks_convert_exactly(qtype, N):
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    K = 96
    raw = _raw_blocks(N * K // 32, qt, N)
    ref = torch.from_numpy(gguf.quants.dequantize(raw.reshape(N, -1), qt).astype(np.float32)).reshape(N, K)
    fmt = _from_gguf(raw, qt, N, K)
    assert torch.equal(fmt.dequantize(), ref)
    p = pack(fmt)
    assert torch.equal(p.dequantize(), ref)
    # GGUF's bytes per row (codes and scales, nothing else) times the rows padded to a tile of 8
    assert p.nbytes == raw.nbytes // N * ((N + 7) // 8) * 8
    assert p.data.numel() == ((N + 7) // 8) * 8 * raw.shape[1] * K // 32  # same bytes/block as GGUF


@pytest.mark.parametrize("cls", [Int4Weight, Int3Weight, Int2Weight])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_int_rtn_roundtrip(cls, sym, g):
    w = torch.randn(5, 256)
    f = cls.quantize_rtn(w, g, sym=sym)
    assert f.q.dtype == torch.uint8 and int(f.q.max()) < (1 << cls.bits)
    d = f.dequantize()
    step = f.scale.abs().repeat_interleave(g, 1)
    assert ((d - w).abs() <= step * 1.01 + 1e-6).all()  # sym (Q4_0 style) clamps the far end
    assert torch.equal(pack(f).dequantize(), d)  # scales are f16-exact: packing is lossless


def test_int8_rtn():
    w = torch.randn(7, 128)
    for g in (None, 32):
        f = Int8Weight.quantize_rtn(w, g)
        assert f.q.dtype == torch.int8
        assert (f.dequantize() - w).abs().max() < w.abs().max() / 127
        assert torch.equal(pack(f).dequantize(), f.dequantize())


def test_codebook_formats():
    w = torch.randn(9, 128)
    nf4 = CodebookWeight.quantize_rtn(w, 64, "nf4")
    assert torch.equal(nf4.codebook[0], NF4_TABLE)
    km = CodebookWeight.quantize_rtn(w, None, "kmeans")
    # a row's own k-means table fits it better than NF4 with one scale per row, and about as well
    # as NF4 with a scale per group of 64
    nf4_row = CodebookWeight.quantize_rtn(w, None, "nf4")
    err_nf4 = (nf4.dequantize() - w).pow(2).mean()
    err_km = (km.dequantize() - w).pow(2).mean()
    assert err_km < (nf4_row.dequantize() - w).pow(2).mean() and err_km < 1.2 * err_nf4 < 0.05
    for f in (nf4, km):
        p = pack(f)
        ref = f.dequantize()
        # int16 table: relative error <= 2**-16 of the row's largest entry
        tol = 2.0 ** -15 * ref.abs().amax(1, keepdim=True)
        assert ((p.dequantize() - ref).abs() <= tol).all()


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("N", [1, 3, 67])
def test_packed_layout_roundtrip(fmt, N):
    K = 256
    f = FORMATS[fmt](torch.randn(N, K))
    p = pack(f)
    assert isinstance(p, (PackedInt, PackedCodebook))
    ref = f.dequantize()
    if isinstance(p, PackedInt):
        assert torch.equal(p.dequantize(), ref)
    else:  # codebook tables are stored as int16 (relative error <= 2**-15 of the row's largest entry)
        assert ((p.dequantize() - ref).abs() <= 2.0 ** -15 * ref.abs().amax(1, keepdim=True)).all()
    assert p.dequantize().shape == (N, K)
    bits = 4 if isinstance(f, CodebookWeight) else getattr(f, "bits", 8)  # codes as stored when packed
    assert bits * N * K / 8 <= p.nbytes <= (bits + 1) * ((N + 7) // 8) * 8 * K / 8 + 64 * ((N + 7) // 8) * 8  # + tables / row scales


def test_bad_shapes_rejected():
    with pytest.raises(ValueError):
        Int4Weight.quantize_rtn(torch.randn(4, 48), 32)
    with pytest.raises(ValueError):
        Int4Weight.quantize_rtn(torch.randn(4, 64), 48)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "int8_pc", "int3_g32", "int2_g128"])
def test_large_matrices_pack_a_slice_at_a_time_to_the_same_bytes(fmt, monkeypatch):
    from jisu.kernels import packed as packed_mod

    w = torch.randn(203, 256, generator=torch.Generator().manual_seed(3))
    f = FORMATS[fmt](w)
    whole = pack(f)
    monkeypatch.setattr(packed_mod, "PACK_CHUNK_BYTES", 256 * 16)  # 16 rows a slice: 13 slices
    sliced = pack(f)
    assert torch.equal(whole.data, sliced.data)
    if whole.chan_scale is not None:
        assert torch.equal(whole.chan_scale, sliced.chan_scale)
    # decoding a slice of tiles at a time gives the same floats
    monkeypatch.setattr(packed_mod, "PACK_CHUNK_BYTES", 256 * 24)
    assert torch.equal(sliced.dequantize(), f.dequantize())


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "int8_pc", "int3_g32"])
def test_packing_from_row_slices_gives_the_same_bytes(fmt):
    from jisu.kernels.packed import _rows_of

    w = torch.randn(203, 256, generator=torch.Generator().manual_seed(4))
    f = FORMATS[fmt](w)
    whole = pack(f)
    sliced = PackedInt.from_slices(203, (_rows_of(f, r0, r0 + 40) for r0 in range(0, 203, 40)))
    assert torch.equal(whole.data, sliced.data)
    if whole.chan_scale is not None:
        assert torch.equal(whole.chan_scale, sliced.chan_scale)
    with pytest.raises(ValueError):  # slices must hold whole tiles
        PackedInt.from_slices(203, (_rows_of(f, r0, r0 + 41) for r0 in range(0, 203, 41)))
