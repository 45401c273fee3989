"""Mixed precision: bits per linear from {2, 3, 4, 8} under a bits-per-weight budget.

Sensitivity of linear l at b bits: the expected loss increase per token, to second order with a
diagonal (empirical) Fisher on the linear's outputs,
    S_l(b) = 1/4 sum_j F_j diag((W - Q_b(W)) H (W - Q_b(W))^T)_j,
F_j = mean over calibration tokens of (d NLL / d y_j)^2 (one backward pass of the full-precision
model), H = 2/n X^T X of the linear's inputs (a layer-by-layer forward pass), Q_b the recipe's
quantizer (GPTQ or RTN) at b bits. Allocation: start every linear at the narrowest width, then
repeatedly take the upgrade (to any larger width) with the largest sensitivity drop per extra bit
that still fits the budget (greedy on the error/size trade-off). 2 bits is a choice only when the
budget cannot hold every linear at 3 bits: the second-order estimate holds for small errors and
badly underestimates 2-bit ones, whose errors compound through the layers (on SmolLM2-135M at 3.25
bits/weight, allowing 2 bits put 83 of 210 linears there and the KL divergence came out half as
large again as uniform 3-bit's at 3.5).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import JisuError
from ..memory import trim_heap
from ..models.layers import linear_name, linear_names
from . import gptq, rtn
from .observe import CTX, ReferenceNumerics, as_float, compression_model, embed_all, layer_stats

MIN_WIDE_BITS = 3  # narrower widths only when the budget leaves no other way


@dataclass
class Item:
    name: str
    numel: int
    cost: dict      # bits -> stored bits of the whole matrix
    sens: dict      # bits -> sensitivity


def allocate(items: list[Item], budget_bits: float) -> dict[str, int]:
    """name -> chosen width, with sum(cost) <= budget_bits. Each item offers the widths in its
    cost (a group size that does not divide a linear's inputs is no choice for it). Every item
    starts at its narrowest width of at least MIN_WIDE_BITS (at its narrowest width of all when
    those do not fit the budget) and never goes below its start."""
    def start(wide: bool) -> dict:
        out = {}
        for it in items:
            ws = sorted(it.cost)
            wider = [b for b in ws if b >= MIN_WIDE_BITS]
            out[it.name] = wider[0] if wide and wider else ws[0]
        return out

    def total(choice: dict) -> float:
        return sum(it.cost[choice[it.name]] for it in items)

    choice = start(True)
    if total(choice) > budget_bits + 1e-6:
        choice = start(False)
        if total(choice) > budget_bits + 1e-6:
            n = sum(i.numel for i in items)
            raise JisuError(f"mixed: budget of {budget_bits / n:.3f} bits/weight is below the "
                            f"smallest choice ({total(choice) / n:.3f} bits/weight)")
    floor = dict(choice)
    left = budget_bits - total(choice)
    while True:
        best = None
        for it in items:
            b0 = choice[it.name]
            for b, c in it.cost.items():
                extra = c - it.cost[b0]
                if b < floor[it.name] or extra <= 0 or extra > left + 1e-6:
                    continue
                gain = it.sens[b0] - it.sens[b]
                if gain <= 0:
                    continue
                ratio = gain / extra
                if best is None or ratio > best[0]:
                    best = (ratio, it, b, extra)
        if best is None:
            break
        _, it, b, extra = best
        choice[it.name] = b
        left -= extra
    return choice


def sensitivity(F: torch.Tensor, row_err: torch.Tensor) -> float:
    """1/4 sum_j F_j err_j (F, err: [N])."""
    return float((F.double() * row_err.double()).sum() / 4.0)


def fisher(model, ids: torch.Tensor, names: list[str], batch: int = 1, progress: bool = False) -> dict:
    """Mean squared gradient of the summed next-token NLL w.r.t. each named linear's output,
    per output channel: name -> [N] (float64).

    Backpropagation is done a layer at a time: a forward pass without autograd keeps only each
    layer's input hidden states, then the head's gradient flows back through one layer at a time,
    each recomputed from its stored input with autograd on. The gradients are those of one whole
    backward pass; the memory is one layer's activations instead of the whole model's (for a
    135M model at 256 tokens, ~0.5 GB less)."""
    from tqdm import tqdm

    sums = {n: None for n in names}
    count = 0
    wanted = set(names)

    def hook(name, y):
        if name not in wanted:
            return

        def grad_hook(g):
            s = (g.detach().double() ** 2).reshape(-1, g.shape[-1]).sum(0)
            sums[name] = s if sums[name] is None else sums[name] + s
        y.register_hook(grad_hook)

    L = model.cfg.num_layers
    model.numerics.on_output = hook  # fires only on outputs that require grad: the recomputed layers and the head
    try:
        for b0 in tqdm(range(0, ids.shape[0], batch), desc="mixed: fisher", unit="batch", disable=not progress,
                       leave=False):
            tok = ids[b0:b0 + batch]
            inputs = []
            with torch.no_grad():
                x = model.embed(tok)
                for i in range(L):
                    inputs.append(x)
                    x = model.layer(i, x, CTX)
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                logits = model.head(model.final_hidden(x))[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                         tok[:, 1:].reshape(-1), reduction="sum")
                del logits
                loss.backward()
                g = x.grad
                del x, loss
                for i in reversed(range(L)):
                    xi = inputs.pop().detach().requires_grad_(True)
                    y = model.layer(i, xi, CTX)
                    y.backward(g)
                    g = xi.grad
                    del y, xi
            count += tok[:, 1:].numel()
    finally:
        model.numerics.on_output = None
    return {n: (s / count if s is not None else None) for n, s in sums.items()}


def allocate_formats(model, step, ids: torch.Tensor, out, progress: bool, batch: int, fisher_samples: int) -> dict:
    """The METHODS plan of mixed precision: a Fisher pass, every linear's sensitivity at every width
    (its own inputs from a layer-by-layer pass of the full-precision model), the greedy allocation
    -> linear name -> FormatSpec. Notes what it measured in out.info["mixed"]."""
    from tqdm import tqdm

    cfg, w = model.cfg, model.w
    names = linear_names(cfg)
    t0 = time.perf_counter()
    F = fisher(compression_model(cfg, w, ReferenceNumerics(exact=True)), ids[:fisher_samples], names, batch=1,
               progress=progress)
    trim_heap(collect=True)  # the backward pass's temporaries: hundreds of blocks below the mmap threshold
    t_fisher = time.perf_counter() - t0
    choices = step.mixed_choices()
    # widths below MIN_WIDE_BITS are taken only when the budget cannot hold every linear at the
    # narrowest wider choice; otherwise their (GPTQ) errors are not worth computing
    ks = {cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size}  # in-features of the linears
    narrowest_wide = max(min((spec.bits_per_weight(K) for b, spec in choices.items()
                              if b >= MIN_WIDE_BITS and spec.check_k(K)), default=float("inf")) for K in ks)
    if step.bpw >= narrowest_wide:
        choices = {b: spec for b, spec in choices.items() if b >= MIN_WIDE_BITS}
    items = []
    X = embed_all(model, ids, batch)
    with torch.no_grad():
        for i in tqdm(range(cfg.num_layers), desc="mixed: sensitivity", unit="layer", disable=not progress):
            stored = {}
            for group in model.LINEAR_GROUPS:  # this layer in float32 for the pass, packed again afterwards
                for s in group:
                    name = linear_name(i, s)
                    stored[name] = w[name]
                    w[name] = as_float(w[name])
            stats = layer_stats(model, i, X, batch, update=True)
            for shorts in model.LINEAR_GROUPS:
                H = stats[shorts].H
                prep = gptq.prepare(H, step.damp, step.act_order) if step.base == "gptq" else None
                for s in shorts:
                    items.append(_item(linear_name(i, s), w[linear_name(i, s)], H, prep, choices, F))
            w.update(stored)
    total = sum(it.numel for it in items)
    choice = allocate(items, step.bpw * total)
    used = sum(it.cost[choice[it.name]] for it in items)
    counts = {b: sum(1 for c in choice.values() if c == b) for b in choices}
    out.info["mixed"] = {"budget_bpw": step.bpw, "allocated_bpw": used / total,
                         "fisher_samples": int(min(fisher_samples, ids.shape[0])),
                         "fisher_s": t_fisher, "sensitivity_s": time.perf_counter() - t0 - t_fisher,
                         "linears_per_bits": {str(b): c for b, c in counts.items()},
                         "bits": {n: choice[n] for n in names},
                         "sensitivity": {it.name: {str(b): v for b, v in it.sens.items()} for it in items}}
    return {n: choices[choice[n]] for n in names}


def _item(name: str, wt: torch.Tensor, H: torch.Tensor, prep, choices: dict, F: dict) -> Item:
    """One linear's cost and sensitivity at every width whose group fits its inputs."""
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
        sens[b] = sensitivity(fj, row_err)
        cost[b] = spec.bits_per_weight(wt.shape[1]) * wt.numel()
    return Item(name, wt.numel(), cost, sens)
