"""GPTQ (Frantar et al. 2022): quantize a weight [N, K] column by column, spreading each column's
rounding error over the columns not yet quantized through the inverse Hessian of the layer's
reconstruction loss ||X W^T - X Q^T||^2 (H = 2/n X^T X from calibration inputs of that linear).

- dampening: damp x mean(diag H) added to the diagonal;
- act-order: columns visited by diag(H) descending. Group scales then come from the
  original weights before the permutation ("static groups"), so the format's contiguous groups
  stay valid; without act-order a group's scale/min is computed when the group starts, from the
  current (error-updated) weights;
- Cholesky factor of H^-1, lazy block updates of 128 columns;
- formats: int 2/3/4 sym/asym, int8 (per channel or grouped), NF4 and k-means tables
  (nearest-entry rounding with tables/scales fixed up front, scales from the current weights);
- scale search: each group's scale (and min) is picked among shrunk/stretched absmax candidates
  by the diag(H)-weighted rounding error (as llama.cpp's importance-matrix quantizers do);
- kept zeros: a weight marked by `keep_zeros` (a sparsified matrix) has its zeros fixed: each such
  entry gets the zero code and its whole value goes into the error spread over later columns
  (SparseGPT's joint quantization); unmarked weights are quantized exactly as without the mark.
Pure function of (w, H, spec); returns the format object and the per-row loss estimate.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from torch.utils.weak import WeakIdKeyDictionary

from ..errors import JisuError
from ..kernels.formats import CodebookWeight, Int8Weight
from . import codebook
from .spec import FormatSpec
from .rtn import INT_CLASSES

BLOCK = 128
# scale multipliers tried per group (1.0 = the format's RTN scale)
SCALE_GRID = tuple(round(0.70 + 0.025 * i, 3) for i in range(19))  # 0.70 .. 1.15


_KEEP_ZEROS = WeakIdKeyDictionary()   # weight tensor -> the step that zeroed it (for errors)


def keep_zeros(w: torch.Tensor, by: str) -> None:
    """Mark w (a float weight the quantization step will see as it is): its zeros stay exactly zero."""
    _KEEP_ZEROS[w] = by


def kept_zeros(w) -> Optional[torch.Tensor]:
    """The zeros [N, K] of a weight marked by keep_zeros, else None."""
    return (w == 0) if isinstance(w, torch.Tensor) and w in _KEEP_ZEROS else None


def zero_capable(spec: FormatSpec) -> bool:
    """The format stores an exact 0 in every group whatever its scale (symmetric integer grids)."""
    return spec.kind == "int" and (spec.sym or spec.bits == 8)


def _f16(t):
    return t.to(torch.float16).to(torch.float32)


class _IntGrid:
    """Integer grid of one group: per-row scale s and (asym) min m."""

    def __init__(self, spec: FormatSpec):
        self.spec = spec
        self.bits = spec.bits
        if spec.bits == 8:
            self.lo, self.hi, self.off = -127, 127, 0
        else:
            self.lo, self.hi, self.off = 0, (1 << spec.bits) - 1, (1 << (spec.bits - 1)) if spec.sym else 0

    def candidates(self, wg: torch.Tensor, search: bool):
        """Candidate (scale, min) [C, N] for a group wg [N, g], following formats.quantize_rtn."""
        grid = torch.tensor(SCALE_GRID if search else (1.0,))[:, None]
        if self.bits == 8:
            s = _f16(wg.abs().amax(dim=1)[None] / 127.0 * grid)
            return s, None
        if self.spec.sym:
            idx = wg.abs().argmax(dim=1, keepdim=True)
            vmax = torch.gather(wg, 1, idx).squeeze(1)
            return _f16(vmax[None] / -self.off * grid), None
        lo, hi = wg.amin(dim=1), wg.amax(dim=1)
        mid = (lo + hi) / 2
        lo_c, hi_c = mid + (lo - mid) * grid, mid + (hi - mid) * grid   # shrink around the middle
        return _f16((hi_c - lo_c) / self.hi), _f16(lo_c)

    def round(self, w: torch.Tensor, s: torch.Tensor, m: Optional[torch.Tensor]):
        """codes and dequantized values for w (broadcasting over leading dims)."""
        inv = torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
        if m is None:
            q = (torch.round(w * inv) + self.off).clamp(self.lo, self.hi)
            return q, (q - self.off) * s
        q = torch.round((w - m) * inv).clamp(self.lo, self.hi)
        return q, q * s + m

    def prepared(self, s, m):
        return s, torch.where(s != 0, 1.0 / s, torch.zeros_like(s)), m

    def round_fast(self, w, p):
        s, inv, m = p
        if m is None:
            q = torch.round(w * inv).add_(self.off).clamp_(self.lo, self.hi)
            return q, (q - self.off).mul_(s)
        q = torch.round((w - m).mul_(inv)).clamp_(self.lo, self.hi)
        return q, (q * s).add_(m)

    def params(self, wg: torch.Tensor, h: torch.Tensor, search: bool):
        """Best (scale [N], min [N] or None) for group wg [N, g] under column weights h [g]."""
        s, m = self.candidates(wg, search)
        best_s, best_m = s[0], (None if m is None else m[0])
        if s.shape[0] == 1:
            return best_s, best_m
        best = None
        for c in range(s.shape[0]):  # one candidate at a time: [N, g] temporaries, not [C, N, g]
            _, deq = self.round(wg, s[c, :, None], None if m is None else m[c, :, None])
            err = ((wg - deq) ** 2 * h).sum(-1)             # [N]
            if best is None:
                best = err
                continue
            better = err < best                               # ties keep the earlier candidate
            best = torch.where(better, err, best)
            best_s = torch.where(better, s[c], best_s)
            if m is not None:
                best_m = torch.where(better, m[c], best_m)
        return best_s, best_m


class _CodebookGrid:
    def __init__(self, spec: FormatSpec, table: torch.Tensor):
        self.spec, self.table = spec, table                   # [N, 16]

    def prepared(self, s, m):
        return s

    def round_fast(self, w, s):
        q, deq = self.round(w, s)
        return q.to(torch.float32), deq

    def round(self, w: torch.Tensor, s: torch.Tensor, m=None):
        x = w / s
        idx = (x[:, None] - self.table).abs().argmin(dim=1)
        return idx, self.table.gather(1, idx[:, None]).squeeze(1) * s

    def params(self, wg: torch.Tensor, h: torch.Tensor, search: bool):
        if self.spec.group_size is None:  # table fit on the raw weights: no scale
            return torch.ones(wg.shape[0]), None
        s = _f16(wg.abs().amax(dim=1))
        return torch.where(s > 0, s, torch.ones_like(s)), None


def hessian_from(x: torch.Tensor) -> torch.Tensor:
    """2/n X^T X (float64) of inputs x [..., K]; add such terms weighted by their n to combine."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    return (2.0 / x.shape[0]) * (x.T @ x).double()


