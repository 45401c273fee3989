"""The compress command's orchestration and its safety rules.

- every input problem (recipe, counts, calibration / evaluation text, model, OUT) fails with one
  line before any quantization work;
- OUT is never written in place: the artifact is built in `.OUT.tmp-<pid>` next to OUT, re-opened,
  every sha256 checked, loaded and measured, and only then renamed to OUT;
- an existing OUT, or an OUT that is (or contains) the input, is refused without `force`; with
  `force` the old OUT is replaced only at that final rename;
- `max_kld`: a result whose measured KLD is above it is discarded (nothing written);
- any failure removes the temporary folder; the input is only ever read.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import sys
import time

import torch

from ..errors import JisuError
from ..memory import fixed_mmap_threshold, peak_rss_bytes, trim_heap
from ..io.artifact import replace_folder, sha256_file
from ..io.text import calibration_ids, heldout_ids, read_calibration, read_heldout
from .config import CompressConfig, CompressResult
from .pipeline import check_model, quantize_model
from .recipe import parse_recipe
from .steps import StepContext, Teacher, check_steps, dense_float, run_steps
from .stream import source_bytes

LINEAR_SUFFIXES = tuple(f"{s}.weight" for s in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"))
LSTM_MATRIX = re.compile(r"^model\.lstm\.weight_(ih|hh)_l\d+$|^model\.proj\.weight$")   # an LSTM's linears


def temp_path(out: str) -> str:
    parent, base = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{base}.tmp-{os.getpid()}")


def check_output(out, source_path: str, force: bool) -> str:
    """Absolute OUT after the refusal rules (exists / is or contains the input / no parent folder)."""
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise JisuError("compress: an output folder is required (-o OUT)")
    out_abs = os.path.abspath(str(out))
    parent = os.path.dirname(out_abs)
    if not os.path.isdir(parent):
        raise JisuError(f"{out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise JisuError(f"{out}: cannot write in {parent}")
    src = os.path.realpath(source_path)
    real = os.path.realpath(out_abs)
    if not force:
        if real == src or src.startswith(real.rstrip(os.sep) + os.sep):
            raise JisuError(f"{out}: is the input model{'' if real == src else ' or contains it'}; refusing to "
                            f"write over it (use --force to replace it once the new artifact is verified)")
        if os.path.lexists(out_abs):
            raise JisuError(f"{out}: already exists; use --force to replace it")
    return out_abs


def work_path(out: str) -> str:
    """The transform steps' work folder (checkpoints), next to OUT; it outlives a crash, so that a
    rerun of the same command resumes, and is removed once OUT is written."""
    parent, base = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{base}.work")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def commit(tmp: str, out: str, force: bool) -> None:
    """Rename the finished artifact into place (the old OUT, with force, goes only now)."""
    if os.path.lexists(out) and not force:
        raise JisuError(f"{out}: appeared while compressing; left as it is (use --force to replace it)")
    replace_folder(tmp, out)


def _source_formats(source, cfg, tensors: dict) -> None:
    """Tensors the recipe leaves alone but the source holds quantized (a GGUF's Q8_0 embedding,
    an artifact's quantized head) are stored in the source's own format, without loss; anything
    without a known format is stored as float32."""
    packed = [n for n, t in tensors.items() if not isinstance(t, torch.Tensor) and hasattr(t, "linear")]
    if not packed:
        return
    found = {}
    if source.kind == "gguf":
        from ..io.gguf import GGUFFile, hf_name
        from ..io.gguf_packed import gguf_format

        g = GGUFFile(source.path)
        for gname, t in g.tensors.items():
            name = hf_name(gname, cfg.arch)
            if name in packed:
                found[name] = gguf_format(t)
    elif source.kind == "artifact":
        from ..io.artifact import load_formats

        formats, _ = load_formats(source.path)
        found = {n: formats[n] for n in packed if n in formats and not isinstance(formats[n], torch.Tensor)}
    for name in packed:
        fmt = found.get(name)
        if fmt is None or not _same_rows(fmt, tensors[name]):
            fmt = tensors[name].dequantize()
        tensors[name] = fmt


def _same_rows(fmt, packed, rows: int = 256) -> bool:
    """The format decodes to the packed weight's values (checked on a sample of rows)."""
    from ..kernels.packed import pack

    n = min(rows, fmt.shape[0])
    idx = torch.linspace(0, fmt.shape[0] - 1, n).long()
    try:
        part = pack(_take_rows(fmt, idx))
    except (TypeError, ValueError):
        return False
    return torch.equal(part.dequantize(), packed.rows(idx))


def _take_rows(fmt, idx):
    import copy

    out = copy.copy(fmt)
    for field in ("q", "idx", "scale", "min", "codebook"):
        t = getattr(out, field, None)
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == fmt.shape[0]:
            setattr(out, field, t[idx].contiguous())
    return out


def source_sha256(path: str) -> tuple[str, dict]:
    """sha256 of a model file, or of a folder's files (sha256 over 'name sha' lines) + per file."""
    if os.path.isfile(path):
        return sha256_file(path), {}
    files = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and not name.startswith("."):
            files[name] = sha256_file(full)
    combined = hashlib.sha256("".join(f"{n} {s}\n" for n, s in files.items()).encode()).hexdigest()
    return combined, files


def bits_summary(tensors: dict) -> tuple[dict, dict]:
    total_b = total_n = lin_b = lin_n = 0
    for name, e in tensors.items():
        if "same_as" in e:
            continue
        n = math.prod(e["shape"])
        total_b += e["bytes"]
        total_n += n
        if name.endswith(LINEAR_SUFFIXES) or LSTM_MATRIX.search(name):
            lin_b += e["bytes"]
            lin_n += n
    bpw = {"total": total_b * 8 / total_n if total_n else 0.0, "linear": lin_b * 8 / lin_n if lin_n else 0.0}
    params = {"total": total_n, "linear": lin_n, "weight_bytes": total_b, "linear_bytes": lin_b}
    return bpw, params


def run(model, out, recipe, config: CompressConfig) -> CompressResult:
    from ..io import artifact
    from ..io.sources import load_weights, resolve

    t0 = time.perf_counter()
    c = config
    rec = parse_recipe(recipe)
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    progress = sys.stderr.isatty() if c.progress is None else c.progress
    calib_text = read_calibration(c.calib) if (c.calib is not None or rec.needs_calibration) else None
    held = read_heldout(c.eval_text) if c.evaluate else None
    source = resolve(model)
    out_abs = check_output(out, source.path, c.force)

    fixed_mmap_threshold()  # large temporaries go back to the OS when freed (see jisu.memory)
    # a GGUF's or HF folder's matrices stay in the file until their turn (jisu.compress.stream); an
    # artifact's stay packed: no float32 copy of the whole model is ever held
    if source.kind in ("gguf", "hf"):
        from .stream import load_streamed

        cfg, weights, tokenizer = load_streamed(source, progress=progress)
    else:
        cfg, weights, tokenizer = load_weights(source, progress=progress, packed=True)
    lstm = cfg.arch == "lstm"   # a recurrent model: its own matrices and reference (compress/lstm.py)
    if lstm:
        from .lstm import LSTMReferenceLogprobs, check_lstm, quantize_lstm

        if rec.before or rec.after:
            raise JisuError(f"recipe {rec.text!r}: an LSTM model takes a quantization step only")
    (check_lstm if lstm else check_model)(cfg, weights, rec)
    check_steps(rec.before + rec.after, cfg)
    calib_ids = None
    if rec.needs_calibration:
        if c.seq_len > cfg.max_position:
            raise JisuError(f"--seq-len {c.seq_len} is longer than the model's context ({cfg.max_position})")
        calib_ids = calibration_ids(tokenizer, calib_text, c.samples, c.seq_len)
    eval_ids, notes = (heldout_ids(tokenizer, held, c.eval_chunks, min(c.eval_ctx, cfg.max_position))
                       if c.evaluate else (None, []))
    src_sha, src_files = source_sha256(source.path)
    t_prep = time.perf_counter() - t0

    tmp = temp_path(out_abs)
    _remove(tmp)
    os.mkdir(tmp)
    ref = None
    try:
        t1 = time.perf_counter()
        if c.evaluate:  # the source's log-probs now, while its weights are in memory anyway
            from .measure import ReferenceLogprobs

            ref = (LSTMReferenceLogprobs if lstm else ReferenceLogprobs)(
                cfg, weights, eval_ids, folder=os.path.dirname(out_abs), progress=progress)
            trim_heap(collect=True)
        t_ref = time.perf_counter() - t1
        t1 = time.perf_counter()
        ctx = None
        if rec.before or rec.after:  # transform steps: the model in float32, the source kept as the teacher
            teacher = Teacher(cfg, dense_float(weights))
            del weights
            ctx = StepContext(cfg, dict(teacher.weights), teacher, calib_ids, tokenizer, workdir=work_path(out_abs),
                              progress=progress, threads=c.threads)
            run_steps(rec.before, ctx)
            cfg, weights = ctx.cfg, ctx.weights
            ctx.weights = None
            check_model(cfg, weights, rec)
        qz = (quantize_lstm if lstm else quantize_model)(cfg, weights, rec, calib_ids, progress=progress,
                                                         encode=not (rec.tune or rec.after))
        if ctx is not None:
            ctx.cfg, ctx.quantized = qz.cfg, qz
            run_steps(rec.after, ctx)
            qz = ctx.quantized
            ctx.teacher = None
        t_quant = time.perf_counter() - t1
        del weights
        trim_heap(collect=True)
        _source_formats(source, cfg, qz.tensors)
        base = {
            "source": {"path": os.path.abspath(source.path), "kind": source.kind, "name": source.name,
                       "sha256": src_sha, **({"files": src_files} if src_files else {})},
            "recipe": rec.to_dict(),
            "calibration": (None if calib_ids is None else
                            {"text": calib_text.name, "text_sha256": calib_text.sha256, "samples": c.samples,
                             "seq_len": c.seq_len, "tokens": int(calib_ids.numel())}),
        }
        t1 = time.perf_counter()
        m = artifact.write_artifact(tmp, qz.cfg, qz.tensors, base, source_kind=source.kind, source_path=source.path,
                                    same_as={"lm_head.weight": "model.embed_tokens.weight"} if qz.tied_head else None)
        t_write = time.perf_counter() - t1
        layers, info = qz.layers, qz.info
        del qz
        trim_heap(collect=True)

        # re-open: every sha256, then load it as `jisu.load` would and measure it against the source
        t1 = time.perf_counter()
        artifact.verify_artifact(tmp)
        quality = _measure(ref, tmp, eval_ids, progress) if c.evaluate else _load_check(tmp)
        t_measure = time.perf_counter() - t1 + t_ref
        if quality is not None:
            quality["text"] = held.name
            quality["notes"] = notes
        if c.max_kld is not None and quality["kld_mean"] > c.max_kld:
            raise JisuError(f"{out}: measured KLD {quality['kld_mean']:.4f} is above --max-kld {c.max_kld}; "
                            f"nothing written")
        bpw, params = bits_summary(m["tensors"])
        m["sizes"]["source"] = source_bytes(source.path)
        if ctx is not None:
            m["steps"] = ctx.log
        m.update({"bits_per_weight": bpw, "params": params, "quality": quality, "layers": layers,
                  "quantize_info": info,
                  "timings": {"prepare_s": t_prep, "quantize_s": t_quant, "write_s": t_write, "verify_measure_s": t_measure,
                              "total_s": time.perf_counter() - t0},
                  "peak_rss_bytes": peak_rss_bytes()})
        artifact.write_json(os.path.join(tmp, artifact.MANIFEST), m)
        artifact.verify_artifact(tmp)
        commit(tmp, out_abs, c.force)
        _remove(work_path(out_abs))  # the steps' checkpoints: done with
    except BaseException:
        _remove(tmp)
        raise
    finally:
        if ref is not None:
            ref.close()
    return CompressResult(out_abs, m)


def _load_check(folder: str):
    from ..api import load

    load(folder)
    return None


def _measure(ref, folder: str, eval_ids, progress) -> dict:
    """Load the artifact as `jisu.load` does and compare it with the source's log-probs."""
    from ..api import load
    from .measure import compare

    q = load(folder)
    trim_heap(collect=True)
    return compare(ref, q.runner, eval_ids, progress=progress)
