"""`jisu export MODEL --format onnx -o DIR`: the decoder as an ONNX graph with KV-cache inputs and
outputs (fp32, fp16, or int8 / int4 linears through onnxruntime's MatMulNBits, RTN or GPTQ onto
the grid), checked in onnxruntime on held-out text before DIR is put in place."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import torch

from ..errors import JisuError, UnsupportedError
from ..models.layers import EMBED, HEAD, linear_names
from .quantize import GridWeight, calibrated, from_format, rtn
from .run import ExportOptions, ExportResult

TYPES = {"fp32": None, "fp16": None, "int8": "Q8_0", "int4": "Q4_0"}  # --type -> grid of the linears
MODEL_FILE, CARD = "model.onnx", "report.json"
INLINE_LIMIT = 1_500_000_000  # larger graphs keep their weights in model.onnx.data (protobuf's 2 GB cap)


class OnnxOptions(ExportOptions):
    """ExportOptions for the ONNX export: `qtype` is fp32 | fp16 | int8 | int4 (None: an artifact's
    own grid, else int4); `recipe` rtn | gptq."""


class OnnxResult(ExportResult):
    """ExportResult whose report card holds the onnxruntime check."""

    def summary(self) -> str:
        c = self.card
        lines = [f"wrote {self.path} ({c['file_bytes'] / 1e6:.1f} MB, {c['type']}, {c['method']})"]
        rt = c.get("onnxruntime", {})
        if rt.get("checked"):
            lines.append(f"onnxruntime on held-out text: KLD vs source {rt['vs_source']['kld']['mean']:.5f}, "
                         f"vs jisu on the same weights {rt['vs_jisu_export_weights']['kld']['mean']:.5f}; "
                         f"KV-cache steps vs one pass: max |dlogit| {rt['kv_cache_max_abs_diff']:.2e}")
        else:
            lines.append(f"not checked in onnxruntime: {rt.get('note', '')}")
        lines.append(f"report card: {self.card_path}")
        return "\n".join(lines)


def _preflight(model, out: str, o: OnnxOptions):
    from ..io.sources import resolve
    from .onnx_graph import check_graphable
    from .run import _config, _method

    if o.qtype is not None and o.qtype not in TYPES:
        raise JisuError(f"--type {o.qtype}: not an ONNX export type (one of {', '.join(TYPES)})")
    method = _method(o.recipe)
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise JisuError("the ONNX export needs the onnx package: pip install 'jisu[onnx]'") from None
    if os.path.exists(out) and not o.force:
        raise JisuError(f"{out} exists (use --force to replace it)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise JisuError(f"{out} is a file: the ONNX export writes a folder")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise JisuError(f"{parent}: no such folder")
    if o.max_kld is not None and not o.max_kld > 0:
        raise JisuError(f"--max-kld must be > 0 (got {o.max_kld})")
    src = resolve(model)
    cfg = _config(src)
    check_graphable(cfg, src.path)
    if src.kind == "artifact" and o.recipe:
        raise JisuError(f"{src.path} is already quantized: --recipe needs an unquantized source")
    if method == "gptq":
        from ..io.text import check_counts, read_calibration

        if TYPES.get(o.qtype or "int4") is None:
            raise JisuError(f"--recipe gptq rounds onto int8 / int4 grids, not {o.qtype}")
        check_counts(o.samples, o.seq_len)
        read_calibration(o.calib)
    if TYPES.get(o.qtype or "int4") is not None:
        for k in {cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size, *cfg.intermediate_sizes}:
            if k % 32:
                raise UnsupportedError(f"{src.path}: rows of {k} weights do not split into MatMulNBits' blocks of 32")
    return src, cfg, method


def _artifact_weights(src, cfg, o: OnnxOptions):
    """An artifact's weights: its int8 / int4 group-32 linears exactly as stored, others rounded."""
    from ..io.artifact import load_formats, read_manifest
    from ..io.sources import load_weights, resolve
    from .quantize import natural_type

    formats, same_as = load_formats(src.path)
    for name, target in same_as.items():
        formats[name] = formats[target]
    lin = set(linear_names(cfg))
    qtype = o.qtype
    if qtype is None:
        grids = {natural_type(f) for n, f in formats.items() if n in lin and not isinstance(f, torch.Tensor)}
        qtype = {"Q8_0": "int8", "Q4_0": "int4"}.get(grids.pop() if len(grids) == 1 else None)
        if qtype is None:
            raise JisuError(f"{src.path}: its linears are not all int8 or int4-symmetric group 32: choose --type")
    grid = TYPES[qtype]
    out, notes = {}, []
    for name, f in formats.items():
        deq = f if isinstance(f, torch.Tensor) else f.dequantize()
        gw = None
        if grid is not None and name in lin:
            gw = None if isinstance(f, torch.Tensor) else from_format(f, grid)
            if gw is None:
                gw = rtn(deq, grid)
                notes.append(f"{name} was rounded onto {grid}")
        out[name] = gw if gw is not None else deq
    src_path = read_manifest(src.path).get("source", {}).get("path")
    reference = {n: (w.dequantize() if isinstance(w, GridWeight) else w) for n, w in out.items()}
    if src_path and os.path.exists(src_path):
        _, reference, _ = load_weights(resolve(src_path), packed=False)
        notes.append(f"source for KLD: {src_path}")
    else:
        notes.append("the artifact's source is not on this machine: KLD 'vs source' is against the artifact")
    return qtype, out, reference, notes[:5]


