"""Structured pruning as recipe steps: whole layers (`prune:layers=N`), MLP channels
(`prune:ffn=W`) and attention heads (`prune:heads=H`), chosen from calibration activations, with a
least-squares refit of the next linear; the result is a smaller dense model (jisu.compress.prune_width)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import ModelConfig, archs
from ..errors import JisuError
from .observe import CTX, batches, compression_model
from .prune_width import GROUP, TOKENS_PER_INPUT, LayerRefit, prune_width, reference_model, shaped_config
from .steps import StepContext, transform

BATCH = 4          # calibration sequences per forward
KL_TOKENS = 1024   # calibration tokens the skip-one-layer KL is measured on (it costs ~L/2 forwards)


@dataclass(frozen=True)
class PruneParams:
    kind: str                # "layers" | "ffn" | "heads"
    value: int               # layers kept | MLP width per layer | query heads per layer
    by: str = "bi"           # layers: "bi" (block influence) | "kl" (final KL with the layer skipped)
    spread: bool = False     # ffn: value * layers channels in all, spread over the layers by importance
    refit: bool = True       # least-squares refit of the next linear on calibration activations


@transform("prune", before=True, after=False, calibrated=True)
class Prune:
    form = "prune:layers=N[:by=bi|kl] | prune:ffn=W[:spread] | prune:heads=H   (each [:refit=0])"

    def parse(self, rest: str, fail) -> PruneParams:
        head, *opts = rest.split(":")
        kind, eq, value = head.partition("=")
        if kind not in ("layers", "ffn", "heads") or not eq:
            raise fail("say what to keep: layers=N, ffn=W or heads=H")
        if not value.isdigit() or int(value) <= 0:
            raise fail(f"{kind}={value!r} must be a positive integer")
        kw: dict = {}
        for opt in opts:
            name, eq, v = opt.partition("=")
            if kind == "layers" and name == "by" and v in ("bi", "kl"):
                kw["by"] = v
            elif kind == "ffn" and opt == "spread":
                kw["spread"] = True
            elif name == "refit" and v in ("0", "1"):
                kw["refit"] = v == "1"
            else:
                raise fail(f"unknown option {opt!r} for prune:{kind}")
        return PruneParams(kind, int(value), **kw)

    def check(self, p: PruneParams, cfg: ModelConfig) -> None:
        where = f"prune:{p.kind}={p.value}"
        if not archs()[cfg.arch].NATIVE:
            raise JisuError(f"{where}: architecture {cfg.arch} does not run on the native step; "
                            f"a pruned model of it would have no fast path")
        if p.kind == "layers":
            if p.value >= cfg.num_layers:
                raise JisuError(f"{where}: the model has {cfg.num_layers} layers; keeping {p.value} removes nothing")
        elif p.kind == "ffn":
            widths = [cfg.mlp_width(i) for i in range(cfg.num_layers)]
            if p.value % GROUP:
                raise JisuError(f"{where}: the width must be a multiple of {GROUP} (the quantization groups "
                                f"of down_proj's inputs)")
            if p.value >= max(widths):
                raise JisuError(f"{where}: the MLP is {max(widths)} wide; this removes nothing")
        else:
            heads = [cfg.heads(i) for i in range(cfg.num_layers)]
            kv = max(k for _, k in heads)
            if p.value >= max(q for q, _ in heads):
                raise JisuError(f"{where}: the layers have {max(q for q, _ in heads)} heads; this removes nothing")
            if any(p.value % k for _, k in heads):
                raise JisuError(f"{where}: {p.value} query heads are not a multiple of the {kv} KV heads "
                                f"(the same number of query heads is kept in each KV group)")

    def apply(self, p: PruneParams, ctx: StepContext) -> dict:
        if ctx.calib_ids is None:
            raise JisuError("prune: needs calibration text")
        if p.kind == "layers":
            return prune_layers(ctx, p.value, p.by, p.refit)
        return prune_width(ctx, p.kind, p.value, p.spread, p.refit)


# --- depth ------------------------------------------------------------------------------------

def block_influence(model, ids: torch.Tensor) -> list[float]:
    """1 - cos(input, output) of each layer, averaged over the calibration tokens (ShortGPT)."""
    L = model.cfg.num_layers
    total, n = torch.zeros(L, dtype=torch.float64), 0
    with torch.no_grad():
        for sl in batches(ids.shape[0], BATCH):
            x = model.embed(ids[sl])
            for i in range(L):
                y = model.layer(i, x, CTX)
                total[i] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).double().sum()
                x = y
            n += x.shape[0] * x.shape[1]
    return (total / n).tolist()


def skip_kl(model, ids: torch.Tensor) -> list[float]:
    """The mean KL(full || layer i skipped) of the final next-token distribution, for each layer,
    over the first KL_TOKENS calibration tokens."""
    L = model.cfg.num_layers
    ids = ids[:max(1, KL_TOKENS // ids.shape[1])]
    total, n = torch.zeros(L, dtype=torch.float64), 0

    def logp(x):
        return torch.log_softmax(model.head(model.final_hidden(x)), dim=-1)

    with torch.no_grad():
        for sl in batches(ids.shape[0], 1):
            xs = [model.embed(ids[sl])]
            for i in range(L):
                xs.append(model.layer(i, xs[-1], CTX))
            ref = logp(xs[-1])
            for i in range(L):
                x = xs[i]
                for j in range(i + 1, L):
                    x = model.layer(j, x, CTX)
                lp = logp(x)
                total[i] += (ref.exp() * (ref - lp)).sum().double()
            n += xs[0].shape[0] * xs[0].shape[1]
    return (total / n).tolist()


def renumber(cfg: ModelConfig, weights: dict, keep: list[int]) -> tuple[ModelConfig, dict]:
    """The model of layers `keep` (old indices, in order) renamed 0..N-1."""
    out = {k: v for k, v in weights.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(keep):
        p = f"model.layers.{old}."
        for k, v in weights.items():
            if k.startswith(p):
                out[f"model.layers.{new}." + k[len(p):]] = v
    new_cfg = shaped_config(replace(cfg, num_layers=len(keep), intermediate_sizes=(), layer_heads=(),
                                    layer_types=tuple(cfg.layer_types[i] for i in keep) if cfg.layer_types else ()),
                            [cfg.mlp_width(i) for i in keep], [cfg.heads(i) for i in keep])
    return new_cfg, out


def prune_layers(ctx: StepContext, n_keep: int, by: str, refit: bool) -> dict:
    """Keep the n_keep layers of highest importance, then refit the down_proj of each kept layer
    that a removed run follows so that its output matches the full model's after that run."""
    cfg, ids = ctx.cfg, ctx.calib_ids
    ref = reference_model(cfg, ctx.weights)
    score = block_influence(ref, ids) if by == "bi" else skip_kl(ref, ids)
    order = sorted(range(cfg.num_layers), key=lambda i: score[i])
    drop = sorted(order[:cfg.num_layers - n_keep])
    keep = [i for i in range(cfg.num_layers) if i not in drop]
    info = {"kind": "layers", "by": by, "importance": [round(s, 6) for s in score], "removed": drop,
            "kept": keep}
    if refit:
        info["refit"] = _refit_runs(ctx, ref, keep)
    ctx.cfg, ctx.weights = renumber(cfg, ctx.weights, keep)
    return info


