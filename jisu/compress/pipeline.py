"""Quantize a whole model, layer by layer.

Methods that need calibration (GPTQ, AWQ, mixed) run the calibration hidden states through
layer i with layers 0..i-1 already quantized, collect each linear's input statistics, quantize
the layer and move on. Within a layer GPTQ goes in order (q/k/v, then o on the outputs of the
quantized q/k/v, gate/up, then down), so every linear sees the errors of those before it.
The source weights may be packed kernel weights (a GGUF's Q4_0/Q4_1/Q8_0 matrices kept as they
are in the file): a layer is decoded to float32 only when its turn comes, and once quantized it
runs packed, as the artifact will. Besides the (packed) model, only the hidden states
[samples, seq_len, hidden], one layer in float32 and that layer's intermediates are held.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from ..config import ModelConfig
from ..errors import JisuError
from ..memory import trim_heap
from . import awq, gptq, mixed, rtn
from .forward import EMBED, HEAD, LINEARS, Runner, as_float, linear_name, linear_names, model_form, source_form
from .recipe import FormatSpec, Recipe


@dataclass
class Quantized:
    """The result: tensors by HF name (a format object or a float tensor, in source form)."""
    cfg: ModelConfig
    tensors: dict
    specs: dict                       # name -> FormatSpec of every quantized tensor
    layers: dict = field(default_factory=dict)   # name -> {"err": ..., "rtn_err": ..., ...}
    info: dict = field(default_factory=dict)
    tied_head: bool = False           # lm_head stored as the same format object as the embedding


def check_model(cfg: ModelConfig, weights: dict, recipe: Recipe) -> None:
    """Every quantized matrix fits its format (group divides K); run before any work."""
    q = recipe.quant
    if q.method == "mixed":  # each linear needs one choice that fits it (the others are skipped for it)
        specs = list(q.mixed_choices().values())
        for n in linear_names(cfg):
            if n not in weights:
                raise JisuError(f"model has no tensor {n}")
            K = weights[n].shape[1]
            if not any(spec.check_k(K) for spec in specs):
                raise JisuError(f"mixed: no choice fits {n} ({K} inputs, not a multiple of any choice's group "
                                f"size); pick other group sizes")
        targets = []
    else:
        targets = [(n, q.fmt) for n in linear_names(cfg)]
    if recipe.embed:
        targets.append((EMBED, recipe.embed))
    if recipe.head:
        targets.append((HEAD if HEAD in weights else EMBED, recipe.head))
    for name, spec in targets:
        if name not in weights:
            raise JisuError(f"model has no tensor {name}")
        K = weights[name].shape[1]
        if not spec.check_k(K):
            raise JisuError(f"format {spec.name}: {name} has {K} inputs, not a multiple of the group size "
                            f"{spec.group_size}; pick another group size")


def _progress(progress: Optional[bool]) -> bool:
    return sys.stderr.isatty() if progress is None else progress


class _Acc:
    """Accumulates X^T X (float32) and, for AWQ, sum |x| of inputs x [..., K]."""

    def __init__(self, stats: bool = False):
        self.xtx = None
        self.abs = None
        self.stats = stats
        self.n = 0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if self.xtx is None:
            self.xtx = torch.zeros(x.shape[1], x.shape[1])
            self.abs = torch.zeros(x.shape[1], dtype=torch.float64)
        self.xtx.addmm_(x.T, x)
        if self.stats:
            self.abs += x.abs().sum(0, dtype=torch.float64)
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        """2/n X^T X (float64), GPTQ's Hessian of the layer reconstruction loss."""
        return self.xtx.double() * (2.0 / self.n)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs / self.n


def _batches(n: int, batch: int):
    for b0 in range(0, n, batch):
        yield slice(b0, min(b0 + batch, n))


