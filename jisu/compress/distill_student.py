"""`jisu distill TEACHER -o OUT --student lstm:layers=2,hidden=768`: a new small student (the LSTM of
jisu.models.lstm) trained on a text against the teacher's cached next-token distributions, or with
plain cross-entropy (`no_teacher`, the baseline), and written as a jisu artifact."""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Optional

import torch

from ..errors import JisuError
from .distill import DistillConfig, distill, heldout_perplexity
from .distill_cache import TOP_K, decoder_teacher, teacher_targets, weights_fingerprint
from .distill_step import split_heldout

STUDENT_LR = 1e-3   # Adam on a fresh LSTM (its embedding starts as the teacher's); 2e-3 spiked held-out perplexity to 1e8-1e9 early on


def _student_spec(student: str, teacher_cfg, teacher_path: str):
    """(spec or None, an existing student's (cfg, weights) or None): a spec text, or the folder of an
    LSTM artifact to train further, whose vocabulary must be the teacher's."""
    from ..io.student import check_student_vocab
    from ..models.lstm import parse_student

    if isinstance(student, str) and os.path.isdir(student):
        from ..io.sources import load_weights, resolve

        src = resolve(student)
        cfg, w, _ = load_weights(src)
        if cfg.arch != "lstm":
            raise JisuError(f"--student {student}: not an LSTM student (architecture {cfg.arch})")
        check_student_vocab(cfg, resolve(teacher_path), teacher_cfg)
        return None, (cfg, w)
    return parse_student(student), None


def distill_student(teacher: Optional[str], out: str, student: str, *, minutes: Optional[float] = None,
                    tokens: Optional[int] = None, text: Optional[str] = None, samples: int = 64, seq_len: int = 256,
                    no_teacher: bool = False, force: bool = False, lr: float = STUDENT_LR, seed: int = 0,
                    threads: Optional[int] = None, progress: Optional[bool] = None, evaluate_every: Optional[float] = None,
                    gen: int = 0) -> dict:
    """Train a student on `text` (default: the built-in calibration text) cut into `samples` windows of
    `seq_len` tokens (the last eighth held out for the perplexity curve) for the budget (CPU-minutes
    and / or tokens), against the teacher's top-k + rest distributions (cached on disk), or with
    cross-entropy alone when `no_teacher`; write it to `out`. `gen` windows of text the teacher writes
    itself (distill_gen.py) join the training windows (both modes: the baseline sees the same tokens). Every input problem is one JisuError
    before any work, and nothing is written then. Returns the figures (also in the manifest)."""
    from ..io.sources import resolve
    from ..io.student import save_student, source_config
    from ..io.text import calibration_ids, check_counts, read_calibration, read_text
    from .run import check_output, work_path

    t0 = time.perf_counter()
    progress = sys.stderr.isatty() if progress is None else progress
    config = DistillConfig(minutes=minutes, tokens=tokens, kl_weight=0.0 if no_teacher else 1.0,
                           ce=1.0 if no_teacher else 0.0, lr=lr, threads=threads, eval_every=evaluate_every)
    check_counts(samples, seq_len)
    if samples < 2:
        raise JisuError(f"--samples must be >= 2 (one window is held out; got {samples})")
    if isinstance(gen, bool) or not isinstance(gen, int) or gen < 0:
        raise JisuError(f"--gen must be a whole number >= 0 (got {gen!r})")
    body = read_text(text, "text") if text is not None else read_calibration(None)
    source = resolve(teacher)
    out_abs = check_output(out, source.path, force)
    tcfg = source_config(source)
    spec, existing = _student_spec(student, tcfg, source.path)
    if seq_len > tcfg.max_position:
        raise JisuError(f"--seq-len {seq_len} is longer than the teacher's context ({tcfg.max_position})")
    if threads is not None:
        torch.set_num_threads(threads)

    # the work: the teacher's weights, the windows, the targets, the loop
    from .steps import dense_float
    from .stream import load_streamed

    if source.kind in ("gguf", "hf"):
        cfg, weights, tokenizer = load_streamed(source, progress=progress)
    else:
        from ..io.sources import load_weights

        cfg, weights, tokenizer = load_weights(source, progress=progress, packed=True)
    ids = calibration_ids(tokenizer, body, samples, seq_len)
    train_ids, held_ids = split_heldout(ids)
    from ..models.layers import EMBED
    from ..models.lstm import LSTMModel, student_from_teacher

    torch.manual_seed(seed)
    model = (LSTMModel(*existing) if existing is not None else
             student_from_teacher(spec, cfg, weights[EMBED] if isinstance(weights[EMBED], torch.Tensor)
                                  else weights[EMBED].dequantize()))
    targets, cinfo, ginfo = None, {"cached": None}, None
    if not no_teacher or gen:
        teacher_w = dense_float(weights)
        del weights
        tid = weights_fingerprint(cfg, teacher_w)
        if gen:
            from .distill_gen import teacher_windows

            gen_ids, ginfo = teacher_windows(cfg, teacher_w, tokenizer, tid, gen, seq_len, progress=progress)
            train_ids = torch.cat([gen_ids, train_ids])
        if not no_teacher:
            targets, cinfo = teacher_targets(tid, train_ids, decoder_teacher(cfg, teacher_w), k=TOP_K, progress=progress)
        del teacher_w
    else:
        del weights
    work = work_path(out_abs)
    os.makedirs(work, exist_ok=True)
    sig = f"{model.spec.text} {seed} {config} {samples}x{seq_len} {body.sha256} {source.path} gen={gen}"
    info = distill(model, train_ids, targets, config, checkpoint_path=os.path.join(work, "distill.pt"), signature=sig,
                   progress=progress, evaluate=lambda: heldout_perplexity(model, held_ids))
    ppl = info["curve"][-1]["value"]
    meta = {"teacher": None if no_teacher else os.path.abspath(source.path), "mode": "cross-entropy" if no_teacher
            else "distilled", "student": model.spec.text, "text": body.name, "text_sha256": body.sha256,
            "windows": int(train_ids.shape[0]), "heldout_windows": int(held_ids.shape[0]), "seq_len": seq_len,
            "budget": {"minutes": minutes, "tokens": tokens}, "lr": lr, "top_k": None if no_teacher else TOP_K,
            "targets_cached": cinfo["cached"], "teacher_text": ginfo, "heldout_perplexity": ppl, **info,
            "total_wall_minutes": (time.perf_counter() - t0) / 60.0}
    save_student(model, out_abs, tokenizer_from=source.path, meta=meta)
    shutil.rmtree(work, ignore_errors=True)
    return {"path": out_abs, **meta}