@dataclass
class Prepared:
    """What GPTQ derives from H alone (shared by linears with the same input, e.g. q/k/v):
    the column order, the upper Cholesky factor of the dampened inverse (in that order), diag(H)
    in the original order and the inputs that never fire."""
    perm: Optional[torch.Tensor]
    U: torch.Tensor
    hdiag: torch.Tensor
    dead: torch.Tensor


def prepare(H: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> Prepared:
    with one_thread():
        H = H.to(torch.float32).clone()  # float32 like the reference implementation (H is dampened)
        K = H.shape[0]
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        hdiag = torch.diag(H).clone()
        perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
        if perm is not None:
            H = H[perm][:, perm]
        eye = torch.eye(K, dtype=torch.float32)
        H += damp * torch.mean(torch.diag(H)) * eye
        for _ in range(3):
            try:
                U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
                break
            except RuntimeError:  # not positive definite even after dampening: dampen more
                H += 0.1 * torch.mean(torch.diag(H)) * eye
        else:
            raise ValueError("gptq: the Hessian is not positive definite even after dampening")
        return Prepared(perm, U.to(torch.float32), hdiag, dead)


def gptq_quantize(w: torch.Tensor, H, spec: FormatSpec, *, damp: float = 0.01, act_order: bool = True,
                  block: int = BLOCK, search: bool = True, overwrite: bool = False,
                  zeros: Optional[torch.Tensor] = None):
    """GPTQ-quantize w [N, K] given H [K, K] (or a `prepare(H)` result) -> (format, per-row loss [N]).
    overwrite: w is a float32 transposed view (w = wt.T, wt contiguous) the caller gives up; the
    column updates then run in its memory instead of a copy (an LM head: 113 MB saved).
    zeros: a bool mask [N, K] of entries stored as exactly 0 (their error spread like any other)."""
    if zeros is not None and not zero_capable(spec):
        raise JisuError(f"gptq {spec.name}: the format has no exact zero to keep the sparse weights' zeros; "
                        f"use a symmetric integer format (wBgG, w8, w8gG)")
    # Hundreds of tiny ops per block and small LAPACK calls: on a shared CPU, thread wake-ups cost
    # more than the math, so this runs on one thread.
    with one_thread():
        prep = H if isinstance(H, Prepared) else prepare(H, damp, act_order)
        return _gptq(w, prep, spec, block, search, overwrite, zeros)


def quantize_group(weights, H, specs, step) -> list:
    """The METHODS interface: linears sharing the input statistics H share one `prepare(H)`."""
    prep = prepare(H, step.damp, step.act_order)
    return [gptq_quantize(w, prep, spec, zeros=kept_zeros(w))[0] for w, spec in zip(weights, specs)]


def _gptq(w, prep: Prepared, spec, block, search, overwrite=False, zeros=None):
    N, K = w.shape
    if prep.U.shape != (K, K):
        raise ValueError(f"gptq: H is {tuple(prep.U.shape)}, weight has K={K}")
    g = spec.group_size or K
    if K % g:
        raise ValueError(f"gptq: K={K} is not a multiple of the group size {g}")
    # the only copy of the weights: transposed ([K, N]), so that a column is a contiguous row
    WT = w.detach().T.to(torch.float32).contiguous()
    if WT.data_ptr() == w.data_ptr() and not overwrite:
        WT = WT.clone()
    WT[prep.dead] = 0.0
    hdiag = prep.hdiag
    ng = K // g
    if spec.kind == "int":
        grid = _IntGrid(spec)
    else:
        table, _ = codebook.tables(WT.T.contiguous(), spec, weight=hdiag[None])
        grid = _CodebookGrid(spec, table)
    scales = torch.zeros(N, ng)
    mins = torch.zeros(N, ng) if (spec.kind == "int" and not spec.sym and spec.bits != 8) else None

    def set_group(j: int, wg: torch.Tensor, h: torch.Tensor):
        s, m = grid.params(wg, h, search)
        scales[:, j] = s
        if mins is not None:
            mins[:, j] = m

    perm = prep.perm
    static = perm is not None or g == K
    if not static and block % g:
        raise ValueError(f"gptq: block {block} is not a multiple of the group size {g}")
    if static:  # every group's parameters from the original weights
        for j in range(ng):
            set_group(j, WT[j * g:(j + 1) * g].T.contiguous(), hdiag[j * g:(j + 1) * g])
    ZT = None if zeros is None else zeros.T.contiguous()
    if perm is not None:
        _permute_rows_(WT, perm.tolist())
        if ZT is not None:
            ZT = ZT[perm]
        group_of = (perm // g).tolist()
    else:
        group_of = [c // g for c in range(K)]
    code_dtype = torch.int8 if (spec.kind == "int" and spec.bits == 8) else torch.uint8
    codes, losses = _columns(WT, prep.U, block, g, group_of, static, set_group, grid, scales, mins, hdiag,
                             code_dtype, ZT)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return _build(spec, codes, scales, mins, grid), losses


def _permute_rows_(A: torch.Tensor, perm: list[int]) -> None:
    """A[i] = A[perm[i]] for every row, in place (cycle by cycle, one row of extra memory)."""
    seen = [False] * len(perm)
    for start in range(len(perm)):
        if seen[start] or perm[start] == start:
            seen[start] = True
            continue
        tmp = A[start].clone()
        i = start
        while True:
            seen[i] = True
            j = perm[i]
            if j == start:
                A[i] = tmp
                break
            A[i] = A[j]
            i = j


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _columns(WT, U, block, g, group_of, static, set_group, grid, scales, mins, hdiag, code_dtype=torch.int16,
             ZT=None):
    """The column loop with lazy block updates over WT [K, N] (the weights transposed, updated in
    place: the caller gives it up); returns (codes [N, K] in WT's row order, losses [N]).
    ZT [K, N] (WT's order): entries given the zero code (a symmetric integer grid's offset)."""
    K, N = WT.shape
    codes = torch.zeros(K, N, dtype=code_dtype)
    losses = torch.zeros(N, dtype=torch.float64)
    have = [static] * (K // g)
    params = [None] * (K // g)  # per group: what round_fast needs (scale, 1/scale, min), made once
    diag = torch.diagonal(U).tolist()
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = WT[i1:i2]  # WT is this function's own copy and these rows are not read after the block
        E1 = torch.zeros_like(W1)
        C1 = codes[i1:i2]
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            j = group_of[col]
            if not have[j]:  # dynamic groups: start of group j, from the error-updated weights
                set_group(j, W1[i:i + g].T, hdiag[col:col + g])
                have[j] = True
            if params[j] is None:
                params[j] = grid.prepared(scales[:, j].contiguous(), None if mins is None else mins[:, j].contiguous())
            w_col = W1[i]
            q, deq = grid.round_fast(w_col, params[j])
            if ZT is not None:
                z = ZT[col]
                q.masked_fill_(z, grid.off)
                deq.masked_fill_(z, 0.0)
            C1[i] = q
            err = (w_col - deq).div_(diag[col])
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
            E1[i] = err
        losses += (E1.double() ** 2).sum(0) / 2
        if i2 < K:
            WT[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)
    return codes.T, losses


def _build(spec: FormatSpec, codes, scales, mins, grid):
    if spec.kind == "int":
        if spec.bits == 8:
            if spec.group_size is None:
                return Int8Weight(codes.to(torch.int8), scales[:, 0].contiguous(), None)
            return Int8Weight(codes.to(torch.int8), scales, spec.group_size)
        return INT_CLASSES[spec.bits](codes.to(torch.uint8), scales, spec.group_size, mins)
    s = scales if spec.group_size is not None else None
    return CodebookWeight(codes.to(torch.uint8), grid.table, s, spec.group_size if s is not None else None)


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row reconstruction error diag((W - Ŵ) H (W - Ŵ)^T) [N] (H as from hessian_from)."""
    E = w.to(torch.float32) - w_hat.to(torch.float32)
    return ((E @ H.to(torch.float32)) * E).sum(1).double()
