"""Quantization of an LSTM model (jisu.models.lstm): each 2-D matrix on its own, by RTN or by GPTQ
with the Hessian of that matrix's own inputs on the calibration text (layer after layer, a layer's
input computed by the layers below already quantized); the embedding and head as for decoders."""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import JisuError
from ..io.artifact_codec import Encoded
from ..models.lstm import EMBED, HEAD, PROJ, LSTMModel, b_hh, b_ih, linear_names, w_hh, w_ih
from . import gptq, rtn
from .measure import ReferenceLogprobs, log_probs_
from .observe import Stats, as_float, batches
from .pipeline import Quantized, _default_table, check_targets, quantize_rows
from .recipe import Recipe

METHODS = ("rtn", "gptq")


def check_lstm(cfg: ModelConfig, weights: dict, recipe: Recipe) -> None:
    """The recipe is one rtn or gptq step (+embed / +head) and every matrix fits its format."""
    q = recipe.quant
    if len(recipe.steps) != 1 or q.method not in METHODS or recipe.tune:
        raise JisuError(f"recipe {recipe.text!r}: an LSTM model is quantized by one rtn:FORMAT or gptq:FORMAT "
                        f"step (+embed / +head); awq, mixed, +tune and further steps are for decoders")
    check_targets(weights, recipe, [(n, q.fmt) for n in linear_names(cfg)])


def _layer(x: torch.Tensor, w_i: torch.Tensor, w_h: torch.Tensor, bias_i: torch.Tensor, bias_h: torch.Tensor):
    """One LSTM layer over x [S, T, in] from a zero state -> h [S, T, H] (torch.nn.LSTM's math)."""
    S, H = x.shape[0], w_h.shape[1]
    zeros = torch.zeros(1, S, H)
    return torch.lstm(x, (zeros, zeros), [w_i, w_h, bias_i, bias_h], True, 1, 0.0, False, False, True)[0]


def _stats(x: torch.Tensor, batch: int) -> torch.Tensor:
    acc = Stats()
    for sl in batches(x.shape[0], batch):
        acc(x[sl])
    return acc.H


def quantize_lstm(cfg: ModelConfig, weights: dict, recipe: Recipe, calib_ids: torch.Tensor | None = None, *,
                  progress: bool | None = None, batch: int = 8, encode: bool = False) -> Quantized:
    """Quantize `weights` (an LSTM's, float or packed; quantized entries are consumed) by `recipe`."""
    check_lstm(cfg, weights, recipe)
    progress = sys.stderr.isatty() if progress is None else progress
    q, t0 = recipe.quant, time.perf_counter()
    out = Quantized(cfg, {}, {})

    def store(name: str, fmt, w_fp=None, H=None) -> None:
        out.specs[name] = q.fmt
        if H is not None:
            err = float(gptq.layer_error(w_fp, fmt.dequantize(), H).sum())
            rtn_err = float(gptq.layer_error(w_fp, rtn.quantize(w_fp, q.fmt).dequantize(), H).sum())
            out.layers[name] = {"format": q.fmt.name, "err": err, "rtn_err": rtn_err}
        out.tensors[name] = Encoded.of(name, fmt) if encode else fmt
        weights.pop(name, None)

    head_h = None
    if q.method == "rtn":
        for name in linear_names(cfg):
            store(name, rtn.quantize(as_float(weights[name]), q.fmt))
    else:
        if calib_ids is None:
            raise JisuError(f"recipe {recipe.text!r} needs calibration data")
        head_h = _gptq_matrices(cfg, weights, q, calib_ids, store, batch, progress, want_head=recipe.head is not None)
    _tables(cfg, weights, recipe, out, head_h)
    for name, t in weights.items():      # the biases (and anything else) as in the source
        if name not in out.tensors and not (name == HEAD and cfg.tie_embeddings):
            out.tensors[name] = t if isinstance(t, torch.Tensor) else as_float(t)
    out.info["quantize_s"] = time.perf_counter() - t0
    return out


