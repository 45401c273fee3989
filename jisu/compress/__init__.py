"""`jisu compress`: quantize a model by a recipe into an artifact folder jisu.load can run.

    from jisu.compress import compress
    compress("smollm2", "out/q4", "gptq:w4g32", samples=32)    # options: CompressConfig's fields

Steps: parse the recipe and read the calibration / held-out text (every input problem fails
here, before any work); load the source; quantize (jisu.compress.pipeline); write the artifact
into `.OUT.tmp-<pid>` next to OUT; re-open it, check every sha256, load it and measure it
against the source on held-out text; only then rename it into place. Any failure (including
--max-kld) removes the temporary folder and leaves OUT as it was.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .config import CompressConfig, CompressResult


def compress(model, out, recipe, config: Optional[CompressConfig] = None, **options) -> CompressResult:
    """Compress MODEL (a GGUF file, an HF folder, an artifact, a short name; None = the default
    model) by RECIPE (see jisu.compress.recipe) into the artifact folder OUT. `options` are
    CompressConfig fields, over `config` (or the defaults)."""
    from .run import run

    return run(model, out, recipe, replace(config or CompressConfig(), **options))


__all__ = ["compress", "CompressConfig", "CompressResult"]
