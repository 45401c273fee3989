"""Logical quantized-weight formats a quantizer produces (plain torch tensors).

Each has a pure-torch `dequantize()` (the reference the kernels are tested against) and a
round-to-nearest `quantize_rtn(w, ...)` constructor. `jisu.kernels.packed.pack()` turns any
of them into the byte layout the native kernels stream. Weights are [N, K]: N outputs, K inputs.

Conventions (chosen so GGUF Q4_0 / Q4_1 / Q8_0 blocks convert without loss):
  Int8Weight      x = q * scale                       (scale per row [N] or per group [N, K/g])
  Int4/3/2Weight  sym:  x = (q - 2**(bits-1)) * scale  (Q4_0: bits 4, g 32)
                  asym: x = q * scale + min            (Q4_1: bits 4, g 32, min = block "m")
                  A zero-point convention x = (q - z) * s is held as min = -z * s.
  CodebookWeight  x = codebook[n, idx] * scale[n, k // g]   (scale optional)
Packed kernels store int scales/mins as float16 (like GGUF); quantize_rtn rounds them to
float16 up front so the packed weights equal `dequantize()` exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

# QLoRA's NF4 levels (normal-float 4-bit), used with an absmax group scale.
NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

GROUP_SIZES = (32, 64, 128)


def _check_group(K: int, group_size: int) -> None:
    if group_size % 32 or group_size <= 0:
        raise ValueError(f"group size must be a positive multiple of 32, got {group_size}")
    if K % group_size:
        raise ValueError(f"K={K} is not a multiple of the group size {group_size}")


def _f16(t: torch.Tensor) -> torch.Tensor:
    """Rounds to the nearest float16 value, kept as float32."""
    return t.to(torch.float16).to(torch.float32)


def _nearest(x: torch.Tensor, cb: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Index of the nearest codebook entry per value, in row chunks to bound memory."""
    out = torch.empty(x.shape, dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], rows):
        out[i:i + rows] = (x[i:i + rows, :, None] - cb[i:i + rows, None, :]).abs().argmin(dim=2)
    return out


def _expand(s: torch.Tensor, group_size: int) -> torch.Tensor:
    return s.repeat_interleave(group_size, dim=1)


