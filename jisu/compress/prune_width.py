"""Width pruning: MLP channels and attention heads ranked by activation magnitude on calibration
text (Minitron: mean over the sequence, L2 over the batch), removed, and the next linear (down_proj /
o_proj) refit by least squares to the unpruned model's hidden states (FLAP / SliceGPT)."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..config import ModelConfig
from ..models import model_form
from .observe import CTX, batches, compression_model
from .steps import StepContext

GROUP = 32      # pruned MLP widths are multiples of this (every quantization group up to 32 divides them)
DAMP = 1e-3     # ridge term of the refit, relative to the mean diagonal of A^T A
# the refit runs only on at least this many calibration tokens per input it fits (fewer: the least
# squares overfit the calibration text; 1k tokens for 1024 kept channels raised the held-out KLD)
TOKENS_PER_INPUT = 4
BATCH = 4


def reference_model(cfg: ModelConfig, weights: dict):
    """The model as it stands, in float32 reference numerics, over a new dict of the same tensors."""
    return compression_model(cfg, model_form(cfg, dict(weights)))


def shaped_config(cfg: ModelConfig, widths: list[int], heads: list[tuple[int, int]]) -> ModelConfig:
    """cfg with these per-layer MLP widths and (query, KV) head counts; uniform ones stored as the
    plain fields, different ones as the per-layer tuples (the plain fields then hold the largest)."""
    uni_w, uni_h = len(set(widths)) == 1, len(set(heads)) == 1
    return replace(cfg, intermediate_size=max(widths), num_heads=max(q for q, _ in heads),
                   num_kv_heads=max(k for _, k in heads), intermediate_sizes=() if uni_w else tuple(widths),
                   layer_heads=() if uni_h else tuple(heads))


class LayerRefit:
    """Statistics of a linear's input A [.., k] against a target output Y [.., E] over calibration
    batches: channel importance (mean |a| over the sequence, L2 over the sequences), and with
    `fit` A^T A and A^T Y for the least-squares weight of a subset of the input channels."""

    def __init__(self, k: int, fit: bool = True, head_dim: int = 1):
        self.k, self.fit, self.d = k, fit, head_dim
        self.imp = torch.zeros(k // head_dim, dtype=torch.float64)
        self.H: Optional[torch.Tensor] = None
        self.C: Optional[torch.Tensor] = None
        self.yy, self.n = 0.0, 0

    def add(self, A: torch.Tensor, Y: Optional[torch.Tensor] = None) -> None:
        b, t, _ = A.shape
        a = A.reshape(b, t, self.k // self.d, self.d).norm(dim=-1) if self.d > 1 else A.abs()
        self.imp += a.mean(1).double().pow(2).sum(0)
        self.n += b * t
        if self.fit:
            A2, Y2 = A.reshape(-1, self.k).double(), Y.reshape(b * t, -1).double()
            self.H = A2.T @ A2 if self.H is None else self.H.addmm_(A2.T, A2)
            self.C = A2.T @ Y2 if self.C is None else self.C.addmm_(A2.T, Y2)
            self.yy += float(Y2.pow(2).sum())

    def enough(self, inputs: int) -> bool:
        """Whether the tokens seen determine a refit of this many inputs."""
        return self.fit and self.n >= TOKENS_PER_INPUT * inputs

    @property
    def importance(self) -> torch.Tensor:
        return self.imp.sqrt()

    def _cols(self, keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if keep is None or self.d == 1:
            return keep
        return (keep[:, None] * self.d + torch.arange(self.d)).reshape(-1)

    def solve(self, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight [E, |keep|] on the kept input channels (units of head_dim) minimizing
        |A_keep W^T - Y|^2 + damp."""
        c = self._cols(keep)
        H = self.H if c is None else self.H[c][:, c]
        C = self.C if c is None else self.C[c]
        lam = DAMP * float(H.diagonal().mean()) + 1e-12
        H = H + lam * torch.eye(H.shape[0], dtype=H.dtype)
        return torch.linalg.solve(H, C).T.float().contiguous()

    def error(self, W: torch.Tensor, keep: Optional[torch.Tensor] = None) -> float:
        """|A_keep W^T - Y|^2 / |Y|^2 for a weight W [E, |keep|]."""
        c = self._cols(keep)
        H = self.H if c is None else self.H[c][:, c]
        C = self.C if c is None else self.C[c]
        Wd = W.double()
        err = float((Wd @ H * Wd).sum()) - 2 * float((Wd.T * C).sum()) + self.yy
        return max(err, 0.0) / max(self.yy, 1e-30)

    def errors(self, W_new: torch.Tensor, W_old: torch.Tensor, keep: Optional[torch.Tensor] = None) -> dict:
        return {"err_before": round(self.error(W_old, keep), 6), "err_after": round(self.error(W_new, keep), 6)}


