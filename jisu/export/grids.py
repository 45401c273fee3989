"""llama.cpp's weight grids (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K): fit a matrix's block
parameters (scales, mins; the K-quants' 6-bit sub-scales and fp16 super-scales) up front, round
weights onto that fixed grid, and pack codes + parameters into GGUF block bytes (vectorised)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..compress.gptq import _IntGrid

# type -> (weights per stored scale, lowest code, highest code, code offset, asymmetric, super-block)
SPECS = {
    "Q8_0": (32, -128, 127, 0, False, 32),
    "Q4_0": (32, 0, 15, 8, False, 32),
    "Q5_0": (32, 0, 31, 16, False, 32),
    "Q4_1": (32, 0, 15, 0, True, 32),
    "Q5_1": (32, 0, 31, 0, True, 32),
    "Q4_K": (32, 0, 15, 0, True, 256),
    "Q5_K": (32, 0, 31, 0, True, 256),
    "Q6_K": (16, 0, 63, 32, False, 256),
}
TYPES = tuple(SPECS)
# candidate scale multipliers of one group (1.0: llama.cpp's plain absmax / min-max scale)
MULTS = tuple(round(0.70 + 0.025 * i, 3) for i in range(19))


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def block_size(qtype: str) -> int:
    return SPECS[qtype][5]


@dataclass
class Grid:
    """A matrix's fixed grid: x = (q - off) * scale (+ minv) per group of g weights."""
    qtype: str
    scale: torch.Tensor            # float32 [N, K // g]: the effective scale (as the dequantizer computes it)
    minv: Optional[torch.Tensor]   # float32 [N, K // g]: the additive offset (asym types), else None
    fields: dict                   # what the blocks store (fp16 d / m / dmin, 6-bit or int8 sub-scales)

    @property
    def g(self) -> int:
        return SPECS[self.qtype][0]

    @property
    def lo_hi_off(self):
        _, lo, hi, off, _, _ = SPECS[self.qtype]
        return lo, hi, off

    def rows(self, idx) -> "Grid":
        """The grid of rows idx (a permutation or slice of the outputs)."""
        return Grid(self.qtype, self.scale[idx], None if self.minv is None else self.minv[idx],
                    {k: v[idx] for k, v in self.fields.items()})


def _err(w, deq, h):
    return ((w - deq) ** 2 * h).sum(-1)


def _round(w, s, m, lo, hi, off):
    inv = torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
    if m is None:
        q = (torch.round(w * inv) + off).clamp(lo, hi)
        return q, (q - off) * s
    q = torch.round((w - m) * inv).clamp(lo, hi)
    return q, q * s + m


def _search(wg, h, cands, lo, hi, off):
    """The candidate (s, m) with the least h-weighted rounding error, per group ([N, G] each)."""
    best = best_s = best_m = None
    for s, m in cands:
        _, deq = _round(wg, s[..., None], None if m is None else m[..., None], lo, hi, off)
        e = _err(wg, deq, h)
        if best is None:
            best, best_s, best_m = e, s, m
            continue
        better = e < best
        best = torch.where(better, e, best)
        best_s = torch.where(better, s, best_s)
        if m is not None:
            best_m = torch.where(better, m, best_m)
    return best_s, best_m


