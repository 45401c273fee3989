"""jisu.io.gguf_quants against gguf-py's numpy reference, on tensors round-tripped through real GGUF files."""
from __future__ import annotations

import time
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import quant_shape_to_byte_shape

import jisu.io.gguf_quants as gq
from jisu.errors import ModelFormatError, UnsupportedError
from jisu.io.gguf import GGUFFile

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# Types gguf-py can quantize, so tests can also feed realistic (not just random) blocks.
QUANTIZABLE = (T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
# Byte offsets of the f16 scale/min fields in each block type: random bytes there could be
# NaN/Inf (NaN != NaN breaks exact comparison), so tests overwrite them with sane values.
F16_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,),
}
ALL_TYPES = sorted(gq.SUPPORTED_TYPES, key=lambda t: t.value)


def _shapes(qtype: T) -> list[tuple[int, ...]]:
    """One row, several rows, a 3-D tensor and odd row counts, in whole blocks."""
    unit = max(GGML_QUANT_SIZES[qtype][0], 32)
    return [(unit,), (1, unit), (3, 2 * unit), (2, 3, unit), (7, 3 * unit), (5, 1, 2 * unit)]


def _random_blocks(qtype: T, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Raw bytes (byte shape) of random blocks whose f16 fields hold finite values in [1e-3, 1e-1]."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 1e-1, (n_blocks, 1)).astype(np.float16)
        blocks[:, at : at + 2] = scale.view(np.uint8)
    return blocks.reshape(quant_shape_to_byte_shape(shape, qtype))


def _raw_tensor(qtype: T, shape: tuple[int, ...], rng: np.random.Generator, quantize: bool) -> np.ndarray:
    """The tensor as gguf.GGUFWriter.add_tensor takes it: typed floats for F32/F16, else bytes."""
    if qtype == T.F32:
        return rng.standard_normal(shape).astype(np.float32)
    if quantize:
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype)
    return _random_blocks(qtype, shape, rng)