@dataclass
class Int8Weight:
    q: torch.Tensor                   # int8 [N, K]
    scale: torch.Tensor               # float32 [N] (per channel) or [N, K // group_size]
    group_size: Optional[int] = None  # None: per output channel

    @property
    def shape(self):
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        q = self.q.to(torch.float32)
        if self.group_size is None:
            return q * self.scale.to(torch.float32)[:, None]
        return q * _expand(self.scale.to(torch.float32), self.group_size)

    @classmethod
    def quantize_rtn(cls, w: torch.Tensor, group_size: Optional[int] = None) -> "Int8Weight":
        """Symmetric absmax/127 rounding, per channel (f32 scale) or per group (f16 scale, = Q8_0)."""
        w = w.detach().to(torch.float32)
        N, K = w.shape
        if group_size is None:
            s = w.abs().amax(dim=1) / 127.0
            inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
            q = torch.round(w * inv[:, None]).clamp(-127, 127).to(torch.int8)
            return cls(q, s, None)
        _check_group(K, group_size)
        wg = w.view(N, K // group_size, group_size)
        s = _f16(wg.abs().amax(dim=2) / 127.0)
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q = torch.round(wg * inv[..., None]).clamp(-127, 127).to(torch.int8).view(N, K)
        return cls(q, s, group_size)


@dataclass
class IntWeight:
    """Group-wise low-bit integer weight; subclasses fix `bits`."""
    q: torch.Tensor                     # uint8 [N, K], codes 0 .. 2**bits - 1
    scale: torch.Tensor                 # float32 [N, K // group_size]
    group_size: int = 32
    min: Optional[torch.Tensor] = None  # float32 [N, K // group_size]; None = symmetric
    bits: ClassVar[int] = 4

    @property
    def shape(self):
        return tuple(self.q.shape)

    @property
    def asym(self) -> bool:
        return self.min is not None

    def dequantize(self) -> torch.Tensor:
        q = self.q.to(torch.float32)
        s = _expand(self.scale.to(torch.float32), self.group_size)
        if self.min is None:
            return (q - float(1 << (self.bits - 1))) * s
        return q * s + _expand(self.min.to(torch.float32), self.group_size)

    @classmethod
    def quantize_rtn(cls, w: torch.Tensor, group_size: int = 32, sym: bool = True) -> "IntWeight":
        """Round-to-nearest. sym follows Q4_0 (scale = signed absmax / -2**(bits-1), so the
        largest-magnitude value maps exactly to code 0); asym follows Q4_1 (min/max)."""
        w = w.detach().to(torch.float32)
        N, K = w.shape
        _check_group(K, group_size)
        qmax = (1 << cls.bits) - 1
        wg = w.view(N, K // group_size, group_size)
        if sym:
            off = 1 << (cls.bits - 1)
            idx = wg.abs().argmax(dim=2, keepdim=True)
            vmax = torch.gather(wg, 2, idx).squeeze(2)
            s = _f16(vmax / -off)
            inv = torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
            q = (torch.round(wg * inv[..., None]) + off).clamp(0, qmax)
            return cls(q.to(torch.uint8).view(N, K), s, group_size, None)
        lo = wg.amin(dim=2)
        hi = wg.amax(dim=2)
        s = _f16((hi - lo) / qmax)
        m = _f16(lo)
        inv = torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
        q = torch.round((wg - m[..., None]) * inv[..., None]).clamp(0, qmax)
        return cls(q.to(torch.uint8).view(N, K), s, group_size, m)


@dataclass
class Int4Weight(IntWeight):
    bits: ClassVar[int] = 4


@dataclass
class Int3Weight(IntWeight):
    bits: ClassVar[int] = 3


@dataclass
class Int2Weight(IntWeight):
    bits: ClassVar[int] = 2


@dataclass
class CodebookWeight:
    idx: torch.Tensor                     # uint8 [N, K], 0..15
    codebook: torch.Tensor                # float32 [N, 16]
    scale: Optional[torch.Tensor] = None  # float32 [N, K // group_size] or None
    group_size: Optional[int] = None

    @property
    def shape(self):
        return tuple(self.idx.shape)

    def dequantize(self) -> torch.Tensor:
        w = torch.gather(self.codebook.to(torch.float32), 1, self.idx.long())
        if self.scale is not None:
            w = w * _expand(self.scale.to(torch.float32), self.group_size)
        return w

    @classmethod
    def quantize_rtn(cls, w: torch.Tensor, group_size: Optional[int] = 64,
                     codebook: str = "nf4", iters: int = 8) -> "CodebookWeight":
        """codebook="nf4": NF4 table for every row and an absmax scale per group.
        codebook="kmeans": a 16-entry table per row learned by a few Lloyd iterations
        (no group scale unless group_size is given, then per-group absmax first)."""
        w = w.detach().to(torch.float32)
        N, K = w.shape
        s = None
        x = w
        if group_size is not None:
            _check_group(K, group_size)
            s = w.view(N, K // group_size, group_size).abs().amax(dim=2)
            s = torch.where(s > 0, s, torch.ones_like(s))
            x = w / _expand(s, group_size)
        if codebook == "nf4":
            cb = NF4_TABLE.to(w.device).expand(N, 16).contiguous()
        elif codebook == "kmeans":
            qs = torch.linspace(0, 1, 16, device=w.device)
            cb = torch.quantile(x, qs, dim=1).T.contiguous()  # init at quantiles
            for _ in range(iters):
                idx = _nearest(x, cb)
                sums = torch.zeros_like(cb).scatter_add_(1, idx, x)
                cnt = torch.zeros_like(cb).scatter_add_(1, idx, torch.ones_like(x))
                cb = torch.where(cnt > 0, sums / cnt.clamp_min(1), cb)
        else:
            raise ValueError(f"unknown codebook {codebook!r}")
        idx = _nearest(x, cb).to(torch.uint8)
        return cls(idx, cb.to(torch.float32), s, group_size)
