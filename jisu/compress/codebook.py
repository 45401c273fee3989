"""4-bit codebook formats: NF4 (fixed normal-float table, absmax group scale) and per-row k-means
tables. Scales and table entries are rounded to float16 before the indices are chosen, so the
artifact stores them in float16 without changing a single weight. GPTQ compensation for these
formats lives in jisu.compress.gptq (nearest-entry rounding with the same tables and scales)."""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.formats import NF4_TABLE, CodebookWeight
from .spec import FormatSpec


def f16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def nearest(x: torch.Tensor, cb: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Index of the nearest entry of each row's table: x [N, K], cb [N, E] -> long [N, K]."""
    out = torch.empty(x.shape, dtype=torch.long)
    for i in range(0, x.shape[0], rows):
        out[i:i + rows] = (x[i:i + rows, :, None] - cb[i:i + rows, None, :]).abs().argmin(dim=2)
    return out


def group_scales(w: torch.Tensor, group_size: Optional[int]) -> Optional[torch.Tensor]:
    """float16-rounded absmax per group [N, K // g] (1 where a group is all zeros), or None."""
    if group_size is None:
        return None
    N, K = w.shape
    s = f16(w.view(N, K // group_size, group_size).abs().amax(dim=2))
    return torch.where(s > 0, s, torch.ones_like(s))


def normalized(w: torch.Tensor, s: Optional[torch.Tensor], group_size: Optional[int]) -> torch.Tensor:
    return w if s is None else w / s.repeat_interleave(group_size, dim=1)


def kmeans_table(x: torch.Tensor, iters: int = 10, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A 16-entry table per row by Lloyd iterations from the quantiles (optionally weighted per
    column, e.g. by diag(H)); float16-rounded. x [N, K] -> [N, 16]."""
    qs = torch.linspace(0, 1, 16)
    cb = torch.quantile(x, qs, dim=1).T.contiguous()
    wt = torch.ones_like(x) if weight is None else weight.expand_as(x)
    for _ in range(iters):
        idx = nearest(x, cb)
        sums = torch.zeros_like(cb).scatter_add_(1, idx, x * wt)
        cnt = torch.zeros_like(cb).scatter_add_(1, idx, wt)
        cb = torch.where(cnt > 0, sums / cnt.clamp_min(1e-30), cb)
    return f16(cb)


def tables(w: torch.Tensor, spec: FormatSpec, weight: Optional[torch.Tensor] = None):
    """(table [N, 16], scales [N, K//g] or None) for `w` in a codebook format."""
    s = group_scales(w, spec.group_size)
    if spec.kind == "nf4":
        return NF4_TABLE.expand(w.shape[0], 16).contiguous(), s
    return kmeans_table(normalized(w, s, spec.group_size), weight=weight), s


def quantize(w: torch.Tensor, spec: FormatSpec, weight: Optional[torch.Tensor] = None) -> CodebookWeight:
    """Nearest-entry rounding (`weight`: optional per-column importance for the k-means fit)."""
    w = w.detach().to(torch.float32)
    cb, s = tables(w, spec, weight)
    idx = nearest(normalized(w, s, spec.group_size), cb).to(torch.uint8)
    return CodebookWeight(idx, cb, s, spec.group_size if s is not None else None)
