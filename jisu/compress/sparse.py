"""Unstructured and N:M sparsity of every decoder linear as recipe steps on the float model:
SparseGPT (`sparsegpt:50%`, `sparsegpt:2:4`) and Wanda (`wanda:50%`, `wanda:4:8`), calibrated layer
by layer in order. Zeros are stored densely; a later quantization step keeps them exactly zero."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import JisuError
from ..models import model_class
from ..models.layers import linear_name
from . import gptq
from .methods import group_layer
from .observe import compression_model, embed_all, model_form
from .steps import transform

BLOCK = 128   # SparseGPT's columns per lazy update (and per unstructured mask choice)


@dataclass(frozen=True)
class Sparsity:
    """Unstructured (`fraction` of each matrix's weights zeroed) or N:M (`n` zeros in every `m`
    consecutive inputs of each output row, along K)."""
    fraction: Optional[float] = None
    n: int = 0
    m: int = 0

    @property
    def nm(self) -> bool:
        return self.m > 0

    @property
    def zeros(self) -> float:
        return self.n / self.m if self.nm else self.fraction

    @property
    def text(self) -> str:
        return f"{self.n}:{self.m}" if self.nm else f"{self.fraction * 100:g}%"


def parse_sparsity(rest: str, fail: Callable) -> Sparsity:
    """'P%' (0 < P < 100) or 'N:M' (0 < N < M) -> Sparsity; fail(problem) -> the error to raise."""
    if rest.endswith("%"):
        try:
            p = float(rest[:-1])
        except ValueError:
            raise fail(f"{rest!r} is not a percentage") from None
        if not 0 < p < 100:
            raise fail(f"sparsity {rest} removes {'nothing' if p <= 0 else 'everything'}; give 0% < P < 100%"
                       if math.isfinite(p) else f"sparsity {rest} is not a finite percentage")
        return Sparsity(fraction=p / 100)
    parts = rest.split(":")
    if len(parts) == 2 and all(x.isdigit() for x in parts):
        n, m = int(parts[0]), int(parts[1])
        if m < 2 or not 0 < n < m:
            raise fail(f"{rest}: N:M needs 0 < N < M (N zeros in every M inputs)")
        return Sparsity(n=n, m=m)
    raise fail(f"{rest!r}: give a percentage (50%) or N:M (2:4)")


# -- masks (True = pruned) ---------------------------------------------------------------------------

def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The n lowest scores of every m consecutive entries of each row of score [N, K]."""
    N, K = score.shape
    s = score.reshape(N, K // m, m)
    idx = torch.sort(s, dim=-1, stable=True).indices[..., :n]
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True).reshape(N, K)


