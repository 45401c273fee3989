"""`jisu export MODEL --format gguf`: check every input before any work, put the model's weights
on llama.cpp's grids (RTN, GPTQ onto the grids, or an artifact's own grid as it is), write the GGUF
next to OUT, check it in llama.cpp on held-out text, write the report card (OUT's stem +
.report.json) and only then move the file into place; a failed check leaves nothing behind."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch

from ..errors import JisuError, UnsupportedError
from . import mix
from .gguf import check_exportable, gguf_name, qk_rows, write_gguf
from .quantize import GridWeight, calibrated, from_format, natural_type, rtn

METHODS = ("rtn", "gptq")


@dataclass
class ExportOptions:
    qtype: str | None = None     # None: the artifact's own grid, else Q4_K_M
    recipe: str | None = None    # "rtn" | "gptq" (a jisu recipe such as gptq:w4g32 counts by its method)
    calib: str | None = None
    samples: int = 64
    seq_len: int = 256
    eval_text: str | None = None
    chunks: int = 4
    ctx: int = 256
    max_kld: float | None = None
    force: bool = False
    check: bool = True
    threads: int | None = None
    progress: bool = False


@dataclass
class ExportResult:
    path: str
    card_path: str
    card: dict = field(default_factory=dict)

    def summary(self) -> str:
        c = self.card
        lines = [f"wrote {self.path} ({c['file_bytes'] / 1e6:.1f} MB, {c['type']}, {c['method']}; "
                 f"tensors: {c['tensor_types']})"]
        lc = c.get("llama_cpp", {})
        if lc.get("checked"):
            lines.append(f"llama.cpp on held-out text: KLD vs source {lc['vs_source']['kld']['mean']:.5f}, "
                         f"vs jisu on the same weights {lc['vs_jisu_export_weights']['kld']['mean']:.5f}; "
                         f"load warnings: {len(lc['load_warnings'])}")
        else:
            lines.append(f"not checked in llama.cpp: {lc.get('note', '')}")
        lines.append(f"report card: {self.card_path}")
        return "\n".join(lines)


def card_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".report.json"


def _method(recipe: str | None) -> str:
    m = (recipe or "rtn").split(":", 1)[0].strip().lower()
    if m not in METHODS:
        raise JisuError(f"--recipe {recipe}: export rounds by rtn or gptq onto llama.cpp's grids")
    return m


def _tokenizer_meta(src, vocab_size: int | None = None) -> dict:
    from ..io.artifact import GGUF_TOKENIZER, gguf_tokenizer_meta
    from .hf_tokenizer import hf_tokenizer_meta

    if src.kind == "gguf":
        return gguf_tokenizer_meta(src.path)
    p = os.path.join(src.path, GGUF_TOKENIZER)
    if src.kind == "artifact" and os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    if not os.path.isfile(os.path.join(src.path, "tokenizer.json")):
        raise UnsupportedError(f"{src.path}: no tokenizer.json or GGUF tokenizer metadata to export")
    meta = hf_tokenizer_meta(src.path)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    if vocab_size is not None and len(tokens) > vocab_size:
        raise UnsupportedError(f"{src.path}: the tokenizer has {len(tokens)} tokens, the embedding {vocab_size} rows")
    pad = range(len(tokens), vocab_size or len(tokens))  # llama.cpp wants one token per embedding row
    tokens += [f"[PAD{i}]" for i in pad]
    types += [5] * len(pad)  # unused
    return meta


def _config(src):
    from ..io.artifact import CONFIG, config_from_dict
    from ..io.gguf import GGUFFile, gguf_config
    from ..io.hf import hf_config, read_json

    if src.kind == "gguf":
        return gguf_config(GGUFFile(src.path))
    if src.kind == "artifact":
        p = os.path.join(src.path, CONFIG)
        return config_from_dict(read_json(p), p)
    return hf_config(src.path)


def _preflight(model, out: str, o: ExportOptions):
    """Every input problem as a one-line error before any work."""
    from ..io.sources import resolve

    if o.qtype is not None:
        mix.check_type(o.qtype)
    method = _method(o.recipe)
    if os.path.exists(out) and not o.force:
        raise JisuError(f"{out} exists (use --force to replace it)")
    if os.path.isdir(out):
        raise JisuError(f"{out} is a folder")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise JisuError(f"{parent}: no such folder")
    if o.max_kld is not None and not o.max_kld > 0:
        raise JisuError(f"--max-kld must be > 0 (got {o.max_kld})")
    src = resolve(model)
    cfg = _config(src)
    check_exportable(cfg, src.path)
    tok = _tokenizer_meta(src, cfg.vocab_size)
    if src.kind == "artifact" and o.recipe:
        raise JisuError(f"{src.path} is already quantized: --recipe needs an unquantized source")
    if method == "gptq":
        from ..io.text import check_counts, read_calibration

        check_counts(o.samples, o.seq_len)
        read_calibration(o.calib)
    for name, K in _matrices(cfg):
        t = mix.tensor_type(o.qtype or "Q8_0", name, K, cfg.num_layers, cfg.tie_embeddings)
        if K % 32:
            raise UnsupportedError(f"{src.path}: {name} has rows of {K}, which no GGUF block type holds ({t})")
    return src, cfg, tok, method


def _matrices(cfg):
    yield "token_embd.weight", cfg.hidden_size
    for i in range(cfg.num_layers):
        for n, K in (("attn_q", cfg.hidden_size), ("attn_k", cfg.hidden_size), ("attn_v", cfg.hidden_size),
                     ("attn_output", cfg.num_heads * cfg.head_dim), ("ffn_gate", cfg.hidden_size),
                     ("ffn_up", cfg.hidden_size), ("ffn_down", cfg.intermediate_size)):
            yield f"blk.{i}.{n}.weight", K


def _artifact_type(formats: dict) -> str:
    kinds = {type(f).__name__ + ("a" if getattr(f, "min", None) is not None else "")
             for n, f in formats.items() if n.startswith("model.layers.") and not isinstance(f, torch.Tensor)}
    for kind, t in (("Int4Weight", "Q4_0"), ("Int4Weighta", "Q4_1"), ("Int8Weight", "Q8_0")):
        if kinds == {kind}:
            return t
    raise JisuError("the artifact's weights are not all on one llama.cpp grid: choose the export's --type")


def _weights(src, cfg, o: ExportOptions, method: str):
    """(export type, HF name -> GridWeight or float tensor, fp32 source weights, notes)."""
    from ..io.sources import load_weights
    from ..models.layers import linear_names

    notes = []
    if src.kind == "artifact":
        from ..io.artifact import load_formats, read_manifest

        formats, same_as = load_formats(src.path)
        qtype = o.qtype or _artifact_type(formats)
        out, reference = {}, {}
        for name, f in formats.items():
            reference[name] = f if isinstance(f, torch.Tensor) else f.dequantize()
        for name, target in same_as.items():
            formats[name] = formats[target]
            reference[name] = reference[target]
        requant = []
        for name, f in formats.items():
            if isinstance(f, torch.Tensor) and f.dim() == 1 or name == "rope_freqs":
                out[name] = f
                continue
            g = gguf_name(name, cfg)
            t = mix.tensor_type(qtype, g, f.shape[1], cfg.num_layers, cfg.tie_embeddings)
            own = None if isinstance(f, torch.Tensor) else natural_type(f)
            if own is not None and (o.qtype is None or not name.startswith("model.layers.")):
                t = own  # the artifact's weights exactly (its embedding / head as compress stored them)
            gw = None if isinstance(f, torch.Tensor) else from_format(f, t)
            if gw is None:
                gw = rtn(reference[name], t)
                requant.append(name)
            out[name] = gw
        if requant:
            notes.append(f"{len(requant)} tensors are not on their llama.cpp grid in the artifact and were rounded "
                         f"onto it (e.g. {requant[0]})")
        src_path = read_manifest(src.path).get("source", {}).get("path")
        if src_path and os.path.exists(src_path):
            from ..io.sources import resolve

            _, reference, _ = load_weights(resolve(src_path), packed=False)
            notes.append(f"source for KLD: {src_path}")
        else:
            notes.append("the artifact's source is not on this machine: KLD 'vs source' is against the artifact")
        return qtype, out, reference, notes
    qtype = o.qtype or "Q4_K_M"
    _, weights, tokenizer = load_weights(src, packed=False)
    types = {}
    for name, w in weights.items():
        if w.dim() == 2 and name != "rope_freqs":
            types[name] = mix.tensor_type(qtype, gguf_name(name, cfg), w.shape[1], cfg.num_layers,
                                          cfg.tie_embeddings)
    out = {n: w for n, w in weights.items() if n not in types}
    lin = set(linear_names(cfg))
    if method == "gptq":
        from ..io.text import calibration_ids, read_calibration

        ids = calibration_ids(tokenizer, read_calibration(o.calib), o.samples, o.seq_len)
        out.update(calibrated(cfg, weights, {n: t for n, t in types.items() if n in lin}, ids,
                              progress=o.progress))
    for name, t in types.items():
        if name not in out:
            out[name] = rtn(weights[name], t)
    return qtype, out, weights, notes


def _tensors(cfg, weights: dict) -> list:
    rows = []
    for name, w in weights.items():
        g = gguf_name(name, cfg) if name != "rope_freqs" else "rope_freqs.weight"
        if g is None:
            continue
        perm = qk_rows(cfg, name)
        if isinstance(w, GridWeight):
            b = w.pack()
            rows.append((g, b if perm is None else b[perm.numpy()], w.qtype))
        else:
            t = w.float() if perm is None else w.float()[perm]
            rows.append((g, t.numpy(), "F32"))
    return rows


def export_gguf(model, out: str, options: ExportOptions | None = None) -> ExportResult:
    from collections import Counter

    from ..io.text import chunk_ids, encode_prefix, read_heldout
    from ..io.tokenizer import gguf_tokenizer
    from . import check

    o = options or ExportOptions()
    t0 = time.perf_counter()
    src, cfg, tok_meta, method = _preflight(model, out, o)
    heldout = read_heldout(o.eval_text)
    if o.threads:
        torch.set_num_threads(o.threads)
    qtype, weights, reference, notes = _weights(src, cfg, o, method)
    t_quant = time.perf_counter() - t0
    tmp = f"{out}.tmp-{os.getpid()}"
    card_tmp = card_path(out) + f".tmp-{os.getpid()}"
    try:
        write_gguf(tmp, cfg, tok_meta, _tensors(cfg, weights), file_type=mix.FTYPES[qtype],
                   name=os.path.splitext(os.path.basename(out))[0])
        tokenizer = gguf_tokenizer(tok_meta, src.path)
        chunks, note = chunk_ids(encode_prefix(tokenizer.encode, heldout.text, o.chunks * o.ctx), o.chunks, o.ctx,
                                 heldout.name)
        if note:
            notes.append(note)
        eff = {n: (w.dequantize() if isinstance(w, GridWeight) else w) for n, w in weights.items()}
        src_lp = check.jisu_log_probs(cfg, reference, chunks)
        exp_lp = check.jisu_log_probs(cfg, eff, chunks)
        card = {"format": "gguf", "path": os.path.abspath(out), "source": src.path, "type": qtype, "method": method,
                "file_bytes": os.path.getsize(tmp),
                "tensor_types": dict(Counter(w.qtype if isinstance(w, GridWeight) else "F32"
                                             for n, w in weights.items() if gguf_name(n, cfg) or n == "rope_freqs")),
                "heldout_text": heldout.name, "chunks": len(chunks), "ctx": o.ctx,
                "jisu_export_weights_vs_source": check._score(src_lp, exp_lp), "notes": notes}
        card["llama_cpp"] = (check.check_gguf(tmp, chunks, src_lp, exp_lp, o.threads) if o.check else
                             {"checked": False, "note": "check skipped on request"})
        card["seconds"] = {"quantize": t_quant, "total": time.perf_counter() - t0}
        lc = card["llama_cpp"]
        kld = (lc["vs_source"] if lc.get("checked") else card["jisu_export_weights_vs_source"])["kld"]["mean"]
        if o.max_kld is not None and kld > o.max_kld:
            raise JisuError(f"export refused: KLD vs the source {kld:.5f} is above --max-kld {o.max_kld} "
                            f"(nothing written)")
        with open(card_tmp, "w", encoding="utf-8") as f:
            json.dump(card, f, indent=1)
            f.write("\n")
        os.replace(tmp, out)
        os.replace(card_tmp, card_path(out))
    except BaseException:
        for p in (tmp, card_tmp):
            if os.path.exists(p):
                os.remove(p)
        raise
    return ExportResult(out, card_path(out), card)

