"""How compression runs the one model (jisu.models): over weights in model form, with float32
reference numerics (rms_norm_ref, F.linear; packed weights decoded, differentiable in x for
Fisher and tuning), observing the input of each linear through the model's taps."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels.ops import rms_norm_ref
from ..models import model_class, model_form, source_form  # noqa: F401  (Gemma's norm offset, for the methods)
from ..models.layers import CausalContext, Numerics


def as_float(t) -> torch.Tensor:
    """A float tensor, or the exact float32 weights of a packed kernel weight."""
    return t if isinstance(t, torch.Tensor) else t.dequantize()


class ReferenceNumerics(Numerics):
    """Compression's numerics. Float weights run through F.linear; packed ones are decoded to
    float32 when `exact` (the full-precision source), else run through their native kernel as
    the artifact will (layers already quantized). `on_output(name, y)` sees every linear output
    that requires grad (Fisher's gradients)."""

    def __init__(self, exact: bool = False):
        self.exact = exact
        self.on_output: Optional[Callable[[str, torch.Tensor], None]] = None

    def rms_norm(self, x, w, eps):
        return rms_norm_ref(x, w, eps)

    def linear(self, x, weight, bias, name):
        if isinstance(weight, torch.Tensor):
            y = F.linear(x, weight, bias)
        elif self.exact:
            y = _DequantLinear.apply(x, weight)
            if bias is not None:
                y = y + bias
        else:
            y = weight.linear(x.contiguous(), bias)
        if self.on_output is not None and y.requires_grad:
            self.on_output(name, y)
        return y


def compression_model(cfg: ModelConfig, w: dict, numerics: Optional[Numerics] = None):
    """The model over `w` (model form; used as it is, not copied) with compression's numerics."""
    return model_class(cfg).over(cfg, w, numerics or ReferenceNumerics())


class _DequantLinear(torch.autograd.Function):
    """x @ W^T for a packed weight in float32, differentiable in x; the backward pass decodes W
    again instead of keeping it, so a Fisher pass holds no float copy of the model."""

    @staticmethod
    def forward(ctx, x, packed):
        ctx.packed = packed
        blocks = row_blocks(packed)
        if blocks is None:
            return F.linear(x, packed.dequantize())
        out = x.new_empty(*x.shape[:-1], packed.N)
        for r0, r1, w in blocks:
            out[..., r0:r1] = F.linear(x, w)
        return out

    @staticmethod
    def backward(ctx, g):
        blocks = row_blocks(ctx.packed)
        if blocks is None:
            return g @ ctx.packed.dequantize(), None
        gx = None
        for r0, r1, w in blocks:
            part = g[..., r0:r1] @ w
            gx = part if gx is None else gx.add_(part)
        return gx, None


BLOCK_ELEMS = 1 << 22  # a packed matrix larger than this (an LM head) is decoded a block of rows at a time


def row_blocks(packed):
    """(r0, r1, float32 rows) over a large packed int matrix, or None (decode it whole)."""
    from ..kernels.packed import NR, PackedInt

    if not isinstance(packed, PackedInt) or packed.N * packed.K <= BLOCK_ELEMS:
        return None
    T = (packed.N + NR - 1) // NR
    step = max(1, BLOCK_ELEMS // packed.K // NR)
    return ((t0 * NR, min((t0 + step) * NR, packed.N), packed._dequant_tiles(t0, min(T, t0 + step)))
            for t0 in range(0, T, step))


CTX = CausalContext()  # compression runs whole calibration sequences, no cache


class Stats:
    """Accumulates X^T X (float32) and, for AWQ, sum |x| of inputs x [..., K] (a linear's tap)."""

    def __init__(self, abs_sum: bool = False):
        self.xtx = None
        self.abs = None
        self.abs_sum = abs_sum
        self.n = 0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if self.xtx is None:
            self.xtx = torch.zeros(x.shape[1], x.shape[1])
            self.abs = torch.zeros(x.shape[1], dtype=torch.float64)
        self.xtx.addmm_(x.T, x)
        if self.abs_sum:
            self.abs += x.abs().sum(0, dtype=torch.float64)
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        """2/n X^T X (float64), GPTQ's Hessian of the layer reconstruction loss."""
        return self.xtx.double() * (2.0 / self.n)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs / self.n


def batches(n: int, batch: int):
    for b0 in range(0, n, batch):
        yield slice(b0, min(b0 + batch, n))


def layer_stats(model, i: int, X: torch.Tensor, batch: int, abs_sum: bool = False, update: bool = False) -> dict:
    """Input statistics of every linear group of layer i (group -> Stats), observed through the
    model's taps while the layer runs over the hidden states X [S, T, hidden]; update=True also
    moves X to the layer's output."""
    firsts = {model.names[i][g[0]][0]: g for g in model.LINEAR_GROUPS}
    stats = {g: Stats(abs_sum) for g in model.LINEAR_GROUPS}

    def tap(name, x):
        g = firsts.get(name)
        if g is not None:
            stats[g](x)

    model.observer = tap
    try:
        for sl in batches(X.shape[0], batch):
            y = model.layer(i, X[sl], CTX)
            if update:
                X[sl] = y
    finally:
        model.observer = None
    return stats


def embed_all(model, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """The embedded calibration ids [S, T] -> hidden states [S, T, hidden]."""
    X = torch.empty(ids.shape[0], ids.shape[1], model.cfg.hidden_size)
    with torch.no_grad():
        for sl in batches(ids.shape[0], batch):
            X[sl] = model.embed(ids[sl])
    return X