def row_mask(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """The int(K * fraction) lowest scores of each row of score [N, K] (Wanda's comparison group)."""
    k = int(score.shape[1] * fraction)
    idx = torch.sort(score, dim=-1, stable=True).indices[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def _mask(score: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    return nm_mask(score, sp.n, sp.m) if sp.nm else row_mask(score, sp.fraction)


def input_norms(H: torch.Tensor) -> torch.Tensor:
    """||x_j|| over the calibration tokens, up to one common factor, from H = 2/n X^T X."""
    return torch.diagonal(H).to(torch.float32).clamp_min(0).sqrt()


def wanda(w: torch.Tensor, H: torch.Tensor, sp: Sparsity) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda: score |w_ij| * ||x_j||, the lowest per output row (or per N:M group) zeroed."""
    w = w.to(torch.float32)
    mask = _mask(w.abs() * input_norms(H)[None], sp)
    return w.masked_fill(mask, 0.0), mask


def magnitude(w: torch.Tensor, sp: Sparsity) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude pruning (the baseline): the smallest |w| per output row (or per N:M group) zeroed."""
    w = w.to(torch.float32)
    mask = _mask(w.abs(), sp)
    return w.masked_fill(mask, 0.0), mask


def sparsegpt(w: torch.Tensor, H: torch.Tensor, sp: Sparsity, *, damp: float = 0.01,
              block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: GPTQ's column loop (Cholesky factor U of the dampened H^-1, lazy block updates)
    with rounding replaced by pruning. The mask is chosen from w^2 / U_jj^2 on the error-updated
    weights: unstructured, the lowest `fraction` of each block of columns over all rows; N:M, the
    lowest n of each group of m columns, per row, when the group starts. Each pruned weight's
    value goes into the later columns through U. Returns (w', mask) with w' exactly 0 on the mask."""
    N, K = w.shape
    if sp.nm:
        block = max(sp.m, block - block % sp.m)
    with gptq.one_thread():
        prep = gptq.prepare(H, damp, act_order=False)
        U = prep.U
        WT = w.detach().to(torch.float32).T.contiguous()   # a column is a contiguous row
        if WT.data_ptr() == w.data_ptr():
            WT = WT.clone()
        WT[prep.dead] = 0.0
        d = torch.diagonal(U).clone()
        MT = torch.zeros(K, N, dtype=torch.bool)
        for i1 in range(0, K, block):
            i2 = min(i1 + block, K)
            W1, M1, U1, d1 = WT[i1:i2], MT[i1:i2], U[i1:i2, i1:i2], d[i1:i2]
            E1 = torch.zeros_like(W1)
            if not sp.nm:
                score = (W1 / d1[:, None]) ** 2
                k = int(round(score.numel() * sp.fraction))
                M1.view(-1)[torch.topk(score.view(-1), k, largest=False, sorted=False).indices] = True
            for i in range(i2 - i1):
                if sp.nm and i % sp.m == 0:
                    score = (W1[i:i + sp.m] / d1[i:i + sp.m, None]) ** 2        # [m, N]
                    idx = torch.sort(score, dim=0, stable=True).indices[:sp.n]  # [n, N]
                    M1[i:i + sp.m].scatter_(0, idx, True)
                err = W1[i].masked_fill(~M1[i], 0.0).div_(d1[i])
                W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
                E1[i] = err
            W1.masked_fill_(M1, 0.0)        # exactly zero (their own update leaves rounding dust)
            if i2 < K:
                WT[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)
        return WT.T.contiguous(), MT.T.contiguous()


METHODS = {"sparsegpt": sparsegpt, "wanda": wanda}


# -- the layer walk ----------------------------------------------------------------------------------

class _Walk:
    """What methods.group_layer reads of a layer job; `quantize` prunes the group instead."""

    def __init__(self, model, i, X, batch, prune):
        self.model, self.i, self.X, self.batch, self.prune = model, i, X, batch, prune

    def quantize(self, shorts, H) -> None:
        for s in shorts:
            name = linear_name(self.i, s)
            self.model.w[name] = self.prune(name, self.model.w[name], H)


def walk(cfg, weights: dict, calib_ids: torch.Tensor, prune: Callable, batch: int = 8) -> None:
    """Run the calibration through the model layer by layer, and within a layer group by group
    (q/k/v, o, gate/up, down: methods.group_layer's order); `prune(name, w, H)` returns each
    linear's new weight, which the rest of the calibration runs with. weights: float32, HF names
    (its linears are replaced by the results)."""
    w = model_form(cfg, weights)
    model = compression_model(cfg, w)
    with torch.no_grad():
        X = embed_all(model, calib_ids, batch)
        for i in range(cfg.num_layers):
            group_layer(_Walk(model, i, X, batch, prune))
            for s in model.LINEAR_GROUPS:
                for short in s:
                    name = linear_name(i, short)
                    weights[name] = w[name]


def native_problem(cfg) -> Optional[str]:
    """Why the native step cannot run a model of this config (as far as the config tells), or None."""
    from ..config import archs
    from ..engine.native_runner import _ACTIVATION

    if not getattr(archs()[cfg.arch], "NATIVE", False):
        return f"architecture {cfg.arch} has no native step"
    act = next((a for c, a in _ACTIVATION.items() if issubclass(model_class(cfg), c)), None)
    if act is None or cfg.hidden_act != act:
        return f"architecture {cfg.arch} with activation {cfg.hidden_act} is not supported natively"
    if cfg.head_dim % 2:
        return "odd head_dim"
    return None


def widths(cfg) -> dict:
    """Each linear's input width K (layer i, short name) -> K."""
    out = {}
    for i in range(cfg.num_layers):
        heads, _ = cfg.heads(i)
        for s in ("q", "k", "v", "gate", "up"):
            out[(i, s)] = cfg.hidden_size
        out[(i, "o")] = heads * cfg.head_dim
        out[(i, "down")] = cfg.mlp_width(i)
    return out


class _Sparse:
    """P% or N:M of every decoder linear's weights zeroed (embedding and head kept) by `method`."""
    method = ""

    @property
    def form(self) -> str:
        m = self.method
        return f"{m}:P% (0 < P < 100) | {m}:N:M (N zeros in every M inputs, 0 < N < M)"

    def parse(self, rest, fail):
        return parse_sparsity(rest, fail)

    def check(self, sp: Sparsity, cfg) -> None:
        problem = native_problem(cfg)
        if problem:
            raise JisuError(f"{self.method}:{sp.text}: the native step cannot run this model ({problem})")
        if sp.nm:
            for (i, s), K in widths(cfg).items():
                if K % sp.m:
                    raise JisuError(f"{self.method}:{sp.text}: {linear_name(i, s)} has {K} inputs, not a multiple "
                                    f"of M={sp.m}")

    def check_quant(self, sp: Sparsity, quant) -> Optional[str]:
        """The recipe's quantization step must keep the zeros (a format with an exact zero)."""
        if quant.fmt is not None and not gptq.zero_capable(quant.fmt):
            return (f"{self.method}:{sp.text} before {quant.method}:{quant.fmt.name}: that format cannot keep the pruned "
                    f"weights at exactly zero; use a symmetric integer format (wBgG, w8, w8gG)")
        return None

    def apply(self, sp: Sparsity, ctx) -> dict:
        if ctx.calib_ids is None:
            raise JisuError(f"{self.method}:{sp.text} needs calibration data")
        fn = METHODS[self.method]
        err = [0.0]
        counts = [0, 0]

        def prune(name, w, H):
            new, mask = fn(w, H, sp)
            gptq.keep_zeros(new, f"{self.method}:{sp.text}")
            counts[0] += int(mask.sum())
            counts[1] += mask.numel()
            err[0] += float(gptq.layer_error(w, new, H).sum())
            return new

        walk(ctx.cfg, ctx.weights, ctx.calib_ids, prune)
        return {"method": self.method, "pattern": sp.text, "zeros": counts[0] / counts[1], "weights": counts[1],
                "layer_error": err[0]}



@transform("sparsegpt", before=True, after=False, calibrated=True)
class SparseGPTStep(_Sparse):
    method = "sparsegpt"


@transform("wanda", before=True, after=False, calibrated=True)
class WandaStep(_Sparse):
    method = "wanda"
