"""End-to-end tuning of a quantized model's continuous parameters (recipe option `+tune[=STEPS]`).

GPTQ / AWQ / RTN fix every weight's integer code one layer at a time, each layer judged by its own
reconstruction error. What the user is judged by is the next-token distribution at the end of the
whole model, so after quantizing, the codes stay as they are and everything continuous is trained
by gradient descent against the source model's distribution on the calibration text
(the idea of EfficientQAT's end-to-end quantization-parameter training, with a KL target):

- every group scale (and asymmetric min) of every quantized matrix, the LM head's and the
  quantized embedding's included (one table when they are tied), and every RMSNorm weight;
- loss: KL(source || model) per token over the source's top-K next-token probabilities plus one
  bin for the rest of the vocabulary (the exact KL of that coarser distribution, a lower bound of
  the full KL), K = 64; the targets are computed once, before quantizing, in full precision;
- Adam over multiplicative corrections (scale = s0 * (1 + r)), cosine learning-rate decay;
  each layer is recomputed in the backward pass (activation checkpointing) and each matrix is
  decoded from its codes when used, a block of rows at a time, so no float copy of the model is
  kept (about 1 GB peak on a 135M model);
- the tuned scales are rounded to the format's float16 at the end; a result whose calibration KL
  came out worse than where it started is discarded (the untuned scales are kept).

Pure PyTorch (autograd), on the CPU.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..kernels.formats import CodebookWeight, Int8Weight, IntWeight, _f16
from ..models.layers import EMBED, HEAD
from .observe import CTX, ReferenceNumerics, compression_model, model_form, source_form

TOP_K = 64
LR = 2e-3          # Adam step on the relative corrections of the scales
NORM_LR = 1e-3     # ... and of the RMSNorm weights
BATCH = 4          # calibration samples per step


# ---------------------------------------------------------------------------------------------
# teacher targets
# ---------------------------------------------------------------------------------------------
def teacher_targets(cfg, weights: dict, ids: torch.Tensor, k: int = TOP_K, batch: int = BATCH,
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The source's top-k next-token log-probs [S, T, k] and their token ids [S, T, k] (int32) on
    the calibration ids [S, T]; packed source weights are decoded in float32 when used."""
    from tqdm import tqdm

    from .distill_cache import decoder_teacher

    compute = decoder_teacher(cfg, weights)
    S, T = ids.shape
    lp_out = torch.empty(S, T, k)
    ix_out = torch.empty(S, T, k, dtype=torch.int32)
    for s0 in tqdm(range(0, S, batch), desc="tune: targets", unit="batch", disable=not progress):
        sl = slice(s0, min(S, s0 + batch))
        lp, ix, _, _ = compute(ids[sl], k, False)
        lp_out[sl], ix_out[sl] = lp, ix.to(torch.int32)
    return lp_out, ix_out