def quantize_model(cfg: ModelConfig, weights: dict, recipe: Recipe, calib_ids: Optional[torch.Tensor] = None, *,
                   progress: Optional[bool] = None, batch: int = 8, fisher_samples: int = 8) -> Quantized:
    """Quantize `weights` (source form, float; entries of quantized linears are consumed) by `recipe`."""
    check_model(cfg, weights, recipe)
    progress = _progress(progress)
    q = recipe.quant
    t0 = time.perf_counter()
    head_src = HEAD if (HEAD in weights and not cfg.tie_embeddings) else EMBED
    out = Quantized(cfg, {}, {})
    if recipe.needs_calibration and calib_ids is None:
        raise JisuError(f"recipe {recipe.text!r} needs calibration data")
    targets = None
    if recipe.tune:  # the source's next-token distribution, before its weights are consumed
        from . import tune

        targets = tune.teacher_targets(cfg, weights, calib_ids, progress=progress)

    if q.method == "rtn":
        _rtn_all(cfg, weights, q.fmt, out, progress)
        head_h = None
    else:
        w = model_form(cfg, weights)
        runner = Runner(cfg, w)
        specs = {n: q.fmt for n in linear_names(cfg)}
        if q.method == "mixed":
            specs = _mixed_allocation(cfg, weights, w, runner, q, calib_ids, out, progress, batch, fisher_samples)
        head_h = _sequential(cfg, weights, w, runner, recipe, specs, calib_ids, out, progress, batch)
        del w, runner

    # embedding / LM head (only when the recipe asks)
    # a tied model whose embedding and head take one format keeps one tensor for both (the head's,
    # GPTQ-compensated when calibrated: its rows stay close to the embedding's, and the file holds
    # the table once, as the source did)
    tie_same = (recipe.embed is not None and recipe.head is not None and head_src == EMBED
                and recipe.embed == recipe.head)
    if recipe.head is not None:
        if head_h is not None:  # GPTQ updates the head's columns in a transposed copy it may overwrite
            wt = _transposed_float(weights[head_src])
            fmt, _ = gptq.gptq_quantize(wt.T, head_h, recipe.head, damp=q.damp, act_order=q.act_order,
                                        overwrite=True)
            del wt
        else:
            fmt = rtn.quantize(as_float(weights[head_src]), recipe.head)
        out.tensors[HEAD] = fmt
        out.specs[HEAD] = recipe.head
    if recipe.embed is not None:
        out.tensors[EMBED] = out.tensors[HEAD] if tie_same else rtn.quantize(as_float(weights[EMBED]), recipe.embed)
        out.specs[EMBED] = recipe.embed
        out.tied_head = tie_same
    if recipe.head is not None and head_src == EMBED:
        out.cfg = replace(cfg, tie_embeddings=False)  # the head is its own (quantized) tensor now
    # every other tensor as in the source
    for name, t in weights.items():
        if name not in out.tensors and not (name == HEAD and cfg.tie_embeddings):
            out.tensors[name] = t
    for name in list(out.tensors):
        if name in out.info.get("changed", {}):
            out.tensors[name] = out.info["changed"][name]
    out.info.pop("changed", None)
    if targets is not None:
        out.info["tune"] = tune.tune(out, targets, calib_ids, recipe.tune, progress=progress)
    out.info["quantize_s"] = time.perf_counter() - t0
    return out


def _transposed_float(t) -> torch.Tensor:
    """The float32 [K, N] transpose of a weight [N, K]; a large packed matrix (an LM head) is decoded
    into it a block of rows at a time, so its float32 values are never held twice."""
    from .forward import _row_blocks

    blocks = None if isinstance(t, torch.Tensor) else _row_blocks(t)
    if blocks is None:
        return as_float(t).T.to(torch.float32).contiguous()
    wt = torch.empty(t.K, t.N)
    for r0, r1, rows in blocks:
        wt[:, r0:r1] = rows.T
    return wt


def _rtn_all(cfg, weights, spec, out, progress):
    from tqdm import tqdm

    for i in tqdm(range(cfg.num_layers), desc=f"rtn {spec.name}", unit="layer", disable=not progress):
        for s in LINEARS:
            name = linear_name(i, s)
            out.tensors[name] = rtn.quantize(as_float(weights.pop(name)), spec)
            out.specs[name] = spec


def _embed_all(runner, ids, batch):
    T = ids.shape[1]
    X = torch.empty(ids.shape[0], T, runner.cfg.hidden_size)
    with torch.no_grad():
        for sl in _batches(ids.shape[0], batch):
            X[sl] = runner.embed(ids[sl])
    return X