def _sym_cands(wg, qtype, lo, off, f16: bool):
    conv = _f16 if f16 else (lambda t: t)
    if qtype == "Q8_0":
        amax = wg.abs().amax(-1)
        return [(conv(amax / 127.0 * k), None) for k in MULTS]
    vmax = torch.gather(wg, -1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return [(conv(vmax / -off * k), None) for k in MULTS]


def _asym_cands(wg, hi, f16: bool, nonpos_min: bool):
    conv = _f16 if f16 else (lambda t: t)
    lo_v, hi_v = wg.amin(-1), wg.amax(-1)
    if nonpos_min:  # K-quants store mins as dmin * m >= 0 subtracted: the offset is <= 0
        lo_v = lo_v.clamp(max=0.0)
    mid = (lo_v + hi_v) / 2
    out = []
    for k in MULTS:
        lo_c, hi_c = mid + (lo_v - mid) * k, mid + (hi_v - mid) * k
        if nonpos_min:
            lo_c = lo_c.clamp(max=0.0)
        out.append((conv((hi_c - lo_c) / hi), conv(lo_c)))
    return out


def fit(qtype: str, w: torch.Tensor, imp: Optional[torch.Tensor] = None) -> Grid:
    """The grid of w [N, K] (K a multiple of the type's block), its parameters chosen by the
    imp-weighted (e.g. diag of the layer's Hessian; None = plain) rounding error. Many passes of
    simple element-wise ops: one thread (thread wake-ups cost more than they save on a shared CPU),
    a slice of rows at a time (they stay in cache)."""
    from ..compress.gptq import one_thread

    N = w.shape[0]
    step = max(1, (1 << 16) // max(1, w.shape[1]))
    with one_thread():
        if N <= step:
            return _fit(qtype, w, imp)
        parts = [_fit(qtype, w[r:r + step], imp) for r in range(0, N, step)]
    return Grid(qtype, torch.cat([p.scale for p in parts]),
                None if parts[0].minv is None else torch.cat([p.minv for p in parts]),
                {k: np.concatenate([p.fields[k] for p in parts]) for k in parts[0].fields})


def _fit(qtype: str, w: torch.Tensor, imp: Optional[torch.Tensor]) -> Grid:
    g, lo, hi, off, asym, sb = SPECS[qtype]
    w = w.detach().to(torch.float32)
    N, K = w.shape
    if K % sb:
        raise ValueError(f"{qtype}: rows of {K} are not a multiple of its block of {sb}")
    h = (imp.to(torch.float32) if imp is not None else torch.ones(K)).clamp_min(1e-12)
    wg, hg = w.view(N, K // g, g), h.view(K // g, g)
    if sb == 32:  # one fp16 scale (and min) per block
        cands = _asym_cands(wg, hi, True, False) if asym else _sym_cands(wg, qtype, lo, off, True)
        s, m = _search(wg, hg, cands, lo, hi, off)
        fields = {"d": s.numpy().astype(np.float16)}
        if asym:
            fields["m"] = m.numpy().astype(np.float16)
        return Grid(qtype, s, m, fields)
    if asym:
        return _fit_k_asym(qtype, wg, hg, lo, hi)
    return _fit_q6_k(wg, hg, lo, hi, off)


def _fit_k_asym(qtype, wg, hg, lo, hi) -> Grid:
    """Q4_K / Q5_K: each 32's (scale, min) by search, then per 256 the fp16 d / dmin and the 6-bit
    sub-scales and sub-mins (each tried one step up and down, by the weighted error)."""
    N, G, g = wg.shape
    s, m = _search(wg, hg, _asym_cands(wg, hi, False, True), lo, hi, 0)
    S = G // 8
    s8, mn8 = s.view(N, S, 8), (-m).view(N, S, 8)
    d = _f16(s8.amax(-1) / 63.0)
    dmin = _f16(mn8.amax(-1) / 63.0)
    dd = torch.where(d > 0, d, torch.ones_like(d))[..., None]
    dm = torch.where(dmin > 0, dmin, torch.ones_like(dmin))[..., None]
    sc0 = torch.where(d[..., None] > 0, torch.round(s8 / dd), torch.zeros_like(s8)).clamp(0, 63)
    mn0 = torch.where(dmin[..., None] > 0, torch.round(mn8 / dm), torch.zeros_like(mn8)).clamp(0, 63)
    cands = []
    for a in (0, -1, 1):
        for b in (0, -1, 1):
            sc, mn = (sc0 + a).clamp(0, 63), (mn0 + b).clamp(0, 63)
            cands.append(((d[..., None] * sc).view(N, G), (-(dmin[..., None] * mn)).view(N, G)))
    s_eff, m_eff = _search(wg, hg, cands, lo, hi, 0)
    sc = torch.where(d[..., None] > 0, torch.round(s_eff.view(N, S, 8) / dd), torch.zeros_like(s8))
    mn = torch.where(dmin[..., None] > 0, torch.round(-m_eff.view(N, S, 8) / dm), torch.zeros_like(s8))
    fields = {"d": d.numpy().astype(np.float16), "dmin": dmin.numpy().astype(np.float16),
              "sc": sc.numpy().astype(np.uint8), "mn": mn.numpy().astype(np.uint8)}
    return Grid(qtype, s_eff, m_eff, fields)


def _fit_q6_k(wg, hg, lo, hi, off) -> Grid:
    """Q6_K: each 16's scale by search, then per 256 an fp16 d and int8 sub-scales (as llama.cpp:
    the largest-magnitude scale maps to -128), each tried one step up and down."""
    N, G, g = wg.shape
    s, _ = _search(wg, hg, _sym_cands(wg, "Q6_K", lo, off, False), lo, hi, off)
    S = G // 16
    s16 = s.view(N, S, 16)
    smax = torch.gather(s16, -1, s16.abs().argmax(-1, keepdim=True)).squeeze(-1)
    d = _f16(smax / -128.0)
    dd = torch.where(d != 0, d, torch.ones_like(d))[..., None]
    sc0 = torch.where(d[..., None] != 0, torch.round(s16 / dd), torch.zeros_like(s16)).clamp(-128, 127)
    cands = [((d[..., None] * (sc0 + a).clamp(-128, 127)).view(N, G), None) for a in (0, -1, 1)]
    s_eff, _ = _search(wg, hg, cands, lo, hi, off)
    sc = torch.where(d[..., None] != 0, torch.round(s_eff.view(N, S, 16) / dd), torch.zeros_like(s16))
    return Grid("Q6_K", s_eff, None, {"d": d.numpy().astype(np.float16), "sc": sc.numpy().astype(np.int8)})


def round_codes(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round-to-nearest of w [N, K] on the fixed grid -> codes (int16 [N, K])."""
    N, K = w.shape
    lo, hi, off = grid.lo_hi_off
    g = grid.g
    from ..compress.gptq import one_thread

    m = None if grid.minv is None else grid.minv[..., None]
    with one_thread():
        q, _ = _round(w.to(torch.float32).reshape(N, K // g, g), grid.scale[..., None], m, lo, hi, off)
        return q.view(N, K).to(torch.int16)


def dequantize(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The float32 weights of codes on the grid (the same float32 operations as gguf.quants)."""
    N, K = codes.shape
    g = grid.g
    _, _, off = grid.lo_hi_off
    q = codes.to(torch.float32).view(N, K // g, g)
    if grid.minv is None:
        return ((q - off) * grid.scale[..., None]).view(N, K)
    return (q * grid.scale[..., None] + grid.minv[..., None]).view(N, K)


class Rounder(_IntGrid):
    """What jisu.compress.gptq's column loop calls to round a column on the fixed grid: gptq's own
    integer grid (its `prepared` / `round_fast`) with this grid's code range and offset."""

    def __init__(self, grid: Grid):
        self.lo, self.hi, self.off = grid.lo_hi_off
        self.asym = grid.minv is not None


# --- packing ----------------------------------------------------------------------------------------

def _nib(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 15) | ((hi & 15) << 4)


def _f16_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(*a.shape, 2)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins [.., 8] -> the 12 bytes of Q4_K / Q5_K."""
    out = np.empty((*sc.shape[:-1], 12), np.uint8)
    out[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = mn[..., 0:4] | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
    return out


def _high_bits(c: np.ndarray) -> np.ndarray:
    """Bit 4 of 32 codes [.., 32] as the little-endian uint32 of Q5_0 / Q5_1 (4 bytes)."""
    bits = ((c >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.ascontiguousarray(bits.sum(-1, dtype=np.uint32)).view(np.uint8).reshape(*c.shape[:-1], 4)


def pack(codes: torch.Tensor, grid: Grid) -> np.ndarray:
    """GGUF block bytes [N, row bytes] of codes [N, K] on grid."""
    N, K = codes.shape
    t, f = grid.qtype, grid.fields
    c = codes.numpy()
    if t == "Q8_0":
        q = c.astype(np.int8).view(np.uint8).reshape(N, K // 32, 32)
        parts = [_f16_bytes(f["d"]), q]
    elif t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        b = c.astype(np.uint8).reshape(N, K // 32, 32)
        parts = [_f16_bytes(f["d"])] + ([_f16_bytes(f["m"])] if "m" in f else [])
        if t.startswith("Q5"):
            parts.append(_high_bits(b))
        parts.append(_nib(b[..., :16], b[..., 16:]))
    elif t in ("Q4_K", "Q5_K"):
        b = c.astype(np.uint8).reshape(N, K // 256, 4, 2, 32)   # chunk of 64: two 32s
        parts = [_f16_bytes(f["d"]), _f16_bytes(f["dmin"]), _pack_k_scales(f["sc"], f["mn"])]
        if t == "Q5_K":
            sub = b.reshape(N, K // 256, 8, 32)
            hb = ((sub >> 4) & 1).astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None]
            parts.append(hb.sum(-2, dtype=np.uint8))
        parts.append(_nib(b[..., 0, :], b[..., 1, :]).reshape(N, K // 256, 128))
    elif t == "Q6_K":
        b = c.astype(np.uint8).reshape(N, K // 256, 2, 128)
        ql = _nib(b[..., :64], b[..., 64:]).reshape(N, K // 256, 128)
        h = ((b >> 4) & 3).reshape(N, K // 256, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[:, None]
        qh = h.sum(-2, dtype=np.uint8).reshape(N, K // 256, 64)
        parts = [ql, qh, f["sc"].astype(np.int8).view(np.uint8), _f16_bytes(f["d"])]
    else:
        raise ValueError(f"no packer for {t}")
    return np.concatenate(parts, axis=-1).reshape(N, -1)
