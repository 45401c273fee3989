"""Vectorized PyTorch dequantizers for GGUF/GGML tensor types (F32/F16/BF16, legacy, K-quants, IQ4_NL).

Block layouts follow ggml's ggml-common.h; results match gguf-py's numpy `gguf.quants.dequantize`.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from jisu.errors import ModelFormatError, UnsupportedError

# Output elements decoded per step: the temporaries of one step (a few x 4 MiB) stay
# small next to the output, and each torch op still has enough work to use all threads.
_CHUNK_ELEMENTS = 1 << 20

# Shift amounts, broadcast along a middle axis to fan packed bytes out into their fields.
_SHIFT_NIBBLES = torch.tensor([0, 4], dtype=torch.uint8)
_SHIFT_CRUMBS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_SHIFT_BITS = torch.arange(8, dtype=torch.uint8)

# IQ4_NL's non-linear 4-bit code book (kvalues_iq4nl in ggml-common.h).
_IQ4_NL_VALUES = torch.tensor(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32
)

Decoder = Callable[[torch.Tensor, torch.Tensor], None]


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The f16 field at byte `at` of every block, as an f32 column [n, 1]."""
    # .contiguous(): a strided 2-byte slice cannot always be reinterpreted in place.
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _fan(x: torch.Tensor, shifts: torch.Tensor, mask: int) -> torch.Tensor:
    """[n, k] bytes -> [n, len(shifts), k]: field i of every byte is (byte >> shifts[i]) & mask."""
    return (x.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian u32 -> [n, 32] bits, bit j at index j."""
    return ((qh.unsqueeze(2) >> _SHIFT_BITS.view(1, 1, 8)) & 1).reshape(len(qh), 32)


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] 4-bit values: low nibbles are elements 0..15, high ones 16..31."""
    return _fan(qs, _SHIFT_NIBBLES, 0x0F).reshape(len(qs), 32)


# Each decoder reads blocks [n, type_size] (uint8) and writes out [n, block_size] (float32).
# The arithmetic mirrors gguf-py's order of f32 operations so results are bit-identical.


def _dec_f32(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.view(torch.float32))


def _dec_f16(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.view(torch.float16))


def _dec_bf16(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.view(torch.bfloat16))


def _dec_q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # {f16 d; i8 qs[32]}: x = q * d
    torch.mul(b[:, 2:].view(torch.int8).float(), _f16(b, 0), out=out)


def _dec_q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # {f16 d; u8 qs[16]}: x = (q - 8) * d
    q = _nibbles32(b[:, 2:]).float().sub_(8)
    torch.mul(_f16(b, 0), q, out=out)


def _dec_q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    # {f16 d, m; u8 qs[16]}: x = q * d + m
    torch.mul(_f16(b, 0), _nibbles32(b[:, 4:]).float(), out=out)
    out.add_(_f16(b, 2))


def _dec_q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # {f16 d; u8 qh[4]; u8 qs[16]}: bit j of qh is the 5th bit of element j; x = (q - 16) * d
    q = (_nibbles32(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)).float().sub_(16)
    torch.mul(_f16(b, 0), q, out=out)


def _dec_q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    # {f16 d, m; u8 qh[4]; u8 qs[16]}: x = q * d + m
    q = (_nibbles32(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)).float()
    torch.mul(_f16(b, 0), q, out=out)
    out.add_(_f16(b, 2))


def _dec_q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # {u8 scales[16]; u8 qs[64]; f16 d, dmin}: 16 sub-blocks of 16, each with a 4-bit scale
    # (low nibble) and 4-bit min (high nibble). Each 32-byte half of qs holds 128 elements
    # as four 2-bit planes of 32.
    n = len(b)
    scales = b[:, :16]
    dl = (_f16(b, 80) * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = _fan(b[:, 16:80].reshape(n * 2, 32), _SHIFT_CRUMBS, 0x03).view(n, 16, 16).float()
    o = out.view(n, 16, 16)
    torch.mul(dl, q, out=o)
    o.sub_(ml)


def _dec_q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: 2 low bits from qs (as in Q2_K), the
    # third from hmask (bit k of hmask[i] belongs to element 32k + i), 6-bit signed scales.
    n = len(b)
    sc = b[:, 96:108]
    # Scale packing: bytes 0..7 hold the low nibbles of scales 0..7 / 8..15 (low / high
    # nibble), bytes 8..11 hold the top 2 bits of scales 0..15 in 2-bit fields.
    low = _fan(sc[:, :8], _SHIFT_NIBBLES, 0x0F).reshape(n, 16)
    high = _fan(sc[:, 8:], _SHIFT_CRUMBS, 0x03).reshape(n, 16)
    scales = (low | (high << 4)).float().sub_(32)
    dl = (_f16(b, 108) * scales).view(n, 16, 1)
    ql = _fan(b[:, 32:96].reshape(n * 2, 32), _SHIFT_CRUMBS, 0x03).view(n, 256)
    qh = _fan(b[:, :32], _SHIFT_BITS, 0x01).view(n, 256)
    # A clear hmask bit means "subtract 4": q = ql - 4 * (1 - h) = (ql | h << 2) - 4.
    q = (ql | (qh << 2)).float().sub_(4).view(n, 16, 16)
    torch.mul(dl, q, out=out.view(n, 16, 16))


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 packed bytes -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    s03, s47, s8b = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat((s03 & 0x3F, (s8b & 0x0F) | ((s03 >> 6) << 4)), dim=1)
    mins = torch.cat((s47 & 0x3F, (s8b >> 4) | ((s47 >> 6) << 4)), dim=1)
    return scale.float(), mins.float()


def _q4_k_planes(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 8, 32]: each 32-byte group gives two sub-blocks, low then high nibbles."""
    return _fan(qs.reshape(-1, 32), _SHIFT_NIBBLES, 0x0F).view(-1, 8, 32)


def _dec_q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # {f16 d, dmin; u8 scales[12]; u8 qs[128]}: 8 sub-blocks of 32, x = d*sc * q - dmin*m
    n = len(b)
    sc, m = _k_scale_min(b[:, 4:16])
    dl = (_f16(b, 0) * sc).view(n, 8, 1)
    ml = (_f16(b, 2) * m).view(n, 8, 1)
    o = out.view(n, 8, 32)
    torch.mul(dl, _q4_k_planes(b[:, 16:144]).float(), out=o)
    o.sub_(ml)


def _dec_q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: Q4_K plus a 5th bit, bit k of
    # qh[i] belonging to element i of sub-block k.
    n = len(b)
    sc, m = _k_scale_min(b[:, 4:16])
    dl = (_f16(b, 0) * sc).view(n, 8, 1)
    ml = (_f16(b, 2) * m).view(n, 8, 1)
    q = _q4_k_planes(b[:, 48:176]) | (_fan(b[:, 16:48], _SHIFT_BITS, 0x01) << 4)
    o = out.view(n, 8, 32)
    torch.mul(dl, q.float(), out=o)
    o.sub_(ml)


def _dec_q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: per 128-element half, ql's 64 bytes give
    # the low nibbles (low nibbles = elements 0..63, high = 64..127) and qh's 32 bytes the
    # top 2 bits in four 2-bit planes of 32; x = d * scale * (q - 32).
    n = len(b)
    ql = _fan(b[:, :128].reshape(n * 2, 64), _SHIFT_NIBBLES, 0x0F).view(n, 256)
    qh = _fan(b[:, 128:192].reshape(n * 2, 32), _SHIFT_CRUMBS, 0x03).view(n, 256)
    q = (ql | (qh << 4)).float().sub_(32).view(n, 16, 16)
    dl = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    torch.mul(dl, q, out=out.view(n, 16, 16))


def _dec_iq4_nl(b: torch.Tensor, out: torch.Tensor) -> None:
    # {f16 d; u8 qs[16]}: nibbles as in Q4_0, mapped through the code book; x = d * kvalue
    values = _IQ4_NL_VALUES[_nibbles32(b[:, 2:]).long()]
    torch.mul(_f16(b, 0), values, out=out)


def _dec_iq4_xs(b: torch.Tensor, out: torch.Tensor) -> None:
    # {f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}: 8 sub-blocks of 32, 6-bit scale
    # ls = low nibble of scales_l[i / 2] (>> 4 for odd i) | bits 2i..2i+1 of scales_h << 4;
    # x = d * (ls - 32) * kvalue, each sub-block's 16 bytes holding its nibbles as in IQ4_NL
    n = len(b)
    lo = _fan(b[:, 4:8], _SHIFT_NIBBLES, 0x0F).transpose(1, 2).reshape(n, 8).to(torch.int32)
    sh = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    hi = (sh >> torch.arange(0, 16, 2, dtype=torch.int32).view(1, 8)) & 3
    dl = _f16(b, 0) * ((lo | (hi << 4)) - 32).to(torch.float32)
    values = _IQ4_NL_VALUES[_nibbles32(b[:, 8:].reshape(n * 8, 16)).long()].view(n, 8, 32)
    torch.mul(dl.view(n, 8, 1), values, out=out.view(n, 8, 32))


_DECODERS: dict[T, Decoder] = {
    T.F32: _dec_f32,
    T.F16: _dec_f16,
    T.BF16: _dec_bf16,
    T.Q8_0: _dec_q8_0,
    T.Q4_0: _dec_q4_0,
    T.Q4_1: _dec_q4_1,
    T.Q5_0: _dec_q5_0,
    T.Q5_1: _dec_q5_1,
    T.Q2_K: _dec_q2_k,
    T.Q3_K: _dec_q3_k,
    T.Q4_K: _dec_q4_k,
    T.Q5_K: _dec_q5_k,
    T.Q6_K: _dec_q6_k,
    T.IQ4_NL: _dec_iq4_nl,
    T.IQ4_XS: _dec_iq4_xs,
}

SUPPORTED_TYPES: frozenset[T] = frozenset(_DECODERS)


def _type_name(qtype: object) -> str:
    return getattr(qtype, "name", None) or str(qtype)


def dequantize(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode a tensor's raw GGUF bytes into a contiguous float32 tensor of `shape` (numpy order).

    `data` may be any contiguous array (uint8 bytes, or float32/float16/uint16 for the float
    types), including a read-only memmap; it is never written to.
    """
    try:
        qtype = T(qtype)
        decode = _DECODERS[qtype]
    except (ValueError, KeyError):
        supported = ", ".join(t.name for t in _DECODERS)
        raise UnsupportedError(
            f"tensor type {_type_name(qtype)} is not supported (supported: {supported})"
        ) from None

    shape = tuple(int(d) for d in shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_elements = math.prod(shape)
    row = shape[-1] if shape else 1
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"{qtype.name} tensor has a negative dimension in shape {shape}")
    if row % block_size:
        raise ModelFormatError(
            f"{qtype.name} tensor shape {shape}: last dimension must be a multiple of {block_size}"
        )
    n_blocks = n_elements // block_size
    expected = n_blocks * type_size

    raw = np.asarray(data)
    if not raw.flags.c_contiguous:
        raw = np.ascontiguousarray(raw)
    raw = raw.reshape(-1).view(np.uint8)
    if raw.size != expected:
        raise ModelFormatError(
            f"{qtype.name} tensor of shape {shape} needs {expected} bytes, got {raw.size}"
        )

    out = torch.empty(n_elements, dtype=torch.float32)
    blocks_out = out.view(n_blocks, block_size)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        chunk = raw[start * type_size : stop * type_size]
        # torch.from_numpy warns on read-only arrays (e.g. a memmap opened "r"); copying one
        # chunk at a time costs little and keeps peak memory near the output size.
        if not chunk.flags.writeable:
            chunk = chunk.copy()
        blocks = torch.from_numpy(chunk).view(stop - start, type_size)
        decode(blocks, blocks_out[start:stop])
    return out.view(shape)