def _sequential(cfg, weights, w, runner, recipe, specs, ids, out, progress, batch):
    """GPTQ / AWQ / mixed (GPTQ or RTN base) over the layers; returns the LM head's H (or None)."""
    from tqdm import tqdm

    q = recipe.quant
    method = q.method if q.method != "mixed" else q.base
    X = _embed_all(runner, ids, batch)
    changed = out.info.setdefault("changed", {})
    desc = f"{q.method} {q.fmt.name if q.fmt else f'bpw={q.bpw}'}"
    with torch.no_grad():
        for i in tqdm(range(cfg.num_layers), desc=desc, unit="layer", disable=not progress):
            for s in LINEARS:  # this layer in float32 (the source may be packed)
                w[linear_name(i, s)] = as_float(w[linear_name(i, s)])
            if method == "awq":
                _awq_layer(cfg, weights, w, runner, i, X, specs, out, changed, batch)
            else:
                _gptq_layer(cfg, weights, w, runner, i, X, specs, out, batch, method, q)
        if recipe.head is None or method not in ("gptq",):
            return None
        acc = _Acc()
        for sl in _batches(X.shape[0], batch):
            acc(runner.final_hidden(X[sl]))
        return acc.H


def _record(out, name, spec, fmt, w_fp, H, extra=None):
    """Store the format and note its layer error next to plain RTN's on the same inputs; returns
    the weight to run the rest of the calibration with (packed, as the artifact will run it)."""
    from ..io.artifact import _runtime

    err = float(gptq.layer_error(w_fp, fmt.dequantize(), H).sum())
    rtn_err = float(gptq.layer_error(w_fp, rtn.quantize(w_fp, spec).dequantize(), H).sum())
    out.tensors[name] = fmt
    out.specs[name] = spec
    out.layers[name] = {"format": spec.name, "err": err, "rtn_err": rtn_err, **(extra or {})}
    return _runtime(fmt)


def _quantize_group(cfg, weights, w, i, shorts, H, specs, out, method, q):
    """Quantize the linears `shorts` of layer i that share the input statistics H."""
    prep = gptq.prepare(H, q.damp, q.act_order) if method == "gptq" else None
    for s in shorts:
        name = linear_name(i, s)
        spec = specs[name]
        w_fp = w[name]
        if method == "gptq":
            fmt, _ = gptq.gptq_quantize(w_fp, prep, spec)
        else:
            fmt = rtn.quantize(w_fp, spec)
        w[name] = _record(out, name, spec, fmt, w_fp, H)
        weights.pop(name, None)


def _gptq_layer(cfg, weights, w, runner, i, X, specs, out, batch, method, q):
    n = X.shape[0]
    # q, k, v on the normed input
    acc = _Acc()
    for sl in _batches(n, batch):
        acc(runner.attn_in(i, X[sl]))
    _quantize_group(cfg, weights, w, i, ("q", "k", "v"), acc.H, specs, out, method, q)
    # o on the attention output of the quantized q, k, v
    A = torch.empty(n, X.shape[1], cfg.num_heads * cfg.head_dim)
    acc = _Acc()
    for sl in _batches(n, batch):
        A[sl] = runner.attn_core(i, runner.attn_in(i, X[sl]))
        acc(A[sl])
    _quantize_group(cfg, weights, w, i, ("o",), acc.H, specs, out, method, q)
    # gate, up
    acc = _Acc()
    for sl in _batches(n, batch):
        X[sl] = runner.attn_out(i, X[sl], A[sl])
        acc(runner.mlp_in(i, X[sl]))
    del A
    _quantize_group(cfg, weights, w, i, ("gate", "up"), acc.H, specs, out, method, q)
    # down (its input is computed again for the layer's output rather than kept: [n, T, F] floats)
    acc = _Acc()
    for sl in _batches(n, batch):
        acc(runner.mlp_core(i, runner.mlp_in(i, X[sl])))
    _quantize_group(cfg, weights, w, i, ("down",), acc.H, specs, out, method, q)
    for sl in _batches(n, batch):
        X[sl] = runner.mlp_out(i, X[sl], runner.mlp_core(i, runner.mlp_in(i, X[sl])))


