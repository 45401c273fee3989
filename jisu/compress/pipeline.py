"""Quantize a whole model, layer by layer.

Methods that need calibration (GPTQ, AWQ, mixed) run the calibration hidden states through
layer i of the model (jisu.models, with compression's numerics: jisu.compress.observe) with
layers 0..i-1 already quantized, collect each linear's input statistics, quantize the layer by
the method's handler (jisu.compress.methods.METHODS) and move on. Within a layer GPTQ goes in order (q/k/v, then o on the outputs of the
quantized q/k/v, gate/up, then down), so every linear sees the errors of those before it.
The source weights may be packed kernel weights (a GGUF's Q4_0/Q4_1/Q8_0 matrices kept as they
are in the file): a layer is decoded to float32 only when its turn comes, and once quantized it
runs packed, as the artifact will. Besides the (packed) model, only the hidden states
[samples, seq_len, hidden], one layer in float32 and that layer's intermediates are held.
A source read by jisu.compress.stream keeps its matrices in the file until their turn; with
encode=True each quantized layer is kept only in its stored (bit-packed) form once done.
Without +embed / +head the embedding and an untied head are stored as int8 group 32 (= GGUF
Q8_0, 8.5 bits per weight), or in the source's own Q8_0/Q4_0/Q4_1 format when it has one.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch

from ..config import ModelConfig
from ..errors import JisuError
from ..io.artifact import to_runtime
from ..io.artifact_codec import Encoded
from ..kernels.lowrank import LowRankWeight
from ..kernels.packed import PackedInt
from ..models.layers import EMBED, HEAD, linear_names
from . import gptq, rtn
from .methods import METHODS, LayerJob
from .observe import Stats, as_float, batches, compression_model, embed_all, model_form, row_blocks
from .recipe import Recipe
from .spec import FormatSpec

TABLE_DEFAULT = FormatSpec("int", 8, 32)  # the embedding's / head's default: int8 group 32 (= GGUF Q8_0)


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
    factored = [n for n in linear_names(cfg) if isinstance(weights.get(n), LowRankWeight)]
    if factored and (METHODS[q.method].plan is not None or q.method == "awq" or q.lowrank):
        raise JisuError(f"{recipe.text}: the linears a lowrank step factored are kept by rtn or gptq steps "
                        f"(not {q.method}{' with +lowrank' if q.lowrank else ''})")
    if METHODS[q.method].plan is not None:  # each linear needs one choice that fits it (the others are skipped for it)
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
    if q.lowrank:
        for n in linear_names(cfg):
            shape = tuple(weights[n].shape) if n in weights else None
            if shape is not None and q.lowrank >= min(shape):
                raise JisuError(f"+lowrank={q.lowrank}: {n} is {shape[0]}x{shape[1]}; the rank must be below "
                                f"{min(shape)}")
    check_targets(weights, recipe, targets)


def check_targets(weights: dict, recipe: Recipe, targets: list) -> None:
    """Every (name, format) of `targets`, plus the embedding / head the recipe quantizes, exists and
    fits its format (group divides K)."""
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


def quantize_model(cfg: ModelConfig, weights: dict, recipe: Recipe, calib_ids: Optional[torch.Tensor] = None, *,
                   progress: Optional[bool] = None, batch: int = 8, fisher_samples: int = 8,
                   encode: bool = False) -> Quantized:
    """Quantize `weights` (source form, float; entries of quantized linears are consumed) by `recipe`.
    encode=True: the quantized linears are kept as Encoded (their artifact parts), layer by layer."""
    check_model(cfg, weights, recipe)
    progress = sys.stderr.isatty() if progress is None else progress
    q = recipe.quant
    method = METHODS[q.method]
    t0 = time.perf_counter()
    head_src = HEAD if (HEAD in weights and not cfg.tie_embeddings) else EMBED
    out = Quantized(cfg, {}, {})
    if recipe.needs_calibration and calib_ids is None:
        raise JisuError(f"recipe {recipe.text!r} needs calibration data")
    targets = None
    if recipe.tune:  # the source's next-token distribution, before its weights are consumed
        from . import tune

        targets = tune.teacher_targets(cfg, weights, calib_ids, progress=progress)

    if not method.calibrated and not q.lowrank:  # (a low-rank correction needs each linear's inputs)
        _uncalibrated(cfg, weights, q, out, progress, encode)
        head_h = None
    else:
        model = compression_model(cfg, model_form(cfg, weights))
        specs = {n: q.fmt for n in linear_names(cfg)}
        if method.plan is not None:
            specs = method.plan(model, q, calib_ids, out, progress, batch, fisher_samples)
        head_h = _sequential(model, weights, recipe, specs, calib_ids, out, progress, batch, encode)
        del model

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
            fmt = quantize_rows(weights[head_src], recipe.head)
        out.tensors[HEAD] = fmt
        out.specs[HEAD] = recipe.head
    if recipe.embed is not None:
        out.tensors[EMBED] = out.tensors[HEAD] if tie_same else quantize_rows(weights[EMBED], recipe.embed)
        out.specs[EMBED] = recipe.embed
        out.tied_head = tie_same
    if recipe.head is not None and head_src == EMBED:
        out.cfg = replace(cfg, tie_embeddings=False)  # the head is its own (quantized) tensor now
    # without +embed / +head: never float32 (a tied head follows the embedding)
    if recipe.embed is None:
        _default_table(weights, EMBED, out)
    if recipe.head is None and head_src == HEAD:
        _default_table(weights, HEAD, out)
    # every other tensor as in the source
    for name, t in weights.items():
        if name not in out.tensors and not (name == HEAD and cfg.tie_embeddings):
            out.tensors[name] = t if isinstance(t, (torch.Tensor, PackedInt)) else as_float(t)
    for name in list(out.tensors):
        if name in out.info.get("changed", {}):
            out.tensors[name] = out.info["changed"][name]
    out.info.pop("changed", None)
    if targets is not None:
        out.info["tune"] = tune.tune(out, targets, calib_ids, recipe.tune, progress=progress)
    out.info["quantize_s"] = time.perf_counter() - t0
    return out


def _default_table(weights: dict, name: str, out: Quantized) -> None:
    """The embedding / untied head the recipe leaves alone: a packed source matrix stays in its
    own format (restored when written: jisu.compress.run), a GGUF Q8_0/Q4_0/Q4_1 one is taken in
    its format, anything else is quantized to int8 group 32 (per output channel when 32 does not
    divide its width)."""
    t = weights[name]
    if isinstance(t, PackedInt):
        return
    fmt = t.source_format() if hasattr(t, "source_format") else None
    if fmt is not None:
        bits = 8 if type(fmt).__name__ == "Int8Weight" else fmt.bits
        spec = FormatSpec("int", bits, fmt.group_size, sym=getattr(fmt, "min", None) is None)
    else:
        spec = TABLE_DEFAULT if TABLE_DEFAULT.check_k(t.shape[1]) else FormatSpec("int", 8, None)
        fmt = quantize_rows(t, spec)
    out.tensors[name] = fmt
    out.specs[name] = spec


def quantize_rows(t, spec):
    """RTN of a (large) source matrix; an integer format is quantized a block of rows at a time from
    a SourceWeight (rows are independent: the same result as the whole matrix at once)."""
    if spec.kind != "int" or not hasattr(t, "blocks"):
        return rtn.quantize(as_float(t), spec)
    parts = [rtn.quantize(w, spec) for _, _, w in t.blocks()]
    first = parts[0]
    kw = {f.name: (torch.cat([getattr(p, f.name) for p in parts]) if isinstance(getattr(first, f.name), torch.Tensor)
                   else getattr(first, f.name)) for f in fields(first)}
    return type(first)(**kw)


def _transposed_float(t) -> torch.Tensor:
    """The float32 [K, N] transpose of a weight [N, K]; a large packed matrix (an LM head) is decoded
    into it a block of rows at a time, so its float32 values are never held twice."""
    blocks = None if isinstance(t, torch.Tensor) else (t.blocks() if hasattr(t, "blocks") else row_blocks(t))
    if blocks is None:
        return as_float(t).T.to(torch.float32).contiguous()
    wt = torch.empty(t.K, t.N)
    for r0, r1, rows in blocks:
        wt[:, r0:r1] = rows.T
    return wt


def _uncalibrated(cfg, weights, step, out, progress, encode=False):
    """A method without calibration: each linear on its own, straight from the source."""
    from tqdm import tqdm

    quantize_group = METHODS[step.method].quantize_group
    for name in tqdm(linear_names(cfg), desc=f"{step.method} {step.fmt.name}", unit="linear", disable=not progress):
        if isinstance(weights.get(name), LowRankWeight):  # a lowrank step's factors: kept
            out.tensors[name] = weights.pop(name)
            out.specs[name] = step.fmt
            continue
        fmt = quantize_group([as_float(weights.pop(name))], None, [step.fmt], step)[0]
        out.tensors[name] = Encoded.of(name, fmt) if encode else fmt
        out.specs[name] = step.fmt


def _sequential(model, weights, recipe, specs, ids, out, progress, batch, encode=False):
    """The calibrated methods over the layers; returns the LM head's H (or None)."""
    from tqdm import tqdm

    q = recipe.quant
    layer_method = METHODS[q.layer_method]
    w = model.w
    X = embed_all(model, ids, batch)
    desc = f"{q.method} {q.fmt.name if q.fmt else f'bpw={q.bpw}'}"
    with torch.no_grad():
        for i in tqdm(range(model.cfg.num_layers), desc=desc, unit="layer", disable=not progress):
            job = LayerJob(model, weights, i, X, specs, q, out, batch, layer_method.quantize_group)
            for group in model.LINEAR_GROUPS:  # this layer in float32 (the source may be packed)
                for s in group:
                    w[job.name(s)] = as_float(w[job.name(s)])
            layer_method.quantize_layer(job)
            if encode:  # done with this layer: only its stored form stays
                for group in model.LINEAR_GROUPS:
                    for s in group:
                        name = job.name(s)
                        if name in out.tensors:
                            out.tensors[name] = Encoded.of(name, out.tensors[name])
                        w.pop(name, None)
        if recipe.head is None or q.layer_method != "gptq":
            return None
        acc = Stats()
        for sl in batches(X.shape[0], batch):
            acc(model.final_hidden(X[sl]))
        return acc.H


def runtime_weights(qz: Quantized) -> dict:
    """The weights a model runs with, straight from memory (as jisu.io.artifact loads them)."""
    w = {}
    for name, obj in qz.tensors.items():
        if isinstance(obj, Encoded):
            obj = obj.decode()
        w[name] = obj if isinstance(obj, torch.Tensor) else to_runtime(obj)
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
