"""The recipe step `distill:minutes=N[:tokens=T][:kl=forward|reverse][:ce=W][:hidden=W][:local][:lr=X][:gen=W]`:
before the quantization step it trains the float model (a pruned one, say) against the source; after
it, the quantized model's scales and norms (as +tune does), with the distillation loop's budget.
gen=W adds W windows of text the source writes itself (distill_gen.py) to the calibration windows."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint as ckpt

from ..errors import JisuError
from .distill import DistillConfig, distill, heldout_divergence
from .distill_cache import TOP_K, decoder_teacher, teacher_targets, tensor_sha, weights_fingerprint
from .observe import CTX, ReferenceNumerics, compression_model, model_form
from .steps import transform

FORM = "distill:minutes=N[:tokens=T][:kl=forward|reverse][:ce=W][:hidden=W][:local][:lr=X][:gen=W]"
BEFORE_LR = 1e-4      # Adam on the float weights
AFTER_LR = 2e-3       # Adam on the relative corrections of the scales (tune's), norms at half of it


class DecoderStudent:
    """A transformer (jisu's model classes) over float copies of `weights` (source form) that train:
    forward(ids) -> logits; distill_features / distill_head split it at the final hidden states,
    each layer recomputed in the backward pass."""

    def __init__(self, cfg, weights: dict):
        self.cfg = cfg
        self.leaves = {n: t.detach().float().clone().requires_grad_(t.is_floating_point())
                       for n, t in weights.items()}
        self.numerics = ReferenceNumerics(exact=True)
        self.distill_width = cfg.hidden_size
        self._model = None

    def parameters(self):
        return [p for p in self.leaves.values() if p.requires_grad]

    def weights(self) -> dict:
        return {n: p.detach().clone() for n, p in self.leaves.items()}

    def distill_features(self, ids):
        self._model = model = compression_model(self.cfg, model_form(self.cfg, self.leaves), self.numerics)
        return _run_layers(model, ids)

    def distill_head(self, h):
        return self._model.head(h)

    def __call__(self, ids):
        return self.distill_head(self.distill_features(ids))


def _run_layers(model, ids):
    x = model.embed(ids)
    for i in range(model.cfg.num_layers):
        x = (ckpt(model.layer, i, x, CTX, use_reentrant=False) if torch.is_grad_enabled()
             else model.layer(i, x, CTX))
    return model.final_hidden(x)


class QuantizedStudent:
    """A quantized model (pipeline.Quantized) whose scales and norms train (tune.QuantizedTuning)."""

    def __init__(self, qz):
        from .tune import QuantizedTuning

        self.qt = QuantizedTuning(qz)
        self.distill_width = qz.cfg.hidden_size

    def distill_features(self, ids):
        self.qt.prepare()
        return _run_layers(self.qt.model, ids)

    def distill_head(self, h):
        return self.qt.model.head(h)


@dataclass(frozen=True)
class DistillParams:
    minutes: Optional[float] = None
    tokens: Optional[int] = None
    kl: str = "forward"
    ce: float = 0.0
    hidden: float = 0.0
    local: bool = False
    lr: Optional[float] = None
    gen: int = 0          # windows of the teacher's own text added to the training windows

    def config(self, lr: float, threads: Optional[int]) -> DistillConfig:
        return DistillConfig(minutes=self.minutes, tokens=self.tokens, kl=self.kl, ce=self.ce, hidden=self.hidden,
                             lr=self.lr or lr, threads=threads)


def split_heldout(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows): the last eighth of the calibration windows (at least
    one) is kept out of training for the evaluation curve; a single window is used for both."""
    S = ids.shape[0]
    if S < 2:
        return ids, ids
    n = max(1, S // 8)
    return ids[:S - n], ids[S - n:]


@transform("distill", before=True, after=True, calibrated=True)
class Distill:
    form = FORM

    def parse(self, rest: str, fail):
        kw: dict = {}
        for part in rest.split(":") if rest else []:
            key, eq, value = part.partition("=")
            if key in kw:
                raise fail(f"{key} is given twice")
            try:
                if key == "local" and not eq:
                    kw["local"] = True
                elif key in ("minutes", "ce", "hidden", "lr") and eq:
                    kw[key] = float(value)
                elif key in ("tokens", "gen") and eq:
                    v = float(value)
                    if not v.is_integer() or (key == "gen" and v < 0):
                        raise fail(f"{key}={value!r} must be a whole number" + (" >= 0" if key == "gen" else ""))
                    kw[key] = int(v)
                elif key == "kl" and eq:
                    kw[key] = value
                else:
                    raise fail(f"unknown option {part!r}")
            except ValueError:
                raise fail(f"{key}={value!r} is not a number") from None
        p = DistillParams(**kw)
        if p.local and p.gen:
            raise fail("gen=W feeds the distillation loop, not :local's layer reconstruction")
        try:
            p.config(BEFORE_LR, None)
        except JisuError as e:
            raise fail(str(e).removeprefix("distill: ")) from None
        return p

    def check(self, p: DistillParams, cfg) -> None:
        pass

    def apply(self, p: DistillParams, ctx) -> dict:
        after = ctx.quantized is not None
        if p.local and after:
            raise JisuError("distill:local trains float layers: put it before the quantization step")
        c = p.config(AFTER_LR if after else BEFORE_LR, ctx.threads)
        if ctx.calib_ids is None:
            raise JisuError("distill: needs calibration text")
        teacher = ctx.teacher
        train_ids, held_ids = split_heldout(ctx.calib_ids)
        tid = weights_fingerprint(teacher.cfg, teacher.weights)
        compute = decoder_teacher(teacher.cfg, teacher.weights)
        held, _ = teacher_targets(tid, held_ids, compute, k=TOP_K, progress=ctx.progress)
        info = {"budget": {"minutes": c.minutes, "tokens": c.tokens}, "lr": c.lr, "kl": c.kl, "ce": c.ce,
                "hidden": c.hidden, "heldout_windows": int(held_ids.shape[0])}
        if p.local:
            from .distill_local import reconstruct_layers

            weights = dict(ctx.weights)
            before = heldout_divergence(DecoderStudent(ctx.cfg, weights), held_ids, held)
            info.update(reconstruct_layers(ctx.cfg, weights, teacher.cfg, teacher.weights, train_ids,
                                           c,
                                           layer_map=getattr(ctx, "layer_map", None),
                                           workdir=ctx.workfile("distill-local", "layers"), progress=ctx.progress))
            ctx.weights = weights
            info.update(heldout_kl_before=before, heldout_kl_after=heldout_divergence(
                DecoderStudent(ctx.cfg, weights), held_ids, held))
            return info
        if p.gen:
            from .distill_gen import teacher_windows

            if ctx.tokenizer is None:
                raise JisuError("distill: gen=W needs the source's tokenizer")
            gen_ids, ginfo = teacher_windows(teacher.cfg, teacher.weights, ctx.tokenizer, tid, p.gen,
                                             train_ids.shape[1], progress=ctx.progress)
            train_ids = torch.cat([gen_ids, train_ids])
            info.update(teacher_text=ginfo)
        targets, cinfo = teacher_targets(tid, train_ids, compute, k=TOP_K, hidden=c.hidden > 0, progress=ctx.progress)
        if after:
            student = QuantizedStudent(ctx.quantized)
            params = student.qt.param_groups(c.lr, c.lr / 2)
            start = hashlib.sha256("".join(tensor_sha(t.s0) for t in student.qt.by_id.values()).encode()).hexdigest()
        else:
            student = DecoderStudent(ctx.cfg, ctx.weights)
            params = None
            start = weights_fingerprint(ctx.cfg, ctx.weights)
        sig = f"{start} {tid} {tensor_sha(train_ids)} {c} {'after' if after else 'before'}"
        result = distill(student, train_ids, targets, c, params=params, checkpoint_path=ctx.workfile("distill.pt"),
                         signature=sig, progress=ctx.progress,
                         evaluate=lambda: heldout_divergence(student, held_ids, held))
        curve = result["curve"]
        kept = curve[-1]["value"] < curve[0]["value"]
        if after:
            if kept:
                student.qt.write_back()
        else:
            kept = True
            ctx.weights = student.weights()
        info.update(result, targets_cached=cinfo["cached"], heldout_kl_before=curve[0]["value"],
                    heldout_kl_after=curve[-1]["value"], kept=kept)
        return info
