"""Low-rank factors on top of a weight: y = W x + A (B x) with A [N, r] and B [r, K] stored as int8,
one float16-rounded scale per row (`Factors`); `LowRankWeight` is the logical format (a base format,
or none, plus its factors), `PackedLowRank` what the models and the native step run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .packed import PackedWeight

_F32 = torch.float32


def _rows_int8(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float16-rounded per-row scales of m [n, k] (absmax / 127)."""
    m = m.to(_F32)
    s = (m.abs().amax(dim=1) / 127.0).to(torch.float16).to(_F32)
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(m / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


@dataclass
class Factors:
    """A [N, r] = a * a_scale[:, None], B [r, K] = b * b_scale[:, None] (int8 codes, float32 scales
    that float16 holds exactly)."""
    a: torch.Tensor         # int8 [N, r]
    a_scale: torch.Tensor   # float32 [N]
    b: torch.Tensor         # int8 [r, K]
    b_scale: torch.Tensor   # float32 [r]

    @property
    def rank(self) -> int:
        return self.b.shape[0]

    @property
    def shape(self) -> tuple:
        return (self.a.shape[0], self.b.shape[1])

    def A(self) -> torch.Tensor:
        return self.a.to(_F32) * self.a_scale[:, None]

    def B(self) -> torch.Tensor:
        return self.b.to(_F32) * self.b_scale[:, None]

    def product(self) -> torch.Tensor:
        return self.A() @ self.B()

    @property
    def nbytes(self) -> int:
        """Stored bytes: int8 codes and float16 scales."""
        return self.a.numel() + self.b.numel() + 2 * (self.a_scale.numel() + self.b_scale.numel())

    @classmethod
    def quantize(cls, A: torch.Tensor, B: torch.Tensor) -> "Factors":
        a, sa = _rows_int8(A)
        b, sb = _rows_int8(B)
        return cls(a, sa, b, sb)


@dataclass
class LowRankWeight:
    """A weight format plus a low-rank term: value = base.dequantize() + A B (base None: A B alone)."""
    base: object
    factors: Factors

    @property
    def shape(self) -> tuple:
        return self.factors.shape

    def dequantize(self) -> torch.Tensor:
        p = self.factors.product()
        return p if self.base is None else self.base.dequantize().to(_F32) + p

    def packed_with(self, pack) -> "PackedLowRank":
        """packed.pack's hook: the base packed by `pack`, the factors as they are."""
        return PackedLowRank.of(self, None if self.base is None else pack(self.base))


class PackedLowRank(PackedWeight):
    """A packed base weight (or none) and the factors of its row segments: rows [n0, n1) of
    segment s add A[n0:n1] (B_s x), B_s = rows [s r, (s + 1) r) of B (one segment, or several once
    q|k|v or gate|up are joined). linear() is the reference path: the base's kernel, then the low
    rank term in float32 torch; the native step runs the same sum fused (cpu/lowrank.cpp)."""

    def __init__(self, base, a, a_scale, b, b_scale, seg_rows: Optional[list] = None):
        if base is not None and not isinstance(base, PackedWeight):
            raise TypeError("PackedLowRank: the base must be a packed weight")
        self.base = base
        self.a, self.a_scale = a.contiguous(), a_scale.to(_F32).contiguous()
        self.b, self.b_scale = b.contiguous(), b_scale.to(_F32).contiguous()
        self.N, self.K = self.a.shape[0], self.b.shape[1]
        self.r = self.a.shape[1]
        self.seg_rows = list(seg_rows) if seg_rows else [self.N]
        if sum(self.seg_rows) != self.N or self.b.shape[0] != self.r * len(self.seg_rows):
            raise ValueError("PackedLowRank: segments do not match the factors")
        if base is not None and (base.N, base.K) != (self.N, self.K):
            raise ValueError(f"PackedLowRank: factors {self.N}x{self.K} on a {base.N}x{base.K} weight")
        self._A = self.a.to(_F32) * self.a_scale[:, None]
        self._B = self.b.to(_F32) * self.b_scale[:, None]
        self._dense_cache = None

    @classmethod
    def can_join_rows(cls, parts: list) -> bool:
        """packed.can_concat_rows' hook (see can_join)."""
        return can_join(parts)

    @classmethod
    def join_rows(cls, parts: list, arena=None) -> "PackedLowRank":
        """packed.concat_rows' hook (see join)."""
        return join(parts, arena)

    @classmethod
    def of(cls, fmt: LowRankWeight, base=None) -> "PackedLowRank":
        f = fmt.factors
        return cls(base, f.a, f.a_scale, f.b, f.b_scale)

    # the packed-weight interface the models and the runners read
    @property
    def shape(self):
        return (self.N, self.K)

    @property
    def rank(self) -> int:
        return self.r

    @property
    def data(self):
        return None if self.base is None else self.base.data

    @property
    def _addr(self) -> int:
        return 0 if self.base is None else self.base._addr

    @property
    def nbytes(self) -> int:
        extra = self.a.numel() + self.b.numel() + 4 * (self.a_scale.numel() + self.b_scale.numel())
        return (0 if self.base is None else self.base.nbytes) + extra

    def segments(self):
        """(n0, n1, u0, u1): rows [n0, n1) read u = B x at [u0, u1)."""
        n0 = 0
        for s, n in enumerate(self.seg_rows):
            yield n0, n0 + n, s * self.r, (s + 1) * self.r
            n0 += n

    def a_tiles(self) -> torch.Tensor:
        """A's codes as the native step reads them (cpu/lowrank.h): per segment, tiles of 8 rows
        (the last one padded with zeros), each [r][8]."""
        if getattr(self, "_tiles", None) is None:
            parts = []
            for n0, n1, _, _ in self.segments():
                t = (n1 - n0 + 7) // 8
                a = torch.zeros(t * 8, self.r, dtype=torch.int8)
                a[:n1 - n0] = self.a[n0:n1]
                parts.append(a.view(t, 8, self.r).transpose(1, 2).contiguous().view(-1))
            self._tiles = torch.cat(parts)
        return self._tiles

    def native_args(self) -> dict:
        """The addresses NativeModel.set_lowrank takes (the tensors stay alive with this object)."""
        return dict(desc=self._addr, b=self.b.data_ptr(), b_scale=self.b_scale.data_ptr(),
                    a=self.a_tiles().data_ptr(), a_scale=self.a_scale.data_ptr(), rank=self.r,
                    seg_rows=list(self.seg_rows))

    def correction(self) -> torch.Tensor:
        """The low-rank term as a dense [N, K] float32 matrix."""
        out = torch.empty(self.N, self.K)
        for n0, n1, u0, u1 in self.segments():
            out[n0:n1] = self._A[n0:n1] @ self._B[u0:u1]
        return out

    def dequantize(self) -> torch.Tensor:
        c = self.correction()
        return c if self.base is None else self.base.dequantize().to(_F32) + c

    def add_lowrank(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y += A (B x) for x [..., K], y [..., N] (float32 torch)."""
        dev = x.device
        u = torch.nn.functional.linear(x.to(_F32), self._B.to(dev))
        for n0, n1, u0, u1 in self.segments():
            y[..., n0:n1] += torch.nn.functional.linear(u[..., u0:u1], self._A[n0:n1].to(dev)).to(y.dtype)
        return y

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.base is None:
            y = x.new_zeros(*x.shape[:-1], self.N)
            if bias is not None:
                y += bias.to(y.dtype)
        else:
            y = self.base.linear(x, bias)
        return self.add_lowrank(x, y)

    __call__ = linear

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self._dense_cache is None:
            self._dense_cache = self.dequantize()
        return self._dense_cache[ids.to(torch.int64)]

    def to(self, device) -> "PackedLowRank":
        if self.base is not None:
            self.base.to(device)
        for n in ("a", "a_scale", "b", "b_scale", "_A", "_B"):
            setattr(self, n, getattr(self, n).to(device))
        return self

    def __repr__(self):
        return f"PackedLowRank({self.base!r}, rank {self.r} x {len(self.seg_rows)}, N={self.N}, K={self.K})"


def can_join(parts: list) -> bool:
    """Low-rank parts whose bases can be joined row-wise and whose ranks agree."""
    from .packed import can_concat_rows

    return (all(isinstance(p, PackedLowRank) and p.base is not None for p in parts)
            and len({p.r for p in parts}) == 1 and can_concat_rows([p.base for p in parts]))


def join(parts: list, arena=None) -> PackedLowRank:
    """One PackedLowRank over the rows of `parts` (can_join holds): the bases joined as
    packed.concat_rows joins them, the factors stacked as segments."""
    from .packed import concat_rows

    base = concat_rows([p.base for p in parts], arena)
    return PackedLowRank(base, torch.cat([p.a for p in parts]), torch.cat([p.a_scale for p in parts]),
                         torch.cat([p.b for p in parts]), torch.cat([p.b_scale for p in parts]),
                         [n for p in parts for n in p.seg_rows])