def _weights(src, cfg, o: OnnxOptions, method: str):
    """(type, HF name -> float tensor or GridWeight, source weights, notes)."""
    from ..io.sources import load_weights

    if src.kind == "artifact":
        return _artifact_weights(src, cfg, o)
    qtype = o.qtype or "int4"
    grid = TYPES[qtype]
    _, weights, tokenizer = load_weights(src, packed=False)
    weights = {n: w.float() if isinstance(w, torch.Tensor) and w.is_floating_point() else w for n, w in weights.items()}
    out = dict(weights)
    if grid is not None:
        lin = linear_names(cfg)
        if method == "gptq":
            from ..io.text import calibration_ids, read_calibration

            ids = calibration_ids(tokenizer, read_calibration(o.calib), o.samples, o.seq_len)
            out.update(calibrated(cfg, weights, {n: grid for n in lin}, ids, progress=o.progress))
        else:
            out.update({n: rtn(weights[n], grid) for n in lin})
        if HEAD in weights and not cfg.tie_embeddings and weights[HEAD] is not weights.get(EMBED):
            out[HEAD] = rtn(weights[HEAD], "Q8_0")  # an untied head at int8, as GGUF keeps it at 6-8 bits
    return qtype, out, weights, []


def _effective(weights: dict, fp16: bool) -> dict:
    """What the graph computes with, as float32 tensors (jisu's reference runs these)."""
    out = {}
    for n, w in weights.items():
        if isinstance(w, GridWeight):
            out[n] = w.dequantize()
        elif fp16 and isinstance(w, torch.Tensor) and w.is_floating_point() and n != "rope_freqs":
            out[n] = w.to(torch.float16).float()
        else:
            out[n] = w
    return out


def session(path: str, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_onnx(sess, cfg, ids: list[int], past: dict | None = None, start: int = 0):
    """Logits [T, V] of `ids` after a cache of `start` positions (past: the present.* of the last call)."""
    t = len(ids)
    feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, start + t), np.int64),
            "position_ids": np.arange(start, start + t, dtype=np.int64)[None]}
    for i in range(cfg.num_layers):
        kv = cfg.heads(i)[1]
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = (past[f"present.{i}.{kind}"] if past else
                                                   np.zeros((1, kv, 0, cfg.head_dim), np.float32))
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feed)))
    return torch.from_numpy(outs["logits"][0]), outs