def _refit_runs(ctx: StepContext, ref, keep: list[int]) -> list[dict]:
    """Runs the full model (R) and the pruned one (X) side by side over the calibration text; the
    kept layer before each removed run gets a down_proj fitted to R after the run."""
    cfg, ids = ctx.cfg, ctx.calib_ids
    stu_w = dict(ref.w)
    stu = compression_model(cfg, stu_w)
    R = torch.cat([ref.embed(ids[sl]) for sl in batches(ids.shape[0], BATCH)])
    X = R.clone()
    out = []
    with torch.no_grad():
        for i in range(cfg.num_layers):
            nxt = next((k for k in keep if k > i), cfg.num_layers)
            if i not in keep:
                for sl in batches(R.shape[0], BATCH):
                    R[sl] = ref.layer(i, R[sl], CTX)
                continue
            if nxt > i + 1:  # the target: the full model's hidden state at the next kept layer
                T = R.clone()
                for j in range(i, nxt):
                    for sl in batches(R.shape[0], BATCH):
                        T[sl] = ref.layer(j, T[sl], CTX)
                name = ref.names[i]["down"][0]
                acc = LayerRefit(cfg.mlp_width(i))
                for sl in batches(X.shape[0], BATCH):
                    m = stu.attn_out(i, X[sl], stu.attn_core(i, stu.attn_in(i, X[sl]), CTX))
                    acc.add(stu.mlp_core(i, stu.mlp_in(i, m)), T[sl] - m)
                if not acc.enough(cfg.mlp_width(i)):
                    out.append({"layer": i, "replaces": list(range(i + 1, nxt)),
                                "skipped": f"fewer than {TOKENS_PER_INPUT} calibration tokens per input"})
                else:
                    old = stu_w[name]
                    stu_w[name] = ctx.weights[name] = acc.solve()
                    out.append({"layer": i, "replaces": list(range(i + 1, nxt)), **acc.errors(stu_w[name], old)})
            for sl in batches(X.shape[0], BATCH):
                X[sl] = stu.layer(i, X[sl], CTX)
            for sl in batches(R.shape[0], BATCH):
                R[sl] = ref.layer(i, R[sl], CTX)
    return out