def spread_widths(ref, ids: torch.Tensor, per_layer: int) -> list[int]:
    """MLP widths (multiples of GROUP, at least GROUP) summing to per_layer * layers: the channels
    of largest E[a^2] |down column|^2 / E|x|^2 (their share of the residual stream) over all layers."""
    cfg = ref.cfg
    L = cfg.num_layers
    a2 = [torch.zeros(cfg.mlp_width(i), dtype=torch.float64) for i in range(L)]
    x2 = torch.zeros(L, dtype=torch.float64)
    with torch.no_grad():
        for sl in batches(ids.shape[0], BATCH):
            x = ref.embed(ids[sl])
            for i in range(L):
                m = ref.attn_out(i, x, ref.attn_core(i, ref.attn_in(i, x), CTX))
                a = ref.mlp_core(i, ref.mlp_in(i, m))
                a2[i] += a.reshape(-1, a.shape[-1]).double().pow(2).sum(0)
                x2[i] += m.double().pow(2).sum()
                x = ref.mlp_out(i, m, a)
    scores = [a2[i] * ref.w[ref.names[i]["down"][0]].double().pow(2).sum(0) / x2[i] for i in range(L)]
    flat = torch.cat(scores)
    budget = per_layer * L
    top = torch.topk(flat, budget).indices
    counts = torch.bincount(torch.bucketize(top, torch.cumsum(torch.tensor([len(s) for s in scores]), 0),
                                            right=True), minlength=L).double()
    # round to multiples of GROUP (at least GROUP, at most the layer's width), keeping the total
    units = (counts / GROUP).clamp(min=1)
    caps = torch.tensor([cfg.mlp_width(i) // GROUP for i in range(L)], dtype=torch.float64)
    n = torch.minimum(units.floor(), caps)
    left = budget // GROUP - int(n.sum())
    frac = units - n
    while left > 0:
        frac = torch.where(n < caps, frac, torch.full_like(frac, -1.0))
        j = int(frac.argmax())
        n[j] += 1
        frac[j] -= 1
        left -= 1
    while left < 0:  # the floor of one group per layer took more than the budget: from the largest cuts
        j = int(torch.where(n > 1, units - n, torch.full_like(n, float("inf"))).argmin())
        n[j] -= 1
        left += 1
    return [int(v) * GROUP for v in n]


def _keep_heads(imp: torch.Tensor, q: int, kv: int, new_q: int) -> torch.Tensor:
    """The kept query heads (in order): the new_q / kv most important of each KV group."""
    g, ng = q // kv, new_q // kv
    keep = [grp * g + torch.topk(imp[grp * g:(grp + 1) * g], ng).indices.sort().values for grp in range(kv)]
    return torch.cat(keep)


def prune_width(ctx: StepContext, kind: str, value: int, spread: bool, refit: bool) -> dict:
    """Prune every layer's MLP channels (kind "ffn") or query heads ("heads") in order over the
    calibration text, the pruned model (X) and the unpruned one (R) run side by side: the layer's
    kept channels are fitted to R's hidden state after the block, from X's own input."""
    cfg, ids = ctx.cfg, ctx.calib_ids
    ref = reference_model(cfg, ctx.weights)
    L = cfg.num_layers
    widths = [cfg.mlp_width(i) for i in range(L)]
    heads = [cfg.heads(i) for i in range(L)]
    target = spread_widths(ref, ids, value) if kind == "ffn" and spread else None
    stu_w = dict(ref.w)
    stu = compression_model(cfg, stu_w)
    R = torch.cat([ref.embed(ids[sl]) for sl in batches(ids.shape[0], BATCH)])
    X = R.clone()
    layers, D = [], cfg.head_dim
    with torch.no_grad():
        for i in range(L):
            n = ref.names[i]
            q, kv = heads[i]
            cut_heads = kind == "heads" and value < q
            acc = LayerRefit(q * D, refit, D) if cut_heads else None
            Rm = torch.empty_like(R)
            for sl in batches(R.shape[0], BATCH):
                Rm[sl] = ref.attn_out(i, R[sl], ref.attn_core(i, ref.attn_in(i, R[sl]), CTX))
                if acc is not None:
                    acc.add(stu.attn_core(i, stu.attn_in(i, X[sl]), CTX), Rm[sl] - X[sl])
            if acc is not None:
                keep = _keep_heads(acc.importance, q, kv, value)
                rows = (keep[:, None] * D + torch.arange(D)).reshape(-1)
                for name in (n["q"][0], n["q"][1]):
                    if name in stu_w:
                        stu_w[name] = ctx.weights[name] = stu_w[name][rows].contiguous()
                old_o = stu_w[n["o"][0]][:, rows].contiguous()
                new_o = acc.solve(keep) if acc.enough(len(rows)) else old_o
                stu_w[n["o"][0]] = ctx.weights[n["o"][0]] = new_o
                heads[i] = (value, kv)
                stu.cfg = shaped_config(cfg, widths, heads)
                layers.append({"layer": i, "kept": keep.tolist(),
                               **(acc.errors(new_o, old_o, keep) if acc.enough(len(rows)) else {})})
            Xm = torch.empty_like(X)
            for sl in batches(X.shape[0], BATCH):
                Xm[sl] = stu.attn_out(i, X[sl], stu.attn_core(i, stu.attn_in(i, X[sl]), CTX))
            width = target[i] if target is not None else min(value, widths[i])
            cut_ffn = kind == "ffn" and width < widths[i]
            acc = LayerRefit(widths[i], refit) if cut_ffn else None
            for sl in batches(R.shape[0], BATCH):
                R[sl] = ref.mlp_out(i, Rm[sl], ref.mlp_core(i, ref.mlp_in(i, Rm[sl])))
                if acc is not None:
                    acc.add(stu.mlp_core(i, stu.mlp_in(i, Xm[sl])), R[sl] - Xm[sl])
            if acc is not None:
                keep = torch.topk(acc.importance, width).indices.sort().values
                for s in ("gate", "up"):
                    stu_w[n[s][0]] = ctx.weights[n[s][0]] = stu_w[n[s][0]][keep].contiguous()
                old_d = stu_w[n["down"][0]][:, keep].contiguous()
                new_d = acc.solve(keep) if acc.enough(width) else old_d
                stu_w[n["down"][0]] = ctx.weights[n["down"][0]] = new_d
                widths[i] = width
                layers.append({"layer": i, "width": width,
                               **(acc.errors(new_d, old_d, keep) if acc.enough(width) else {})})
            del Rm
            for sl in batches(X.shape[0], BATCH):
                X[sl] = stu.mlp_out(i, Xm[sl], stu.mlp_core(i, stu.mlp_in(i, Xm[sl])))
    ctx.cfg = shaped_config(cfg, widths, heads)
    tokens = ids.shape[0] * ids.shape[1]
    info = {"kind": kind, "refit": refit and any("err_after" in r for r in layers), "layers": layers}
    if refit and not info["refit"]:
        info["refit_skipped"] = f"{tokens} calibration tokens: fewer than {TOKENS_PER_INPUT} per refit input"
    if kind == "ffn":
        info["widths"] = widths
    return info