def coarse_kl(logits: torch.Tensor, t_lp: torch.Tensor, t_ix: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || model) over tokens for the (k + 1)-bin distributions: the teacher's top-k
    tokens and one bin holding the rest. logits [..., V]; t_lp / t_ix [..., k]."""
    lq = torch.log_softmax(logits.float(), dim=-1)
    lq_k = lq.gather(-1, t_ix.long())
    p_k = t_lp.exp()
    kl = (p_k * (t_lp - lq_k)).sum(-1)
    r_p = (1.0 - p_k.sum(-1)).clamp_min(1e-12)
    r_q = (1.0 - lq_k.exp().sum(-1)).clamp_min(1e-12)
    kl = kl + r_p * (r_p.log() - r_q.log())
    return kl.mean()


# ---------------------------------------------------------------------------------------------
# tunable weights
# ---------------------------------------------------------------------------------------------
class Tunable:
    """A quantized matrix W = U * s (+ m), the code values U fixed, s (and m) trained through
    relative corrections r: s = s0 * (1 + r_s), m = m0 + s0 * r_m (per group)."""

    def __init__(self, fmt):
        self.fmt = fmt
        if isinstance(fmt, IntWeight):
            off = 0 if fmt.min is not None else 1 << (fmt.bits - 1)
            self.U = (fmt.q.to(torch.int16) - off).to(torch.int8)
            self.g = fmt.group_size
            self.s0, self.m0 = fmt.scale.float(), (None if fmt.min is None else fmt.min.float())
        elif isinstance(fmt, Int8Weight):
            self.U = fmt.q
            self.g = fmt.group_size or fmt.q.shape[1]
            self.s0 = (fmt.scale.float() if fmt.group_size else fmt.scale.float()[:, None])
            self.m0 = None
        elif isinstance(fmt, CodebookWeight):
            self.U = torch.gather(fmt.codebook.float(), 1, fmt.idx.long())   # table values, fixed
            self.g = fmt.group_size or fmt.idx.shape[1]
            self.s0 = (fmt.scale.float() if fmt.scale is not None else torch.ones(fmt.idx.shape[0], 1))
            self.m0 = None
        else:
            raise TypeError(f"cannot tune {type(fmt).__name__}")
        self.N, self.K = self.U.shape
        self.r_s = torch.zeros_like(self.s0, requires_grad=True)
        self.r_m = None if self.m0 is None else torch.zeros_like(self.m0, requires_grad=True)

    def params(self) -> list[torch.Tensor]:
        return [self.r_s] + ([self.r_m] if self.r_m is not None else [])

    def scales(self):
        s = self.s0 * (1.0 + self.r_s)
        m = None if self.m0 is None else self.m0 + self.s0 * self.r_m
        return s, m

    def weight(self, s, m, rows=None) -> torch.Tensor:
        """float32 W [N, K] (or the given rows) for scales s / mins m [N, G]."""
        U = self.U if rows is None else self.U[rows]
        if rows is not None:
            s = s[rows]
            m = None if m is None else m[rows]
        n = U.shape[0]
        G = self.K // self.g
        w = U.float().view(n, G, self.g) * s[..., None]
        if m is not None:
            w = w + m[..., None]
        return w.view(n, self.K)

    def write_back(self) -> None:
        """Store the tuned scales in the format (float16 values where the format keeps float16)."""
        with torch.no_grad():
            s, m = self.scales()
            f = self.fmt
            if isinstance(f, IntWeight):
                f.scale = _f16(s)
                if m is not None:
                    f.min = _f16(m)
            elif isinstance(f, Int8Weight):
                f.scale = _f16(s) if f.group_size else s[:, 0].clone()
            else:
                if f.scale is not None:
                    f.scale = _f16(s)
                else:  # no group scale: the per-row factor goes into the (float16) table
                    f.codebook = _f16(f.codebook.float() * s)


ROW_ELEMS = 1 << 21  # a matrix larger than this (an LM head) is decoded a block of rows at a time


def _row_blocks(t: "Tunable"):
    step = max(1, ROW_ELEMS // t.K)
    return [(r0, min(t.N, r0 + step)) for r0 in range(0, t.N, step)]


class _QLinear(torch.autograd.Function):
    """y = x W^T with W decoded from a Tunable's codes at its current scales, in the forward and
    again in the backward, a block of rows at a time (W is never kept); gradients for x, s and m."""

    @staticmethod
    def forward(ctx, x, s, m, t: Tunable):
        ctx.t = t
        ctx.save_for_backward(x, s, m if m is not None else torch.empty(0))
        ctx.has_m = m is not None
        blocks = _row_blocks(t)
        if len(blocks) == 1:
            return F.linear(x, t.weight(s, m))
        y = x.new_empty(*x.shape[:-1], t.N)
        for r0, r1 in blocks:
            y[..., r0:r1] = F.linear(x, t.weight(s, m, rows=slice(r0, r1)))
        return y

    @staticmethod
    def backward(ctx, g):
        x, s, m = ctx.saved_tensors
        t = ctx.t
        m = m if ctx.has_m else None
        G = t.K // t.g
        g2, x2 = g.reshape(-1, t.N), x.reshape(-1, t.K)
        gx = None
        gs = torch.empty_like(s)
        gm = torch.empty_like(m) if m is not None else None
        for r0, r1 in _row_blocks(t):
            W = t.weight(s, m, rows=slice(r0, r1))
            gb = g2[:, r0:r1]
            if ctx.needs_input_grad[0]:
                part = gb @ W
                gx = part if gx is None else gx.add_(part)
            gW = (gb.T @ x2).view(r1 - r0, G, t.g)                      # [rows, G, g]
            gs[r0:r1] = (gW * t.U[r0:r1].float().view(r1 - r0, G, t.g)).sum(-1)
            if gm is not None:
                gm[r0:r1] = gW.sum(-1)
        if gx is not None:
            gx = gx.view(*g.shape[:-1], t.K)
        return gx, gs, gm, None


class TuneNumerics(ReferenceNumerics):
    """Compression's exact numerics with tunable quantized matrices (frozen packed ones are decoded
    in float32, differentiable in their input)."""

    def __init__(self, tunables: dict):
        super().__init__(exact=True)
        self.tunables = tunables            # weight name -> Tunable
        self._cur = {}

    def refresh(self) -> None:
        """Scales at the current corrections (once per step, shared by every use of a matrix)."""
        self._cur = {}
        for t in self.tunables.values():
            if id(t) not in self._cur:  # a tied embedding / head is one Tunable under two names
                self._cur[id(t)] = t.scales()

    def linear(self, x, weight, bias, name):
        t = self.tunables.get(name)
        if t is None:
            return super().linear(x, weight, bias, name)
        s, m = self._cur[id(t)]
        y = _QLinear.apply(x, s, m, t)
        return y if bias is None else y + bias

    def embed(self, table, tokens, name):
        t = self.tunables.get(name)
        if t is None:
            return super().embed(table, tokens, name)
        s, m = self._cur[id(t)]
        return t.weight(s, m, rows=tokens.reshape(-1)).view(*tokens.shape, t.K)


def _norm_names(w: dict) -> list[str]:
    return [n for n, t in w.items() if n.endswith("norm.weight") and isinstance(t, torch.Tensor)]


def _loss(model, ids, t_lp, t_ix, checkpoint: bool = True) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint as ckpt

    x = model.embed(ids)
    for i in range(model.cfg.num_layers):
        x = ckpt(model.layer, i, x, CTX, use_reentrant=False) if checkpoint else model.layer(i, x, CTX)
    h = model.final_hidden(x)
    T = ids.shape[1]
    total = 0.0
    for t0 in range(0, T, 64):  # head + loss per slice of positions, recomputed in the backward
        def piece(hh, lp, ix):
            return coarse_kl(model.head(hh), lp, ix)
        part = (ckpt(piece, h[:, t0:t0 + 64], t_lp[:, t0:t0 + 64], t_ix[:, t0:t0 + 64], use_reentrant=False)
                if checkpoint else piece(h[:, t0:t0 + 64], t_lp[:, t0:t0 + 64], t_ix[:, t0:t0 + 64]))
        total = total + part * (min(T, t0 + 64) - t0)
    return total / T


class QuantizedTuning:
    """The continuous parameters of a quantized model `qz` (jisu.compress.pipeline.Quantized) made
    trainable: relative corrections of every group scale / min (Tunable) and of every RMSNorm weight,
    and the model over them (`model`, compression's numerics). prepare() before each forward;
    write_back() stores the trained values in qz."""

    def __init__(self, qz):
        cfg = self.cfg = qz.cfg
        self.qz = qz
        tunables, self.by_id = {}, {}
        for name, spec in qz.specs.items():
            f = qz.tensors[name]
            if id(f) not in self.by_id:
                self.by_id[id(f)] = Tunable(f)
            tunables[name] = self.by_id[id(f)]
        if HEAD not in qz.tensors and EMBED in tunables and cfg.tie_embeddings:
            tunables[HEAD] = tunables[EMBED]
        self.w = model_form(cfg, qz.tensors)
        self.norms = _norm_names(self.w)
        self.base = {n: self.w[n].detach().float().clone() for n in self.norms}
        self.r_norm = {n: torch.zeros_like(self.base[n], requires_grad=True) for n in self.norms}
        self.numerics = TuneNumerics(tunables)
        self.model = compression_model(cfg, self.w, self.numerics)

    def param_groups(self, lr: float = LR, norm_lr: float = NORM_LR) -> list[dict]:
        return [{"params": [p for t in self.by_id.values() for p in t.params()], "lr": lr},
                {"params": list(self.r_norm.values()), "lr": norm_lr}]

    def prepare(self) -> None:
        """Norm weights and scales at the current corrections (once per step)."""
        for n in self.norms:
            self.w[n] = self.base[n] * (1.0 + self.r_norm[n])
        self.numerics.refresh()

    def write_back(self) -> None:
        for t in self.by_id.values():
            t.write_back()
        with torch.no_grad():
            for n in self.norms:
                self.qz.tensors[n] = source_form(self.cfg, n, (self.base[n] * (1.0 + self.r_norm[n])).detach().clone())


def tune(qz, targets, ids: torch.Tensor, steps: int, *, batch: int = BATCH, lr: float = LR,
         norm_lr: float = NORM_LR, progress: bool = False, seed: int = 0) -> dict:
    """Tune the quantized model `qz` (jisu.compress.pipeline.Quantized; changed in place) against
    `targets` (teacher_targets on `ids`) for `steps` Adam steps; returns what it measured."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    qt = QuantizedTuning(qz)
    opt = torch.optim.Adam(qt.param_groups(lr, norm_lr))
    model = qt.model
    t_lp, t_ix = targets
    S = ids.shape[0]
    gen = torch.Generator().manual_seed(seed)

    def evaluate() -> float:
        with torch.no_grad():
            qt.prepare()
            tot = 0.0
            for s0 in range(0, S, batch):
                sl = slice(s0, min(S, s0 + batch))
                tot += float(_loss(model, ids[sl], t_lp[sl], t_ix[sl], checkpoint=False)) * (sl.stop - s0)
            return tot / S

    before = evaluate()
    losses = []
    order = torch.randperm(S, generator=gen)
    pos = 0
    bar = tqdm(range(steps), desc="tune", unit="step", disable=not progress)
    for step in bar:
        if pos + batch > S:
            order, pos = torch.randperm(S, generator=gen), 0
        pick = order[pos:pos + batch]
        pos += batch
        for gidx, group in enumerate(opt.param_groups):
            group["lr"] = (lr, norm_lr)[gidx] * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        qt.prepare()
        loss = _loss(model, ids[pick], t_lp[pick], t_ix[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    after = evaluate()
    info = {"steps": steps, "batch": batch, "lr": lr, "norm_lr": norm_lr, "top_k": TOP_K,
            "calib_kl_before": before, "calib_kl_after": after, "kept": after < before,
            "seconds": time.perf_counter() - t0}
    if after < before:
        qt.write_back()
    return info
