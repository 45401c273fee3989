"""`jisu eval`: perplexity of MODEL on a text and, against a reference model, per-token
KL(ref || model), top-1 agreement and delta perplexity. Reference log-probs are cached on disk."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from ..errors import JisuError
from . import quality
from ..io.text import Text, chunk_ids, encode_prefix, read_text
from .refcache import RefStore, cache_key, default_cache_dir


@dataclass
class QualityResult:
    """What `jisu eval` measured. Keys of `to_dict()` are stable (see docs/report_card.md)."""
    model: str
    model_path: str
    model_format: str                          # storage of MODEL's matrices as run, e.g. "PackedInt", "float32"
    text: str
    text_sha256: str
    chunks: int
    ctx: int
    tokens_scored: int
    perplexity: float
    reference: str | None = None
    reference_path: str | None = None
    reference_perplexity: float | None = None
    delta_perplexity: float | None = None      # model - reference
    kld: dict | None = None                    # mean, median, p99, max of per-token KL(ref || model), nats
    top1_agreement: float | None = None        # fraction of positions with equal argmax
    reference_cache: str = "off"               # "hit" | "miss" | "off"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def manifest_source(model) -> str | None:
    """The source model an artifact folder was made from: MODEL/manifest.json {"source": {"path": ...}}.
    A relative path is taken relative to the artifact folder when it exists there."""
    if not isinstance(model, (str, os.PathLike)) or not os.path.isdir(model):
        return None
    try:
        with open(os.path.join(model, "manifest.json")) as f:
            path = json.load(f).get("source", {}).get("path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(path, str) or not path:
        return None
    local = os.path.join(model, path)
    return local if not os.path.isabs(path) and os.path.exists(local) else path


def _load(model, threads: int | None, progress: bool, fp32: bool = False):
    """jisu.load(MODEL), or MODEL itself when it is already an LLM. fp32=True takes the reference
    path: every weight dequantized to float32, plain PyTorch (no packed or native kernels)."""
    if isinstance(model, (str, os.PathLike)) or model is None:
        import inspect

        from ..api import load

        options = {"packed": False, "native": False} if fp32 else {}
        accepted = inspect.signature(load).parameters
        return load(model, threads=threads, progress=progress, **{k: v for k, v in options.items() if k in accepted})
    return model


@torch.inference_mode()
def score_chunks(llm, chunks: list[list[int]], progress: bool = False, desc: str = "") -> Iterator[torch.Tensor]:
    """Log-probs [ctx-1, vocab] of each chunk's next-token predictions, one fresh cache per chunk."""
    from tqdm import tqdm

    from ..engine.runner import sequence_logits

    for chunk in tqdm(chunks, desc=desc, unit="chunk", disable=not progress, leave=False):
        yield quality.log_probs(sequence_logits(llm.runner, list(chunk))[:-1])


def _name(llm) -> tuple[str, str]:
    source = getattr(llm, "source", None)
    return getattr(source, "name", "model"), getattr(source, "path", "")


def _tokenize(llm, text: Text, chunks: int, ctx: int, notes: list[str]) -> list[list[int]]:
    cut, note = chunk_ids(encode_prefix(llm.tokenizer.encode, text.text, chunks * ctx), chunks, ctx, text.name)
    if note and note not in notes:
        notes.append(note)
    return cut


@dataclass
class Reference:
    """Reference log-probs on disk and where they came from."""
    store: RefStore
    name: str
    path: str
    cache: str     # "hit" | "miss" | "off"


def reference_logprobs(reference, text: Text, chunks: int, ctx: int, *, workdir: str, cache_dir: str | None = "",
                       threads: int | None = None, progress: bool = False, notes: list[str] | None = None) -> Reference:
    """Log-probs of `reference` on the text's chunks: read from the cache, else computed (and cached).
    Only a reference named by path is cached: a loaded LLM's weights may no longer match its files.
    Uncached log-probs go to `workdir`, which the caller removes."""
    notes = [] if notes is None else notes
    if isinstance(reference, (str, os.PathLike)) and cache_dir is not None:
        from ..io.sources import resolve

        src = resolve(reference)
        store = RefStore(cache_dir or os.path.join(default_cache_dir(), "eval"),
                         cache_key(src.path, text.sha256, chunks, ctx, path="fp32"))
        if store.load():
            return Reference(store, src.name, src.path, "hit")
        state = "miss"
    else:
        store, state = RefStore(workdir, "uncached"), "off"
    ref = _load(reference, threads, progress, fp32=True)
    name, path = _name(ref)
    cut = _tokenize(ref, text, chunks, ctx, notes)
    store.write(cut, score_chunks(ref, cut, progress, "reference"), ref.config.vocab_size,
                {"reference": path, "text": text.name, "text_sha256": text.sha256, "chunks": chunks, "ctx": ctx})
    return Reference(store, name, path, state)


