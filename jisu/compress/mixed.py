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

from dataclasses import dataclass

import torch

from ..errors import JisuError

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


def fisher(runner, ids: torch.Tensor, names: list[str], batch: int = 1, progress: bool = False) -> dict:
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

    L = runner.cfg.num_layers
    runner.hooks = hook  # fires only on outputs that require grad: the recomputed layers and the head
    try:
        for b0 in tqdm(range(0, ids.shape[0], batch), desc="mixed: fisher", unit="batch", disable=not progress,
                       leave=False):
            tok = ids[b0:b0 + batch]
            inputs = []
            with torch.no_grad():
                x = runner.embed(tok)
                for i in range(L):
                    inputs.append(x)
                    x = runner.layer(i, x)
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                logits = runner.head(runner.final_hidden(x))[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                         tok[:, 1:].reshape(-1), reduction="sum")
                del logits
                loss.backward()
                g = x.grad
                del x, loss
                for i in reversed(range(L)):
                    xi = inputs.pop().detach().requires_grad_(True)
                    y = runner.layer(i, xi)
                    y.backward(g)
                    g = xi.grad
                    del y, xi
            count += tok[:, 1:].numel()
    finally:
        runner.hooks = None
    return {n: (s / count if s is not None else None) for n, s in sums.items()}
