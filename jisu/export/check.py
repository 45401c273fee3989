"""An export checks itself in its target runtime: llama.cpp (through llama-cpp-python, when it is
installed) loads the GGUF, its load-time warnings are collected, and its log-probs on held-out
text are scored against jisu's fp32 source and against jisu running the exported weights."""
from __future__ import annotations

import ctypes
import os

import torch

from ..eval import quality

_CALLBACKS = []  # the log callbacks handed to llama.cpp must outlive it


def import_llama_cpp():
    """llama_cpp, or None when it is not installed (the check is then skipped, and said so)."""
    try:
        import llama_cpp
    except Exception:  # ImportError, or a library that fails to load
        return None
    return llama_cpp


class LlamaCpp:
    """A llama.cpp context over a GGUF that keeps all logits; `warnings` holds what llama.cpp
    logged at warning or error level while loading it."""

    def __init__(self, llama_cpp, path: str, ctx: int, threads: int | None = None):
        self.warnings: list[str] = []
        self._last = 0
        cb = llama_cpp.llama_log_callback(self._log)
        _CALLBACKS.append(cb)
        llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
        try:
            n = threads or os.cpu_count()
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                                       n_threads=n, n_threads_batch=n, verbose=False)
        finally:
            try:
                from llama_cpp import _logger

                llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
            except Exception:
                pass

    def _log(self, level, text, user_data):
        # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous message
        if level == 5:
            level = self._last
        self._last = level
        if level in (3, 4):
            self.warnings.append(text.decode("utf-8", "replace").strip())

    def log_probs(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return quality.log_probs(torch.from_numpy(self.llm.scores[:len(ids) - 1].copy()))

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def close(self):
        self.llm.close()


@torch.inference_mode()
def jisu_log_probs(cfg, weights: dict, chunks: list[list[int]]) -> list[torch.Tensor]:
    """Log-probs of every chunk through jisu's reference (float32) model over `weights`."""
    from ..engine.runner import TorchRunner, sequence_logits
    from ..models import build_model

    runner = TorchRunner(build_model(cfg, weights))
    return [quality.log_probs(sequence_logits(runner, list(c))[:-1]) for c in chunks]


def _score(refs: list[torch.Tensor], lps: list[torch.Tensor]) -> dict:
    kls = torch.cat([quality.kl_divergence(r, lp) for r, lp in zip(refs, lps)])
    n = sum(len(r) for r in refs)
    top1 = sum(int(quality.top1_matches(r, lp).sum()) for r, lp in zip(refs, lps)) / n
    return {"kld": quality.summarize(kls), "top1_agreement": top1, "tokens": n}


def check_gguf(path: str, chunks: list[list[int]], source_lp: list[torch.Tensor], export_lp: list[torch.Tensor],
               threads: int | None = None) -> dict:
    """The report card's "llama_cpp" part: load warnings and KLD of llama.cpp on the export against
    jisu's fp32 source and against jisu on the exported weights."""
    llama_cpp = import_llama_cpp()
    if llama_cpp is None:
        return {"checked": False, "note": "llama-cpp-python is not installed: the export was not run in llama.cpp "
                                          "(pip install llama-cpp-python, then export again)"}
    ctx = max(len(c) for c in chunks)
    runtime = LlamaCpp(llama_cpp, path, ctx, threads)
    try:
        lps = [runtime.log_probs(c) for c in chunks]
    finally:
        runtime.close()
    return {"checked": True, "llama_cpp_version": getattr(llama_cpp, "__version__", "?"),
            "load_warnings": runtime.warnings, "vs_source": _score(source_lp, lps),
            "vs_jisu_export_weights": _score(export_lp, lps)}