def evaluate(model, reference=None, *, text: Text | str | None = None, chunks: int = 8, ctx: int = 256,
             cache_dir: str | None = "", threads: int | None = None, progress: bool = False,
             fp32: bool = False) -> QualityResult:
    """Measure MODEL (a path/name jisu.load accepts, or a loaded LLM) on `text` (Text, a file path,
    or None for the built-in corpus). `reference` (path/name or LLM; default: the source recorded in
    an artifact's manifest) adds KLD, top-1 agreement and delta perplexity. MODEL runs as jisu.load
    gives it (packed / native kernels where available) unless fp32=True; a reference named by path
    always runs on the fp32 reference path. cache_dir "" = the default cache folder, None = no cache.
    The reference runs first and is freed before MODEL loads."""
    t0 = time.perf_counter()
    if not isinstance(text, Text):
        text = read_text(text, min_tokens=ctx)
    if reference is None:
        reference = manifest_source(model)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="jisu-eval-") as workdir:
        ref = None
        if reference is not None:
            ref = reference_logprobs(reference, text, chunks, ctx, workdir=workdir, cache_dir=cache_dir,
                                     threads=threads, progress=progress, notes=notes)
        try:
            llm = _load(model, threads, progress, fp32=fp32)
            cut = _tokenize(llm, text, chunks, ctx, notes)
            if ref is not None and cut != ref.store.tokens:
                raise JisuError(f"{_name(llm)[1]}: tokenizes the text differently from the reference {ref.path}; "
                                f"KL divergence needs the same tokenizer and vocabulary")
            nll_sum, ref_nll_sum, count, kls, matches = 0.0, 0.0, 0, [], 0
            for i, lp in enumerate(score_chunks(llm, cut, progress, "model")):
                targets = torch.tensor(cut[i][1:])
                nll_sum += quality.token_nll(lp, targets).sum().item()
                count += len(targets)
                if ref is not None:
                    ref_lp = ref.store.chunk(i)
                    if ref_lp.shape != lp.shape:
                        raise JisuError(f"{_name(llm)[1]}: vocabulary of {lp.shape[-1]} tokens differs from the "
                                        f"reference's {ref_lp.shape[-1]}")
                    ref_nll_sum += quality.token_nll(ref_lp, targets).sum().item()
                    kls.append(quality.kl_divergence(ref_lp, lp))
                    matches += int(quality.top1_matches(ref_lp, lp).sum())
        finally:
            if ref is not None:
                ref.store.close()  # release the memory map before the folder is removed
    name, path = _name(llm)
    from .speed import weight_format

    result = QualityResult(name, path, weight_format(llm.model.w), text.name, text.sha256, len(cut), ctx, count,
                           quality.perplexity_from_nll(nll_sum, count), notes=notes)
    if ref is not None:
        result.reference, result.reference_path, result.reference_cache = ref.name, ref.path, ref.cache
        result.reference_perplexity = quality.perplexity_from_nll(ref_nll_sum, count)
        result.delta_perplexity = result.perplexity - result.reference_perplexity
        result.kld = quality.summarize(torch.cat(kls))
        result.top1_agreement = matches / count
    result.seconds = time.perf_counter() - t0
    return result


def format_quality(r: QualityResult) -> str:
    """A short human-readable summary (Markdown table)."""
    rows = [("model", f"{r.model} ({r.model_format})"), ("text", f"{r.text} ({r.chunks} x {r.ctx} tokens, {r.tokens_scored} scored)"),
            ("perplexity", f"{r.perplexity:.4f}")]
    if r.kld is not None:
        rows += [("reference", r.reference), ("reference perplexity", f"{r.reference_perplexity:.4f}"),
                 ("delta perplexity", f"{r.delta_perplexity:+.4f}"),
                 ("KLD mean / median", f"{r.kld['mean']:.6g} / {r.kld['median']:.6g}"),
                 ("KLD p99 / max", f"{r.kld['p99']:.6g} / {r.kld['max']:.6g}"),
                 ("top-1 agreement", f"{100 * r.top1_agreement:.2f} %"),
                 ("reference cache", r.reference_cache)]
    rows.append(("time", f"{r.seconds:.1f} s"))
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def cmd_eval(args) -> int:
    if args.threads is not None and args.threads < 1:
        raise JisuError(f"--threads must be >= 1 (got {args.threads})")
    if args.ctx < 2 or args.chunks < 1:
        raise JisuError(f"--chunks must be >= 1 and --ctx >= 2 (got {args.chunks}, {args.ctx})")
    from .report import check_output_path, update_artifact_card

    check_output_path(args.json, "--json")
    text = read_text(args.text, min_tokens=args.ctx)  # fail on a bad file before loading anything
    result = evaluate(args.model, args.reference, text=text, chunks=args.chunks, ctx=args.ctx,
                      cache_dir=None if args.no_cache else (args.cache_dir or ""), threads=args.threads,
                      progress=sys.stderr.isatty(), fp32=args.fp32)
    for note in result.notes:
        print(f"jisu: {note}", file=sys.stderr)
    print(format_quality(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    written = update_artifact_card(args.model, quality=result.to_dict())
    if written:
        print(f"jisu: report card written to {written}", file=sys.stderr)
    return 0
