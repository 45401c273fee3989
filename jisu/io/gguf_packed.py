"""GGUF tensors kept quantized: Q8_0 / Q4_0 / Q4_1 blocks convert losslessly into jisu's weight
formats and are packed for the native kernels, so a quantized model's memory stays near its
file size (no fp32 copy of the whole model is ever made).

    Q8_0 {f16 d; i8 q[32]}          x = q * d         -> Int8Weight(q, d, group 32)
    Q4_0 {f16 d; u8 qs[16]}         x = (q - 8) * d   -> Int4Weight(q, d, group 32)            (sym)
    Q4_1 {f16 d; f16 m; u8 qs[16]}  x = q * d + m     -> Int4Weight(q, d, group 32, min=m)     (asym)

In a 4-bit block, value j (0..15) is the low nibble of qs[j] and value j + 16 its high nibble.
The other types the native GGML kind runs (K-quants, Q5_0/Q5_1, IQ4_NL/IQ4_XS, F16/BF16:
jisu.kernels.packed_ggml) stay in the file's own bytes, read in place from the memmap. Any other
type is dequantized to fp32 (jisu.io.gguf), with a warning that says what it costs.
`iter_gguf_weights` yields a GGUF's weights either way."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..config import ModelConfig
from ..errors import ModelFormatError, UnsupportedError
from ..memory import available_bytes as _available_bytes
from ..models import archs
from .gguf import GGUFFile, GGUFTensor, hf_name

PACKABLE = frozenset({T.Q8_0, T.Q4_0, T.Q4_1})


_LAYOUT = {  # one block of each type as a numpy record
    T.Q8_0: np.dtype([("d", "<f2"), ("q", "i1", 32)]),
    T.Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    T.Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
}


SLICED_ELEMS = 1 << 23  # matrices larger than this are packed a slice of rows at a time


def _blocks(t: GGUFTensor) -> np.ndarray:
    """The tensor's blocks as a record array [N, K / 32] viewing the memmap (no copy)."""
    N, K = t.shape
    _, type_size = GGML_QUANT_SIZES[t.qtype]
    raw = np.asarray(t.data).reshape(-1).view(np.uint8)
    if raw.size != N * (K // 32) * type_size:
        raise ModelFormatError(f"{t.name}: {t.qtype.name} tensor of shape {t.shape} has {raw.size} bytes")
    return raw.view(_LAYOUT[t.qtype]).reshape(N, K // 32)


def _f16(field: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(field.astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """[N, nb, 16] bytes -> [N, nb * 32] codes (low nibbles first within each block)."""
    N, nb, _ = qs.shape
    out = np.empty((N, nb, 32), dtype=np.uint8)
    np.bitwise_and(qs, 15, out=out[:, :, :16])
    np.right_shift(qs, 4, out=out[:, :, 16:])
    return torch.from_numpy(out.reshape(N, nb * 32))


def gguf_format(t: GGUFTensor, rows: tuple[int, int] | None = None):
    """The lossless jisu format (formats.Int8Weight / Int4Weight) of a Q8_0 / Q4_0 / Q4_1 matrix
    (or of its rows [r0, r1)). Reads the blocks straight from the memmap: the codes are the only
    full-size copy made."""
    from ..kernels.formats import Int4Weight, Int8Weight

    if t.qtype not in PACKABLE or len(t.shape) != 2:
        raise ValueError(f"{t.name}: {t.qtype.name} {t.shape} is not a packable matrix")
    b = _blocks(t)
    if rows is not None:
        b = b[rows[0]:rows[1]]
    N, K = b.shape[0], t.shape[1]
    if t.qtype == T.Q8_0:
        return Int8Weight(torch.from_numpy(np.ascontiguousarray(b["q"]).reshape(N, K)), _f16(b["d"]), 32)
    if t.qtype == T.Q4_0:
        return Int4Weight(_nibbles(b["qs"]), _f16(b["d"]), 32, None)
    return Int4Weight(_nibbles(b["qs"]), _f16(b["d"]), 32, _f16(b["m"]))


def _pack_in_slices(g: GGUFFile, name: str, t: GGUFTensor):
    """A large matrix (an embedding) packed a slice of rows at a time, each slice's file pages
    released once packed: the file's copy and the packed copy never both sit in memory whole."""
    from ..kernels.packed import PACK_CHUNK_BYTES, NR, PackedInt

    N, K = t.shape
    row_bytes = (K // 32) * GGML_QUANT_SIZES[t.qtype][1]
    step = max(NR, PACK_CHUNK_BYTES // max(K, 1) // NR * NR)

    def slices():
        for r0 in range(0, N, step):
            r1 = min(N, r0 + step)
            yield gguf_format(t, (r0, r1))
            g.release(name, (r0 * row_bytes, (r1 - r0) * row_bytes))

    return PackedInt.from_slices(N, slices())


def _transform_rows(fmt, fn):
    """A load transform that reorders rows (llama.cpp's q/k permutation), applied to every per-row
    tensor of a packable format."""
    fmt.q = fn(fmt.q).contiguous()
    fmt.scale = fn(fmt.scale).contiguous()
    if getattr(fmt, "min", None) is not None:
        fmt.min = fn(fmt.min).contiguous()
    return fmt


def _ggml_weight(g: GGUFFile, name: str, t: GGUFTensor, fn):
    """A matrix in its file bytes (PackedGGML). Rows a load transform reorders are copied (the
    q/k projections: a few per cent of a layer) and their file pages released."""
    from ..kernels.packed_ggml import PackedGGML, as_bytes

    N, K = t.shape
    data = as_bytes(t.data)
    if fn is not None:
        data = fn(data.view(N, -1)).contiguous().view(-1)
        g.release(name)
    return PackedGGML(data, N, K, int(t.qtype))


def check_reference_path(g: GGUFFile, cfg: ModelConfig, native: frozenset) -> None:
    """Before loading: one warning naming the matrix types that have no native kernel and what
    dequantizing them to fp32 costs, or a one-line error when that would not fit in memory."""
    slow: dict = {}
    for name, t in g.tensors.items():
        if len(t.shape) != 2 or t.qtype in PACKABLE or int(t.qtype) in native or t.qtype == T.F32:
            continue
        if hf_name(name, cfg.arch) is None:
            continue
        e, b = slow.get(t.qtype, (0, 0))
        slow[t.qtype] = (e + t.shape[0] * t.shape[1], b + t.data.size)
    if not slow:
        return
    fp32 = 4 * sum(e for e, _ in slow.values())
    file_mb = sum(b for _, b in slow.values()) / 1e6
    kinds = ", ".join(sorted(q.name for q in slow))
    avail = _available_bytes()
    if avail is not None and fp32 > 0.9 * avail:
        raise UnsupportedError(f"{g.path}: {kinds} tensors have no native kernel and would take {fp32 / 1e9:.1f} GB "
                               f"as fp32 on the reference path; {avail / 1e9:.1f} GB is available")
    import warnings

    warnings.warn(f"{g.path}: {kinds} tensors have no native kernel: dequantized to fp32 on the reference "
                  f"path ({fp32 / 1e6:.0f} MB in memory for {file_mb:.0f} MB of file, and slower)",
                  RuntimeWarning, stacklevel=4)


def iter_gguf_weights(g: GGUFFile, cfg: ModelConfig, packed: bool = False) -> Iterator[tuple[str, object]]:
    """Yield (HF name, tensor) for every tensor jisu uses, in the form held in memory (the
    architecture's load_transform applied): fp32 tensors, or with packed=True, Q8_0 / Q4_0 / Q4_1
    matrices as packed kernel weights (jisu.kernels.packed) and the other natively run types as
    PackedGGML views of the file. A matrix's transform may only reorder its rows (it is applied to
    a packed matrix's codes, scales and mins, or to a PackedGGML's rows of bytes)."""
    from ..kernels.packed import pack
    from ..kernels.packed_ggml import native_types

    arch = archs()[cfg.arch]
    ggml = native_types() if packed else frozenset()
    if packed:
        check_reference_path(g, cfg, ggml)
    for name, t in g.tensors.items():
        target = hf_name(name, cfg.arch)
        if target is None:
            continue
        fn = arch.load_transform(cfg, "gguf", target)
        try:
            w = _weight(g, name, t, fn, packed, ggml, pack)
        except (RuntimeError, ValueError, IndexError) as e:  # a transform (q/k rows by heads) that does not fit
            raise ModelFormatError(f"{g.path}: tensor {name!r} of shape {t.shape} does not fit the model's "
                                   f"config ({e})") from None
        yield target, w
    if packed:
        from ..memory import trim_heap

        trim_heap()  # the conversion's temporaries


def _weight(g: GGUFFile, name: str, t: GGUFTensor, fn, packed: bool, ggml, pack):
    """One tensor of iter_gguf_weights in its form in memory."""
    if packed and t.qtype in PACKABLE and len(t.shape) == 2:
        if fn is None and t.shape[0] * t.shape[1] > SLICED_ELEMS:
            w = _pack_in_slices(g, name, t)
        else:
            fmt = gguf_format(t)
            w = pack(fmt if fn is None else _transform_rows(fmt, fn))
            del fmt
        g.release(name)  # the file's pages of this tensor are not needed any more
        return w
    if packed and int(t.qtype) in ggml and len(t.shape) == 2:
        return _ggml_weight(g, name, t, fn)
    w = g.dequantize(name)
    return fn(w) if fn is not None else w
