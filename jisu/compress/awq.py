"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling before round-to-nearest.

For linears sharing one input x [.., K] (q/k/v; gate/up; or a single o / down), a scale
s = mean|x|^alpha (normalized by sqrt(max * min)) multiplies the weight columns, W' = W diag(s), and
1/s is folded into whatever produces x (an RMSNorm weight, or the rows of the preceding linear:
v -> o, up -> down), so the full-precision model is unchanged. alpha is picked on a grid in [0, 1]
by the layer output error of the quantized scaled weights,
    ||X W^T - (X / s) Q(W diag(s))^T||^2 = tr(E H E^T),  E = W - Q(W diag(s)) diag(1/s),
computed from H = X^T X instead of the activations (cheap for many grid points).
alpha = 0 is plain RTN, so on the calibration data AWQ is never worse than RTN.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .gptq import layer_error, one_thread
from .spec import FormatSpec
from .rtn import quantize as rtn_quantize

N_GRID = 20


def act_scale_stat(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of |x| per input channel and the row count (accumulate, then divide)."""
    x = x.reshape(-1, x.shape[-1])
    return x.abs().sum(0).double(), x.shape[0]


def candidate_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_mean.to(torch.float32).clamp(min=1e-4).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def scaled_error(weights: Sequence[torch.Tensor], H: torch.Tensor, spec: FormatSpec, s: torch.Tensor) -> float:
    """Summed output error of RTN-quantizing each W diag(s) and undoing the scale."""
    total = 0.0
    for w in weights:
        q = rtn_quantize(w * s[None, :], spec).dequantize() / s[None, :]
        total += float(layer_error(w, q, H).sum())
    return total


def search_scale(weights: Sequence[torch.Tensor], H: torch.Tensor, act_mean: torch.Tensor, spec: FormatSpec, *,
                 n_grid: int = N_GRID, expand: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """Best per-channel scale for `weights` (all [*, K], same input) -> (s [K'], alpha, errors by alpha).
    `expand` maps a reduced scale (e.g. one per KV-head channel) to the K input channels; the
    statistic `act_mean` is then already reduced to that size."""
    expand = expand or (lambda s: s)
    errors, best = {}, None
    with one_thread():
        for i in range(n_grid + 1):
            alpha = i / n_grid
            s = candidate_scales(act_mean, alpha)
            err = scaled_error(weights, H, spec, expand(s))
            errors[alpha] = err
            if best is None or err < best[0]:
                best = (err, alpha, s)
    return best[2], best[1], errors


def quantize_layer(job) -> None:
    """The METHODS layer step: scales from the full-precision layer (inputs from the quantized
    layers before it), folded into what produces each group's input (the model's
    SCALE_ABSORBERS), then RTN; the layer's output is recomputed with the quantized weights."""
    from ..io.artifact import to_runtime
    from .observe import CTX, batches, layer_stats, source_form

    model, w, i, X = job.model, job.model.w, job.i, job.X
    cfg = model.cfg
    stats = layer_stats(model, i, X, job.batch, abs_sum=True)
    spec = job.specs[job.name("q")]
    groups_per_kv = cfg.num_heads // cfg.num_kv_heads
    D = cfg.head_dim

    def kv_reduce(t):  # o input channel (head h, d) shares the scale of v row (h // groups, d)
        return t.view(cfg.num_kv_heads, groups_per_kv, D).mean(1).reshape(-1)

    def kv_expand(s):
        return s.view(cfg.num_kv_heads, 1, D).expand(cfg.num_kv_heads, groups_per_kv, D).reshape(-1)

    changed = job.out.info.setdefault("changed", {})
    alphas = {}
    for shorts in model.LINEAR_GROUPS:
        kind, target = model.SCALE_ABSORBERS[shorts]
        expand = kv_expand if kind == "rows" and target == "v" else None
        stat = stats[shorts].mean_abs
        if expand is not None:
            stat = kv_reduce(stat.to(torch.float32))
        s_red, alpha, errs = search_scale([w[job.name(s)] for s in shorts], stats[shorts].H, stat, spec,
                                          expand=expand)
        s = expand(s_red) if expand is not None else s_red
        alphas[shorts] = (alpha, errs[0.0], errs[alpha])
        for sh in shorts:  # W' = W diag(s)
            name = job.name(sh)
            w[name] = w[name] * s[None, :]
        if kind == "norm":
            norm = model.names[i][target]
            w[norm] = w[norm] / s
            changed[norm] = source_form(cfg, norm, w[norm])
        else:  # rows of the preceding linear (and its bias) divided by s
            name, bias = model.names[i][target]
            w[name] = w[name] / s_red[:, None]
            if bias in w:
                w[bias] = w[bias] / s_red
                changed[bias] = w[bias]
    # the scaled model is exact in full precision; quantize every linear with RTN, recording
    # errors against the *scaled* weights on the *scaled* inputs (H' = diag(1/s) H diag(1/s))
    for shorts in model.LINEAR_GROUPS:
        for sh in shorts:
            name = job.name(sh)
            fmt = rtn_quantize(w[name], spec)
            alpha, e0, e1 = alphas[shorts]
            job.out.tensors[name] = fmt
            job.out.specs[name] = spec
            job.out.layers[name] = {"format": spec.name, "alpha": alpha, "group_err": e1, "group_rtn_err": e0}
            w[name] = to_runtime(fmt)
            job.weights.pop(name, None)
    for sl in batches(X.shape[0], job.batch):
        X[sl] = model.layer(i, X[sl], CTX)
