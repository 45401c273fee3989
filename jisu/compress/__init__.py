"""`jisu compress`: quantize a model by a recipe into an artifact folder jisu.load can run.

    jisu.compress("smollm2", "out/q4", "gptq:w4g32")        # this package is callable
    jisu.compress.compress(...)                             # the same function

Steps: parse the recipe and read the calibration / held-out text (every input problem fails
here, before any work); load the source; quantize (jisu.compress.pipeline); write the artifact
into `.OUT.tmp-<pid>` next to OUT; re-open it, check every sha256, load it and measure it
against the source on held-out text; only then rename it into place. Any failure (including
--max-kld) removes the temporary folder and leaves OUT as it was.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass


@dataclass
class CompressResult:
    path: str
    manifest: dict

    @property
    def quality(self) -> dict:
        return self.manifest.get("quality") or {}

    @property
    def bits_per_weight(self) -> dict:
        return self.manifest["bits_per_weight"]

    def summary(self) -> str:
        m, q = self.manifest, self.quality
        bpw = m["bits_per_weight"]
        text = (f"{self.path}: {m['recipe']['text']} -> {bpw['linear']:.3f} bits/weight in the linears "
                f"({bpw['total']:.3f} overall), {m['sizes']['total'] / 1e6:.1f} MB")
        if q:
            text += (f"; KLD {q['kld_mean']:.4f} (top-1 {q['top1_agreement']:.3f}, perplexity "
                     f"{q['perplexity']:.3f} vs {q['reference_perplexity']:.3f}) on {q['tokens_scored']} held-out tokens")
        return text + f"; {m['timings']['total_s']:.0f} s"


def compress(model, out, recipe, *, calib=None, samples: int = 64, seq_len: int = 256, max_kld=None,
             force: bool = False, eval_text=None, eval_chunks: int = 8, eval_ctx: int = 256,
             evaluate: bool = True, threads=None, progress=None) -> CompressResult:
    """Compress MODEL (a GGUF file, an HF folder, an artifact, a short name; None = the default
    model) by RECIPE (see jisu.compress.recipe) into the artifact folder OUT."""
    from .run import run

    return run(model, out, recipe, calib=calib, samples=samples, seq_len=seq_len, max_kld=max_kld, force=force,
               eval_text=eval_text, eval_chunks=eval_chunks, eval_ctx=eval_ctx, evaluate=evaluate,
               threads=threads, progress=progress)


class _CallableModule(types.ModuleType):
    """Lets `jisu.compress(...)` call compress() while jisu.compress stays the package."""

    def __call__(self, *args, **kwargs) -> CompressResult:
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["compress", "CompressResult"]