def check_onnx(path: str, cfg, chunks: list, source_lp: list, export_lp: list, threads: int | None = None) -> dict:
    """The report card's "onnxruntime" part: KLD against jisu's source and its run of the exported
    weights, and the largest logit difference between KV-cache steps and one pass over a chunk."""
    from ..eval import quality
    from .check import _score

    try:
        import onnxruntime as ort
    except ImportError:
        return {"checked": False, "note": "onnxruntime is not installed (pip install 'jisu[onnx]')"}
    sess = session(path, threads)
    lps, full = [], None
    for c in chunks:
        logits, _ = run_onnx(sess, cfg, list(c))
        full = full if full is not None else logits
        lps.append(quality.log_probs(logits[:-1]))
    c = list(chunks[0])
    split = max(1, len(c) - 4)
    step, past = run_onnx(sess, cfg, c[:split])
    pieces = [step]
    for j in range(split, len(c)):
        step, past = run_onnx(sess, cfg, [c[j]], past, j)
        pieces.append(step)
    diff = float((torch.cat(pieces) - full).abs().max())
    return {"checked": True, "onnxruntime_version": ort.__version__, "vs_source": _score(source_lp, lps),
            "vs_jisu_export_weights": _score(export_lp, lps), "kv_cache_max_abs_diff": diff}


def _save(model, folder: str, size: int) -> None:
    import onnx

    path = os.path.join(folder, MODEL_FILE)
    if size > INLINE_LIMIT:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=MODEL_FILE + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, path)


def export_onnx(model, out: str, options: OnnxOptions | None = None) -> OnnxResult:
    from ..io.artifact import config_to_dict, write_json, write_tokenizer
    from ..io.text import chunk_ids, encode_prefix, read_heldout
    from . import check
    from .onnx_graph import DecoderGraph

    o = options or OnnxOptions()
    t0 = time.perf_counter()
    src, cfg, method = _preflight(model, out, o)
    heldout = read_heldout(o.eval_text)
    if o.threads:
        torch.set_num_threads(o.threads)
    qtype, weights, reference, notes = _weights(src, cfg, o, method)
    fp16 = qtype != "fp32"
    t_quant = time.perf_counter() - t0
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        graph = DecoderGraph(cfg, weights, fp16).build(os.path.basename(os.path.abspath(out)))
        _save(graph, tmp, sum(len(t.raw_data) for t in graph.graph.initializer))
        del graph
        write_json(os.path.join(tmp, "config.json"), config_to_dict(cfg))
        tok_files = write_tokenizer(tmp, src.kind, src.path)
        tokenizer = _tokenizer(src)
        chunks, note = chunk_ids(encode_prefix(tokenizer.encode, heldout.text, o.chunks * o.ctx), o.chunks, o.ctx,
                                 heldout.name)
        if note:
            notes.append(note)
        src_lp = check.jisu_log_probs(cfg, reference, chunks)
        exp_lp = check.jisu_log_probs(cfg, _effective(weights, fp16), chunks)
        files = {f: os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)}
        card = {"format": "onnx", "path": os.path.abspath(out), "source": src.path, "type": qtype, "method": method,
                "file_bytes": sum(v for f, v in files.items() if f.startswith(MODEL_FILE)), "files": files,
                "tokenizer_files": tok_files, "heldout_text": heldout.name, "chunks": len(chunks), "ctx": o.ctx,
                "jisu_export_weights_vs_source": check._score(src_lp, exp_lp), "notes": notes}
        card["onnxruntime"] = (check_onnx(os.path.join(tmp, MODEL_FILE), cfg, chunks, src_lp, exp_lp, o.threads)
                               if o.check else {"checked": False, "note": "check skipped on request"})
        card["seconds"] = {"quantize": t_quant, "total": time.perf_counter() - t0}
        rt = card["onnxruntime"]
        kld = (rt["vs_source"] if rt.get("checked") else card["jisu_export_weights_vs_source"])["kld"]["mean"]
        if o.max_kld is not None and kld > o.max_kld:
            raise JisuError(f"export refused: KLD vs the source {kld:.5f} is above --max-kld {o.max_kld} "
                            f"(nothing written)")
        with open(os.path.join(tmp, CARD), "w", encoding="utf-8") as f:
            json.dump(card, f, indent=1)
            f.write("\n")
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return OnnxResult(out, os.path.join(out, CARD), card)


def _tokenizer(src):
    """The source's tokenizer (without loading its weights)."""
    from ..io.artifact import gguf_tokenizer_meta, load_tokenizer
    from ..io.tokenizer import gguf_tokenizer, load_hf_tokenizer

    if src.kind == "gguf":
        return gguf_tokenizer(gguf_tokenizer_meta(src.path), src.path)
    return load_tokenizer(src.path) if src.kind == "artifact" else load_hf_tokenizer(src.path)