def _awq_layer(cfg, weights, w, runner, i, X, specs, out, changed, batch):
    """Scales from the full-precision layer (inputs from the quantized layers before it), folded,
    then RTN; the layer's output is recomputed with the quantized weights."""
    from ..io.artifact import _runtime

    n, p = X.shape[0], f"model.layers.{i}."
    acc = {k: _Acc(stats=True) for k in ("qkv", "o", "gu", "down")}
    A = torch.empty(n, X.shape[1], cfg.num_heads * cfg.head_dim)
    for sl in _batches(n, batch):
        h = runner.attn_in(i, X[sl])
        acc["qkv"](h)
        A[sl] = runner.attn_core(i, h)
        acc["o"](A[sl])
        x2 = runner.attn_out(i, X[sl], A[sl])
        h2 = runner.mlp_in(i, x2)
        acc["gu"](h2)
        acc["down"](runner.mlp_core(i, h2))
    del A
    spec = specs[linear_name(i, "q")]
    groups_per_kv = cfg.num_heads // cfg.num_kv_heads
    D = cfg.head_dim

    def kv_reduce(t):  # o input channel (head h, d) shares the scale of v row (h // groups, d)
        return t.view(cfg.num_kv_heads, groups_per_kv, D).mean(1).reshape(-1)

    def kv_expand(s):
        return s.view(cfg.num_kv_heads, 1, D).expand(cfg.num_kv_heads, groups_per_kv, D).reshape(-1)

    mlp_norm = p + ("pre_feedforward_layernorm.weight" if runner.gemma else "post_attention_layernorm.weight")
    plan = [  # (linears scaled, accumulator, what absorbs 1/s, expand)
        (("q", "k", "v"), "qkv", ("norm", p + "input_layernorm.weight"), None),
        (("o",), "o", ("rows", "v"), kv_expand),
        (("gate", "up"), "gu", ("norm", mlp_norm), None),
        (("down",), "down", ("rows", "up"), None),
    ]
    alphas = {}
    for shorts, key, (kind, target), expand in plan:
        stat = acc[key].mean_abs
        if expand is not None:
            stat = kv_reduce(stat.to(torch.float32))
        ws = [w[linear_name(i, s)] for s in shorts]
        s_red, alpha, errs = awq.search_scale(ws, acc[key].H, stat, spec, expand=expand)
        s = expand(s_red) if expand is not None else s_red
        alphas[key] = (alpha, errs[0.0], errs[alpha])
        for sh in shorts:  # W' = W diag(s)
            name = linear_name(i, sh)
            w[name] = w[name] * s[None, :]
        if kind == "norm":
            w[target] = w[target] / s
            changed[target] = source_form(cfg, target, w[target])
        else:  # rows of the preceding linear (and its bias) divided by s
            name = linear_name(i, target)
            w[name] = w[name] / s_red[:, None]
            bias = name[:-len("weight")] + "bias"
            if bias in w:
                w[bias] = w[bias] / s_red
                changed[bias] = w[bias]
    # the scaled model is exact in full precision; quantize every linear with RTN, recording
    # errors against the *scaled* weights on the *scaled* inputs (H' = diag(1/s) H diag(1/s))
    for shorts, key, _, expand in plan:
        for sh in shorts:
            name = linear_name(i, sh)
            fmt = rtn.quantize(w[name], spec)
            alpha, e0, e1 = alphas[key]
            out.tensors[name] = fmt
            out.specs[name] = spec
            out.layers[name] = {"format": spec.name, "alpha": alpha, "group_err": e1, "group_rtn_err": e0}
            w[name] = _runtime(fmt)
            weights.pop(name, None)
    for sl in _batches(n, batch):
        X[sl] = runner.layer(i, X[sl])


