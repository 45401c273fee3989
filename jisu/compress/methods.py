"""The quantization methods by recipe name. Each is one small handler: whether it needs
calibration, how it quantizes a group of linears that share one input (`quantize_group`), and
how it walks a decoder layer (`quantize_layer`: group by group, or AWQ's whole-layer scaling).
The pipeline runs the layer loop; jisu.compress.recipe reads `calibrated`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..io.artifact import to_runtime
from ..models.layers import linear_name
from . import awq, gptq, mixed, rtn
from .observe import CTX, Stats, batches


@dataclass
class LayerJob:
    """One decoder layer's turn in the pipeline."""
    model: object            # the compression model over w (model form, edited in place)
    weights: dict            # source-form weights; a quantized linear's entry is consumed
    i: int                   # the layer
    X: torch.Tensor          # calibration hidden states [S, T, hidden]: the layer's input, then its output
    specs: dict              # linear name -> FormatSpec
    step: object             # the recipe's QuantStep
    out: object              # the pipeline's Quantized result, filled in
    batch: int               # calibration sequences per forward call
    quantize_group: Optional[Callable] = None   # the method's group quantizer

    def name(self, short: str) -> str:
        return linear_name(self.i, short)

    def record(self, name, spec, fmt, w_fp, H, extra=None):
        """Store the format and note its layer error next to plain RTN's on the same inputs; returns
        the weight to run the rest of the calibration with (packed, as the artifact will run it)."""
        err = float(gptq.layer_error(w_fp, fmt.dequantize(), H).sum())
        rtn_err = float(gptq.layer_error(w_fp, rtn.quantize(w_fp, spec).dequantize(), H).sum())
        self.out.tensors[name] = fmt
        self.out.specs[name] = spec
        self.out.layers[name] = {"format": spec.name, "err": err, "rtn_err": rtn_err, **(extra or {})}
        return to_runtime(fmt)

    def quantize(self, shorts, H) -> None:
        """Quantize the linears `shorts` of this layer, which share the input statistics H."""
        w = self.model.w
        names = [self.name(s) for s in shorts]
        if all(_factored(self.weights.get(n)) for n in names):  # a lowrank step's factors: kept as they are
            for name in names:
                w[name] = self.record(name, self.specs[name], self.weights.pop(name), w[name], H)
            return
        fmts = self.quantize_group([w[n] for n in names], H, [self.specs[n] for n in names], self.step)
        if getattr(self.step, "lowrank", 0):  # "+lowrank=R": each residual's whitened rank-R factors
            from .lowrank import correct_group
            fmts = correct_group([w[n] for n in names], fmts, H, self.step.lowrank)
        for name, fmt in zip(names, fmts):
            w[name] = self.record(name, self.specs[name], fmt, w[name], H)
            self.weights.pop(name, None)


def _factored(t) -> bool:
    return type(t).__name__ == "LowRankWeight"


def group_layer(job: LayerJob) -> None:
    """Group by group in the layer's order (q/k/v, then o on the outputs of the quantized q/k/v,
    gate/up, then down), so every linear sees the errors of those before it."""
    model, X, i = job.model, job.X, job.i
    qkv, o, gate_up, down = model.LINEAR_GROUPS
    n = X.shape[0]
    acc = Stats()
    for sl in batches(n, job.batch):
        acc(model.attn_in(i, X[sl]))
    job.quantize(qkv, acc.H)
    A = torch.empty(n, X.shape[1], model.cfg.heads(i)[0] * model.cfg.head_dim)
    acc = Stats()
    for sl in batches(n, job.batch):
        A[sl] = model.attn_core(i, model.attn_in(i, X[sl]), CTX)
        acc(A[sl])
    job.quantize(o, acc.H)
    acc = Stats()
    for sl in batches(n, job.batch):
        X[sl] = model.attn_out(i, X[sl], A[sl])
        acc(model.mlp_in(i, X[sl]))
    del A
    job.quantize(gate_up, acc.H)
    # down's input is computed again for the layer's output rather than kept: [n, T, F] floats
    acc = Stats()
    for sl in batches(n, job.batch):
        acc(model.mlp_core(i, model.mlp_in(i, X[sl])))
    job.quantize(down, acc.H)
    for sl in batches(n, job.batch):
        X[sl] = model.mlp_out(i, X[sl], model.mlp_core(i, model.mlp_in(i, X[sl])))


@dataclass(frozen=True)
class Method:
    calibrated: bool                                 # needs calibration text
    quantize_group: Optional[Callable] = None        # (weights [N, K], H or None, specs, step) -> formats
    quantize_layer: Optional[Callable] = None        # (LayerJob) -> None, X moved to the layer's output
    plan: Optional[Callable] = None                  # chooses each linear's format (mixed precision)


METHODS = {
    "rtn": Method(False, rtn.quantize_group, group_layer),
    "gptq": Method(True, gptq.quantize_group, group_layer),
    "awq": Method(True, None, awq.quantize_layer),
    "mixed": Method(True, plan=mixed.allocate_formats),   # then its base method, linear by linear
}
