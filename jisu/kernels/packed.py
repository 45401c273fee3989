"""Packed weights: a format from formats.py repacked once into the byte layout the native
kernels stream (documented in cpu/common.h), plus the metadata and native descriptor.

`pack(fmt)` -> PackedInt / PackedCodebook. Each knows its bytes (`nbytes`), can rebuild its
effective float weights (`dequantize()`, pure torch, used on CUDA and without the native
module) and computes `linear(x, bias)` (jisu.kernels.ops.linear is the public entry point).
Longer than 400 lines on purpose: the three layouts share the tile layout, the descriptor and the
row operations (rows, concat_rows) that must agree with cpu/common.h byte for byte.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _native
from .formats import CodebookWeight, Int8Weight, IntWeight

_F32 = torch.float32
NR = 8   # rows per tile
QK = 32  # values per block
PACK_CHUNK_BYTES = 1 << 20  # codes laid out per slice of a large matrix


def _pad_rows(t: torch.Tensor, Np: int) -> torch.Tensor:
    if t.shape[0] == Np:
        return t
    pad = torch.zeros((Np - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], 0)


def _f16_bytes(s: torch.Tensor, what: str) -> torch.Tensor:
    h = s.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError(f"{what} does not fit in float16")
    return h


def _tile_scales(s: torch.Tensor, T: int, ng: int, dtype) -> torch.Tensor:
    """[Np, ng] -> bytes [T, ng, 8 * itemsize]: the 8 rows of a tile contiguous per group."""
    s = s.to(dtype).contiguous().view(T, NR, ng).permute(0, 2, 1).contiguous()
    return s.view(torch.uint8).view(T, ng, -1)


class PackedWeight:
    """Base: N, K, the packed uint8 buffer `data`, and the native descriptor (if built)."""

    N: int
    K: int
    data: torch.Tensor

    def _make_desc(self):
        raise NotImplementedError

    def _attach(self):
        self._dense_cache = None
        k = _native.get()
        self._desc = self._make_desc() if (k is not None and self.data.device.type == "cpu") else None
        self._addr = self._desc.addr if self._desc is not None else 0

    @property
    def shape(self):
        return (self.N, self.K)

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams per GEMV (weights + scales)."""
        extra = getattr(self, "chan_scale", None)
        return self.data.numel() + (extra.numel() * 4 if extra is not None else 0)

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device) -> "PackedWeight":
        """Moves the packed buffers (e.g. to CUDA, where linear dequantizes then matmuls)."""
        for name in ("data", "chan_scale"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t.to(device))
        self._attach()
        return self

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Hot path (~200 calls per decoded token): keep the Python work minimal.
        addr = self._addr
        if addr and x.is_cpu and x.dtype is _F32:
            if not x.is_contiguous():
                x = x.contiguous()
            shp = list(x.shape)
            K = self.K
            if shp[-1] != K:
                raise ValueError(f"linear: x has {shp[-1]} features, weight expects {K}")
            shp[-1] = self.N
            out = x.new(*shp)  # the cheapest allocation torch offers from Python (float32, CPU)
            if bias is None:
                b = 0
            else:
                if bias.dtype is not _F32 or not bias.is_contiguous() or bias.numel() != self.N:
                    bias = bias.to(torch.float32).contiguous().view(self.N)
                b = bias.data_ptr()
            _native.K.linear(addr, x.data_ptr(), out.data_ptr(), x.numel() // K, b)
            return out
        return self._torch_linear(x, bias)

    __call__ = linear

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) of this [N, K] weight, dequantized -> [*ids.shape, K] fp32 (an
        embedding kept packed: only these rows are decoded)."""
        ids = ids.to(torch.int64).contiguous()
        if self._addr and _native.K is not None:
            out = torch.empty(*ids.shape, self.K, dtype=_F32)
            _native.K.dequant_rows(self._addr, ids.data_ptr(), ids.numel(), out.data_ptr())
            return out
        if self._dense_cache is None:
            self._dense_cache = self.dequantize()
        return self._dense_cache.to("cpu")[ids]

    def _torch_linear(self, x, bias):
        """Reference path: dequantize (cached on CPU) then torch matmul."""
        if x.device.type == "cpu":
            _native.warn_fallback()
            if self._dense_cache is None:
                self._dense_cache = self.dequantize()
            w = self._dense_cache
        else:
            w = self.dequantize().to(x.device)
        w = w.to(x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def _rows_of(fmt, r0: int, r1: int):
    """The same format restricted to rows [r0, r1) (views)."""
    import copy

    part = copy.copy(fmt)
    for field in ("q", "scale", "min"):
        t = getattr(part, field, None)
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == fmt.shape[0]:
            setattr(part, field, t[r0:r1])
    return part


class PackedInt(PackedWeight):
    """Int8 (per-channel or group), Int4/Int3/Int2 (sym or asym, group 32/64/128)."""

    _V3 = torch.arange(3, dtype=torch.uint8).view(3, 1)  # int3: vector v carries bit v of quads 6, 7

    def __init__(self, fmt):
        self._setup(fmt, fmt.shape[0])
        # tiles are independent and stored one after another: a large matrix (an embedding) is
        # laid out a slice of rows at a time, so the temporaries stay a few MB
        step = self._slice_rows()
        self.data = None
        for r0 in range(0, self.N, step):
            self._put(r0, fmt if self.N <= step else _rows_of(fmt, r0, r0 + step))
        self._attach()

    @classmethod
    def from_slices(cls, N: int, slices) -> "PackedInt":
        """Packs a matrix of N rows given as consecutive row slices (formats of the same kind whose
        row counts are multiples of 8, except the last): the caller can produce each slice, and free
        what it read, one at a time."""
        self = cls.__new__(cls)
        self.data, r0 = None, 0
        for part in slices:
            if r0 == 0:
                self._setup(part, N)
            elif r0 % NR:
                raise ValueError("row slices must hold a multiple of 8 rows (except the last)")
            self._put(r0, part)
            r0 += part.shape[0]
        if r0 != N:
            raise ValueError(f"row slices hold {r0} rows, expected {N}")
        self._attach()
        return self

    def _slice_rows(self) -> int:
        return max(NR, PACK_CHUNK_BYTES // max(self.K, 1) // NR * NR)

    @staticmethod
    def _fields(fmt):
        """(codes uint8 [n, K], scale, min) of an Int8Weight / IntWeight."""
        if isinstance(fmt, Int8Weight):
            return fmt.q.view(torch.uint8), fmt.scale, None
        return fmt.q, fmt.scale, fmt.min

    def _setup(self, fmt, N: int) -> None:
        if isinstance(fmt, Int8Weight):
            bits, asym = 8, False
            per_channel = fmt.group_size is None
            group = fmt.q.shape[1] if per_channel else fmt.group_size
        elif isinstance(fmt, IntWeight):
            bits, asym, per_channel, group = fmt.bits, fmt.asym, False, fmt.group_size
        else:
            raise TypeError(f"PackedInt cannot pack {type(fmt).__name__}")
        K = fmt.shape[1]
        if group % QK or K % group:
            raise ValueError(f"K={K} must be a multiple of the group size {group} (a multiple of 32)")
        self.N, self.K, self.bits, self.asym = N, K, bits, asym
        self.per_channel, self.group = per_channel, group
        self.chan_scale = None
        if per_channel:
            self.chan_scale = torch.zeros(((N + NR - 1) // NR) * NR)

    def _put(self, r0: int, part) -> None:
        """Packs rows [r0, r0 + n) given as a format of n rows into self.data."""
        q, scale, mn = self._fields(part)
        n = q.shape[0]
        if self.per_channel:
            self.chan_scale[r0:r0 + n] = scale.to(torch.float32).reshape(n)
        tiles = self._tiles(q, None if self.per_channel else scale, mn)
        if self.data is None:  # every tile takes the same bytes
            per_tile = tiles.numel() // ((n + NR - 1) // NR)
            self.data = torch.empty(((self.N + NR - 1) // NR) * per_tile, dtype=torch.uint8)
        off = (r0 // NR) * (self.data.numel() // ((self.N + NR - 1) // NR))
        self.data[off:off + tiles.numel()] = tiles

    def _tiles(self, q: torch.Tensor, scale, mn) -> torch.Tensor:
        """The packed bytes of the tiles holding rows q [n, K] (n a multiple of NR, or the last rows)."""
        N, K = q.shape
        bits, asym, group = self.bits, self.asym, self.group
        T = (N + NR - 1) // NR
        Np, nb, ng = T * NR, K // QK, K // group
        # codes -> [T, nb, quad j, row r, t]: vector j of a block = 8 rows x 4 consecutive k
        c = _pad_rows(q.to(torch.uint8), Np).view(T, NR, nb, 8, 4).permute(0, 2, 3, 1, 4)
        c = c.reshape(T, nb, 8, 32)
        if bits == 8:
            blocks = c.reshape(T, nb, 256)
        elif bits == 4:
            blocks = (c[:, :, :4] | (c[:, :, 4:] << 4)).reshape(T, nb, 128)
        elif bits == 3:  # vector v: quads 2v, 2v+1 in bits 0-2, 4-6; bit v of quads 6, 7 in bits 3, 7
            v = (c[:, :, 0:6:2] | (c[:, :, 1:6:2] << 4)
                 | (((c[:, :, 6:7] >> self._V3) & 1) << 3) | (((c[:, :, 7:8] >> self._V3) & 1) << 7))
            blocks = v.reshape(T, nb, 96)
        else:
            lo = c & 3
            v = lo[:, :, 0:2] | (lo[:, :, 2:4] << 2) | (lo[:, :, 4:6] << 4) | (lo[:, :, 6:8] << 6)
            blocks = v.reshape(T, nb, 64)
        del c
        blocks = blocks.reshape(T, ng, -1)
        parts = []
        if not self.per_channel:
            parts.append(_tile_scales(_pad_rows(_f16_bytes(scale, "scale"), Np), T, ng, torch.float16))
            if asym:
                parts.append(_tile_scales(_pad_rows(_f16_bytes(mn, "min"), Np), T, ng, torch.float16))
        parts.append(blocks)
        return torch.cat(parts, 2).reshape(-1).contiguous()

    def _make_desc(self):
        cs = self.chan_scale.data_ptr() if self.chan_scale is not None else 0
        return _native.K.make_int(self.data.data_ptr(), self.N, self.K, self.bits, self.asym,
                                  self.per_channel, self.group, cs)

    def _layout(self):
        T = (self.N + NR - 1) // NR
        nb, ng = self.K // QK, self.K // self.group
        bb = {8: 256, 4: 128, 3: 96, 2: 64}[self.bits]
        sbytes = 0 if self.per_channel else 16 * (1 + self.asym)
        return T, nb, ng, bb, sbytes

    def dequantize(self) -> torch.Tensor:
        """Effective float32 weights [N, K], decoded from the packed bytes (a slice of tiles at a
        time: the integer temporaries stay a few MB even for an embedding)."""
        T = (self.N + NR - 1) // NR
        out = torch.empty(self.N, self.K)
        step = max(1, PACK_CHUNK_BYTES // max(self.K, 1) // NR)
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            out[t0 * NR:min(t1 * NR, self.N)] = self._dequant_tiles(t0, t1)
        return out

    def _dequant_tiles(self, t0: int, t1: int) -> torch.Tensor:
        """Rows [8 t0, min(8 t1, N)) in float32."""
        _, nb, ng, bb, sb = self._layout()
        T = t1 - t0
        n = min(t1 * NR, self.N) - t0 * NR
        d = self.data.view(-1, ng, self.data.numel() // ((self.N + NR - 1) // NR) // ng)[t0:t1]
        blocks = d[:, :, sb:].reshape(T, nb, bb)
        if self.bits == 8:
            c = blocks.view(T, nb, 8, 32).view(torch.int8).to(torch.int32)
        elif self.bits == 4:
            v = blocks.view(T, nb, 4, 32)
            c = torch.cat([v & 15, v >> 4], 2).to(torch.int32)
        elif self.bits == 3:
            v = blocks.reshape(T, nb, 3, 32).to(torch.int32)
            q6 = (((v >> 3) & 1) << self._V3.to(torch.int32)).sum(2, keepdim=True)
            q7 = (((v >> 7) & 1) << self._V3.to(torch.int32)).sum(2, keepdim=True)
            c = torch.cat([torch.stack([v & 7, (v >> 4) & 7], 3).reshape(T, nb, 6, 32), q6, q7], 2)
        else:
            v = blocks[:, :, :64].reshape(T, nb, 2, 32)
            c = torch.cat([v & 3, (v >> 2) & 3, (v >> 4) & 3, v >> 6], 2).to(torch.int32)
        # [T, nb, j, r, t] -> [T, r, nb, j, t] -> [rows, K]
        codes = c.view(T, nb, 8, NR, 4).permute(0, 3, 1, 2, 4).reshape(T * NR, self.K)
        codes = codes[:n].to(torch.float32)
        if self.per_channel:
            return codes * self.chan_scale[t0 * NR:t0 * NR + n, None]

        def scales(off):
            s = d[:, :, off:off + 16].contiguous().view(torch.float16).to(torch.float32)
            return s.permute(0, 2, 1).reshape(T * NR, ng)[:n].repeat_interleave(self.group, 1)

        s = scales(0)
        if self.asym:
            return codes * s + scales(16)
        if self.bits == 8:
            return codes * s
        return (codes - float(1 << (self.bits - 1))) * s

    def __repr__(self):
        kind = f"int{self.bits}" + ("-perchannel" if self.per_channel else f"-g{self.group}")
        kind += "-asym" if self.asym else ""
        return f"PackedInt({kind}, N={self.N}, K={self.K}, {self.nbytes} bytes)"


class PackedCodebook(PackedWeight):
    """4-bit indices into a per-row 16-entry table (NF4, k-means), optional group scale.

    The kernel looks the table up as int16 (per-row scale, |entry| max -> 32767) with the
    table scale folded into a float32 group scale; dequantize() returns those effective
    weights (relative difference to the float table <= 2**-16)."""

    def __init__(self, fmt: CodebookWeight):
        idx, cb = fmt.idx, fmt.codebook.to(torch.float32)
        N, K = idx.shape
        group = fmt.group_size if fmt.scale is not None else K
        if group % QK or K % group:
            raise ValueError(f"K={K} must be a multiple of the group size {group} (a multiple of 32)")
        self.N, self.K, self.group = N, K, group
        T = (N + NR - 1) // NR
        Np, nb, ng = T * NR, K // QK, K // group
        dev = idx.device
        cmax = cb.abs().amax(dim=1)
        cs = torch.where(cmax > 0, cmax / 32767.0, torch.ones_like(cmax))
        c16 = torch.round(cb / cs[:, None]).clamp(-32767, 32767).to(torch.int16)
        s = fmt.scale.to(torch.float32) if fmt.scale is not None else torch.ones(N, 1, device=dev)
        sc = s * cs[:, None]  # effective group scale (one f32 rounding)
        tab = _pad_rows(c16, Np).contiguous().view(torch.uint8).view(Np, 16, 2)
        tab = torch.cat([tab[:, :, 0], tab[:, :, 1]], 1).reshape(T, NR * 32)  # low bytes, high bytes
        ix = _pad_rows(idx.to(torch.uint8), Np).view(Np, nb, 2, 16)
        ix = (ix[:, :, 0] | (ix[:, :, 1] << 4)).view(T, NR, nb, 16).permute(0, 2, 1, 3)
        ix = ix.reshape(T, ng, -1)
        scb = _tile_scales(_pad_rows(sc, Np), T, ng, torch.float32)
        body = torch.cat([scb, ix], 2).reshape(T, -1)
        self.data = torch.cat([tab, body], 1).reshape(-1).contiguous()
        self._attach()

    def _make_desc(self):
        return _native.K.make_codebook(self.data.data_ptr(), self.N, self.K, self.group)

    def dequantize(self) -> torch.Tensor:
        T = (self.N + NR - 1) // NR
        nb, ng = self.K // QK, self.K // self.group
        d = self.data.view(T, -1)
        tab = d[:, :256].reshape(T * NR, 2, 16).permute(0, 2, 1).contiguous().view(torch.int16)
        tab = tab.view(T * NR, 16).to(torch.float32)
        body = d[:, 256:].reshape(T, ng, -1)
        sc = body[:, :, :32].contiguous().view(torch.float32).permute(0, 2, 1).reshape(T * NR, ng)
        ix = body[:, :, 32:].reshape(T, nb, NR, 16).permute(0, 2, 1, 3).reshape(T * NR, nb, 16)
        idx = torch.stack([ix & 15, ix >> 4], 2).reshape(T * NR, self.K).long()
        w = torch.gather(tab, 1, idx) * sc.repeat_interleave(self.group, 1)
        return w[: self.N]

    def __repr__(self):
        return f"PackedCodebook(g{self.group}, N={self.N}, K={self.K}, {self.nbytes} bytes)"


class PackedF32(PackedWeight):
    """Plain float32 weight [N, K] run by the native fp32 kernel (no repacking)."""

    def __init__(self, w: torch.Tensor):
        self.data = w.detach().to(torch.float32).contiguous()
        self.N, self.K = self.data.shape
        self._attach()

    def _make_desc(self):
        return _native.K.make_f32(self.data.data_ptr(), self.N, self.K)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * 4

    def dequantize(self) -> torch.Tensor:
        return self.data

    def __repr__(self):
        return f"PackedF32(N={self.N}, K={self.K})"


def can_concat_rows(parts: list[PackedWeight]) -> bool:
    """Same packed kind and layout, and every part but the last a whole number of 8-row tiles."""
    a = parts[0]
    if hasattr(type(a), "can_join_rows"):  # a weight that joins itself (kernels/lowrank.py PackedLowRank)
        return type(a).can_join_rows(parts)
    if any(p.N % NR for p in parts[:-1]) or any(type(p) is not type(a) or p.K != a.K for p in parts):
        return False
    if isinstance(a, PackedInt):
        return all((p.bits, p.asym, p.per_channel, p.group) == (a.bits, a.asym, a.per_channel, a.group)
                   for p in parts)
    if isinstance(a, PackedCodebook):
        return all(p.group == a.group for p in parts)
    return isinstance(a, PackedF32)


def concat_rows(parts: list[PackedWeight], arena=None) -> PackedWeight:
    """One packed weight with the rows of `parts` stacked (can_concat_rows must hold); each part's
    buffers become views of the joined ones (no memory is duplicated, and the parts keep working
    on their own). The joined bytes are carved from `arena` (a memory.HugePageArena) when given."""
    a = parts[0]
    if hasattr(type(a), "join_rows"):
        return type(a).join_rows(parts, arena)
    joined = object.__new__(type(a))
    joined.__dict__.update({k: v for k, v in a.__dict__.items() if k not in ("_desc", "_addr", "_dense_cache")})
    joined.N = sum(p.N for p in parts)
    datas = [p.data for p in parts]
    out = None
    if arena is not None:
        out = arena.empty((sum(d.shape[0] for d in datas),) + tuple(datas[0].shape[1:]), datas[0].dtype)
    joined.data = torch.cat(datas, 0, out=out)
    cs = getattr(a, "chan_scale", None)
    if cs is not None:
        joined.chan_scale = torch.cat([p.chan_scale for p in parts], 0)
    joined._attach()
    off = coff = 0
    for p in parts:
        n = p.data.shape[0]
        p.data = joined.data[off:off + n]
        off += n
        if cs is not None:
            m = p.chan_scale.shape[0]
            p.chan_scale = joined.chan_scale[coff:coff + m]
            coff += m
        p._attach()
    return joined


def pack(fmt) -> PackedWeight:
    """Repacks a weight format (or a float tensor) for the native kernels."""
    if isinstance(fmt, PackedWeight):
        return fmt
    if hasattr(fmt, "packed_with"):  # a format that packs itself (kernels/lowrank.py LowRankWeight)
        return fmt.packed_with(pack)
    if isinstance(fmt, (Int8Weight, IntWeight)):
        return PackedInt(fmt)
    if isinstance(fmt, CodebookWeight):
        return PackedCodebook(fmt)
    if isinstance(fmt, torch.Tensor):
        return PackedF32(fmt)
    raise TypeError(f"cannot pack {type(fmt).__name__}")