def _mixed_allocation(cfg, weights, w, runner, q, ids, out, progress, batch, fisher_samples):
    """Fisher pass, per-linear sensitivities at every width, greedy allocation -> name -> spec."""
    from tqdm import tqdm

    names = linear_names(cfg)
    t0 = time.perf_counter()
    F = mixed.fisher(Runner(cfg, w, exact=True), ids[:fisher_samples], names, batch=1, progress=progress)
    trim_heap(collect=True)  # the backward pass's temporaries: hundreds of blocks below the mmap threshold
    t_fisher = time.perf_counter() - t0
    choices = q.mixed_choices()
    # widths below mixed.MIN_WIDE_BITS are taken only when the budget cannot hold every linear at the
    # narrowest wider choice; otherwise their (GPTQ) errors are not worth computing
    ks = {cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size}  # in-features of the linears
    narrowest_wide = max(min((spec.bits_per_weight(K) for b, spec in choices.items()
                              if b >= mixed.MIN_WIDE_BITS and spec.check_k(K)), default=float("inf")) for K in ks)
    if q.bpw >= narrowest_wide:
        choices = {b: spec for b, spec in choices.items() if b >= mixed.MIN_WIDE_BITS}
    items = []
    X = _embed_all(runner, ids, batch)
    n = X.shape[0]
    with torch.no_grad():
        for i in tqdm(range(cfg.num_layers), desc="mixed: sensitivity", unit="layer", disable=not progress):
            accs = {k: _Acc() for k in ("qkv", "o", "gu", "down")}
            stored = {}
            for s in LINEARS:  # this layer in float32 for the pass, packed again afterwards
                name = linear_name(i, s)
                stored[name] = w[name]
                w[name] = as_float(w[name])
            for sl in _batches(n, batch):
                h = runner.attn_in(i, X[sl])
                accs["qkv"](h)
                a = runner.attn_core(i, h)
                accs["o"](a)
                x2 = runner.attn_out(i, X[sl], a)
                h2 = runner.mlp_in(i, x2)
                accs["gu"](h2)
                d = runner.mlp_core(i, h2)
                accs["down"](d)
                X[sl] = runner.mlp_out(i, x2, d)
            for key, shorts in (("qkv", ("q", "k", "v")), ("o", ("o",)), ("gu", ("gate", "up")), ("down", ("down",))):
                H = accs[key].H
                prep = gptq.prepare(H, q.damp, q.act_order) if q.base == "gptq" else None
                for s in shorts:
                    name = linear_name(i, s)
                    wt = w[name]
                    cost, sens = {}, {}
                    for b, spec in choices.items():
                        if not spec.check_k(wt.shape[1]):
                            continue  # e.g. group 128 on 576 inputs
                        if prep is not None and spec.bits != 8:
                            fmt, _ = gptq.gptq_quantize(wt, prep, spec)
                        else:
                            fmt = rtn.quantize(wt, spec)
                        row_err = gptq.layer_error(wt, fmt.dequantize(), H)
                        fj = F[name] if F[name] is not None else torch.ones(wt.shape[0], dtype=torch.float64)
                        sens[b] = mixed.sensitivity(fj, row_err)
                        cost[b] = spec.bits_per_weight(wt.shape[1]) * wt.numel()
                    items.append(mixed.Item(name, wt.numel(), cost, sens))
            w.update(stored)
    total = sum(it.numel for it in items)
    choice = mixed.allocate(items, q.bpw * total)
    used = sum(it.cost[choice[it.name]] for it in items)
    counts = {b: sum(1 for c in choice.values() if c == b) for b in choices}
    out.info["mixed"] = {"budget_bpw": q.bpw, "allocated_bpw": used / total, "fisher_samples": int(min(fisher_samples, ids.shape[0])),
                         "fisher_s": t_fisher, "sensitivity_s": time.perf_counter() - t0 - t_fisher,
                         "linears_per_bits": {str(b): c for b, c in counts.items()},
                         "bits": {n: choice[n] for n in names},
                         "sensitivity": {it.name: {str(b): v for b, v in it.sens.items()} for it in items}}
    return {n: choices[choice[n]] for n in names}


def runtime_weights(qz: Quantized) -> dict:
    """The weights a model runs with, straight from memory (as jisu.io.artifact loads them)."""
    from ..io.artifact import _runtime

    w = {}
    for name, obj in qz.tensors.items():
        w[name] = obj if isinstance(obj, torch.Tensor) else _runtime(obj)
    if qz.tied_head:
        w[HEAD] = w[EMBED]
    return w


def build_quantized_model(qz: Quantized, native: bool = True):
    """The in-memory quantized model, built as jisu.load builds a loaded one (native=True: with
    the native forward step where supported), without writing an artifact."""
    from ..models import build_model

    model = build_model(qz.cfg, runtime_weights(qz))
    if native:  # the weights joined into the native step's buffers, as jisu.load leaves them
        from ..engine.runner import make_runner

        make_runner(model)
    return model