def _gptq_matrices(cfg, weights, q, ids, store, batch, progress, want_head):
    """GPTQ of every matrix: W_ih on the layer's input, W_hh on the layer's previous h (from the float
    layer), the projection on the top layer's h; each layer's output recomputed with its quantized
    matrices for the next. Returns the head's Hessian (or None)."""
    from tqdm import tqdm

    table = weights[EMBED]
    x = F.embedding(ids, table) if isinstance(table, torch.Tensor) else table.rows(ids)     # [S, T, D]
    with torch.no_grad():
        for i in tqdm(range(cfg.num_layers), desc=f"gptq {q.fmt.name}", unit="layer", disable=not progress):
            wi, wh = as_float(weights[w_ih(i)]), as_float(weights[w_hh(i)])
            bi, bh = as_float(weights[b_ih(i)]), as_float(weights[b_hh(i)])
            h = _layer(x, wi, wh, bi, bh)
            prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)   # W_hh's input: h of the step before
            H_x, H_h = _stats(x, batch), _stats(prev, batch)
            del h, prev
            fi = gptq.quantize_group([wi], H_x, [q.fmt], q)[0]
            fh = gptq.quantize_group([wh], H_h, [q.fmt], q)[0]
            store(w_ih(i), fi, wi, H_x)
            store(w_hh(i), fh, wh, H_h)
            x = _layer(x, fi.dequantize(), fh.dequantize(), bi, bh)
        if PROJ in weights:
            wp = as_float(weights[PROJ])
            H_p = _stats(x, batch)
            fp = gptq.quantize_group([wp], H_p, [q.fmt], q)[0]
            store(PROJ, fp, wp, H_p)
            x = F.linear(x, fp.dequantize())
        return _stats(x, batch) if want_head else None


def _tables(cfg, weights, recipe, out: Quantized, head_h) -> None:
    """The embedding and head: by +embed / +head (GPTQ for the head when calibrated), else int8
    group 32 (or the source's own format), a tied head following the embedding (as for decoders)."""
    from dataclasses import replace

    q = recipe.quant
    head_src = HEAD if (HEAD in weights and not cfg.tie_embeddings) else EMBED
    tie_same = recipe.embed is not None and recipe.head is not None and head_src == EMBED and recipe.embed == recipe.head
    if recipe.head is not None:
        w = as_float(weights[head_src])
        if head_h is not None:
            fmt = gptq.quantize_group([w], head_h, [recipe.head], q)[0]
        else:
            fmt = quantize_rows(weights[head_src], recipe.head)
        out.tensors[HEAD], out.specs[HEAD] = fmt, recipe.head
    if recipe.embed is not None:
        out.tensors[EMBED] = out.tensors[HEAD] if tie_same else quantize_rows(weights[EMBED], recipe.embed)
        out.specs[EMBED] = recipe.embed
        out.tied_head = tie_same
    if recipe.head is not None and head_src == EMBED:
        out.cfg = replace(cfg, tie_embeddings=False)   # the head is its own (quantized) tensor now
    if recipe.embed is None:
        _default_table(weights, EMBED, out)
    if recipe.head is None and head_src == HEAD:
        _default_table(weights, HEAD, out)


class LSTMReferenceLogprobs(ReferenceLogprobs):
    """The float LSTM's log-probs on the held-out chunks (packed source matrices decoded to float32),
    kept in an anonymous temporary file like the decoders' reference."""

    def __init__(self, cfg, weights: dict, chunks: torch.Tensor, folder: str | None = None, progress: bool = False):
        import tempfile

        self.chunks = chunks
        C, T = chunks.shape
        self._file = tempfile.TemporaryFile(dir=folder)
        model = LSTMModel(cfg, {n: as_float(t) for n, t in weights.items()})
        with torch.inference_mode():
            for c in range(C):
                lp = log_probs_(model(chunks[c:c + 1, :-1])[0][0])
                self._file.write(memoryview(lp.numpy()).cast("B"))
        self._file.flush()
        self.V = cfg.vocab_size
        self._shape = (T - 1, self.V)