def _roundtrip(tmp_path, tensors: dict[str, tuple[np.ndarray, T]]) -> dict[str, gguf.ReaderTensor]:
    """Write the tensors into a GGUF file and read them back (data as read-only memmaps)."""
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (arr, qtype) in tensors.items():
        # For uint8 data gguf-py expects the byte shape and derives the element shape itself.
        writer.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _reference(arr: np.ndarray, qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    raw = np.ascontiguousarray(arr).view(np.uint8)
    return gguf.quants.dequantize(raw, qtype).reshape(shape)


def _check(got: torch.Tensor, want: np.ndarray, shape: tuple[int, ...]) -> None:
    assert got.dtype == torch.float32 and got.is_contiguous() and tuple(got.shape) == shape
    assert np.isfinite(want).all()
    # Same f32 operations in the same order as gguf-py, so the results are bit-identical.
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.filterwarnings("error")  # e.g. torch's warning for non-writable numpy arrays
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matches_reference_through_gguf_file(qtype, tmp_path):
    rng = np.random.default_rng(qtype.value)
    tensors = {}
    for i, shape in enumerate(_shapes(qtype)):
        if qtype not in FLOAT_TYPES:
            tensors[f"random.{i}"] = (_random_blocks(qtype, shape, rng), qtype)
        if qtype in QUANTIZABLE or qtype == T.F32:
            tensors[f"quantized.{i}"] = (_raw_tensor(qtype, shape, rng, quantize=True), qtype)
    read = _roundtrip(tmp_path, tensors)

    for name, (arr, _) in tensors.items():
        shape = _shapes(qtype)[int(name.split(".")[1])]
        t = read[name]
        assert t.tensor_type == qtype
        assert tuple(reversed([int(d) for d in t.shape])) == shape
        assert isinstance(t.data, np.memmap) and not t.data.flags.writeable
        _check(gq.dequantize(t.data, qtype, shape), _reference(arr, qtype, shape), shape)
    # and through jisu's own loader, which validates the file before handing out tensors
    loaded = GGUFFile(str(tmp_path / "t.gguf"))
    for name, (arr, _) in tensors.items():
        shape = _shapes(qtype)[int(name.split(".")[1])]
        assert loaded.tensors[name].qtype == qtype and loaded.tensors[name].shape == shape
        _check(loaded.dequantize(name), _reference(arr, qtype, shape), shape)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_chunk_boundaries(qtype, monkeypatch):
    """Tensors spanning many chunks, with a partial last chunk, decode like one big chunk."""
    block_size = GGML_QUANT_SIZES[qtype][0]
    monkeypatch.setattr(gq, "_CHUNK_ELEMENTS", 3 * max(block_size, 32))
    rng = np.random.default_rng(1)
    shape = (11, 2 * max(block_size, 32))
    quantize = qtype in FLOAT_TYPES
    arr = _raw_tensor(qtype, shape, rng, quantize=quantize)
    _check(gq.dequantize(arr, qtype, shape), _reference(arr, qtype, shape), shape)


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_types_accept_typed_and_byte_arrays(qtype):
    rng = np.random.default_rng(2)
    shape = (3, 5, 7)  # odd sizes: block size 1 allows any last dimension
    arr = _raw_tensor(qtype, shape, rng, quantize=True)
    want = _reference(arr, qtype, shape)
    _check(gq.dequantize(arr, qtype, shape), want, shape)
    as_bytes = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    _check(gq.dequantize(as_bytes, qtype, shape), want, shape)
    if qtype == T.BF16:  # bf16 also commonly arrives as uint16 words
        _check(gq.dequantize(as_bytes.view(np.uint16), qtype, shape), want, shape)


def test_does_not_modify_or_alias_input():
    rng = np.random.default_rng(3)
    arr = _random_blocks(T.Q4_K, (2, 256), rng)
    before = arr.copy()
    out = gq.dequantize(arr, T.Q4_K, (2, 256))
    out.zero_()
    np.testing.assert_array_equal(arr, before)


def test_empty_tensor():
    out = gq.dequantize(np.zeros(0, np.uint8), T.Q4_0, (0, 64))
    assert out.shape == (0, 64) and out.dtype == torch.float32


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_wrong_byte_length(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = (2, max(block_size, 32))
    n_bytes = 2 * max(block_size, 32) // block_size * type_size
    for bad in (n_bytes - 1, n_bytes + type_size, 0):
        with pytest.raises(ModelFormatError, match=qtype.name) as err:
            gq.dequantize(np.zeros(bad, np.uint8), qtype, shape)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("qtype", [t for t in ALL_TYPES if GGML_QUANT_SIZES[t][0] > 1], ids=lambda t: t.name)
def test_row_not_multiple_of_block(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    with pytest.raises(ModelFormatError, match=str(block_size)):
        gq.dequantize(np.zeros(2 * type_size, np.uint8), qtype, (block_size // 2, 4))


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.Q8_K, T.TQ1_0, T.I32])
def test_unsupported_type(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    with pytest.raises(UnsupportedError, match=rf"tensor type {qtype.name} is not supported \(supported: F32, F16") as err:
        gq.dequantize(np.zeros(type_size, np.uint8), qtype, (block_size,))
    assert "\n" not in str(err.value)


def test_supported_types():
    assert gq.SUPPORTED_TYPES == {
        T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
        T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS,
    }


@pytest.mark.parametrize("qtype, shape", [(T.Q8_0, (49152, 576)), (T.Q4_1, (1536, 576))], ids=["Q8_0", "Q4_1"])
def test_speed(qtype, shape):
    """Prints the time for SmolLM2-sized tensors (run with -s to see it); asserts nothing about it."""
    arr = _random_blocks(qtype, shape, np.random.default_rng(4))
    gq.dequantize(arr, qtype, shape)  # warm up
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gq.dequantize(arr, qtype, shape)
    elapsed = time.perf_counter() - start
    assert tuple(out.shape) == shape
    print(f"\ndequantize {qtype.name} {shape}: {elapsed * 1000:.1f} ms ({torch.get_num_threads()} threads)")


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_quantized_model_loads_and_runs(qtype, tmp_path):
    """A whole (tiny) model stored in a quantized type loads to the reference-dequantized weights."""
    import jisu
    from tests.fixtures import write_gguf_llama

    path = write_gguf_llama(str(tmp_path / "q.gguf"), tensor_type=qtype)
    reader = gguf.GGUFReader(path)
    raw = {t.name: t for t in reader.tensors}
    llm = jisu.load(path)
    want = gguf.quants.dequantize(np.asarray(raw["blk.0.ffn_up.weight"].data), qtype)
    up = llm.model.w["model.layers.0.mlp.up_proj.weight"]
    if not isinstance(up, torch.Tensor):  # Q8_0 / Q4_0 / Q4_1 stay packed (losslessly) for the native kernels
        up = up.dequantize()
    np.testing.assert_array_equal(up.numpy(), want.reshape(64, 32))
    out = llm.generate("the", temperature=0, max_tokens=4, ignore_eos=True)
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1], ids=lambda t: t.name)
def test_large_gguf_matrices_packed_in_slices_load_the_same(qtype, tmp_path, monkeypatch):
    """Matrices above SLICED_ELEMS are packed (and their file pages released) a slice of rows at a
    time: the packed bytes equal the one-pass packing."""
    from jisu.io import gguf_packed
    from jisu.io.sources import load_weights, resolve
    from jisu.kernels import packed as packed_mod
    from tests.kernels.helpers import assert_same_packed_ints
    from tests.fixtures import write_gguf_llama

    path = write_gguf_llama(str(tmp_path / "q.gguf"), tensor_type=qtype)
    _, whole, _ = load_weights(resolve(path), packed=True)
    monkeypatch.setattr(gguf_packed, "SLICED_ELEMS", 0)
    monkeypatch.setattr(packed_mod, "PACK_CHUNK_BYTES", 32 * 16)  # 16 rows a slice
    _, sliced, _ = load_weights(resolve(path), packed=True)
    assert_same_packed_ints(whole, sliced)
