"""CompressConfig: what a compression run takes besides the model, OUT and the recipe; CompressResult:
what it returns."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..errors import JisuError


@dataclass(frozen=True)
class CompressConfig:
    """What a compression run takes besides the model, OUT and the recipe."""
    calib: Optional[str] = None        # calibration text (.txt / .jsonl); None: the built-in corpus's first half
    samples: int = 64                  # calibration sequences
    seq_len: int = 256                 # tokens per calibration sequence
    max_kld: Optional[float] = None    # a result whose measured KLD is above this is discarded (nothing written)
    force: bool = False                # replace an existing OUT (only once the new artifact is verified)
    eval_text: Optional[str] = None    # held-out text; None: the built-in corpus's second half
    eval_chunks: int = 8               # held-out chunks the quality is measured on
    eval_ctx: int = 256                # tokens per held-out chunk (at most the model's context)
    evaluate: bool = True              # measure the artifact against the source (False: only load it)
    threads: Optional[int] = None      # CPU threads (None: all cores)
    progress: Optional[bool] = None    # progress bars (None: when stderr is a terminal)

    def __post_init__(self):
        from ..io.text import check_counts

        check_counts(self.samples, self.seq_len)
        if self.max_kld is not None:
            if isinstance(self.max_kld, bool) or not isinstance(self.max_kld, (int, float)) \
                    or not math.isfinite(self.max_kld) or self.max_kld < 0:
                raise JisuError(f"--max-kld must be a number >= 0 (got {self.max_kld!r})")
            if not self.evaluate:
                raise JisuError("--max-kld needs the quality measurement (evaluate=True)")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise JisuError(f"--threads must be >= 1 (got {self.threads})")


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

    @property
    def source_bytes(self) -> Optional[int]:
        """The source model's size on disk (its file, or its folder's files)."""
        return self.manifest["sizes"].get("source")

    @property
    def artifact_bytes(self) -> int:
        return self.manifest["sizes"]["total"]

    def growth(self) -> Optional[str]:
        """One line when the artifact is larger than its source (the recipe stores more bits than
        the source has, e.g. w8 of a Q4 GGUF), else None."""
        src, art = self.source_bytes, self.artifact_bytes
        if src is None or art <= src:
            return None
        return (f"note: the artifact ({art / 1e6:.1f} MB) is larger than its source ({src / 1e6:.1f} MB): "
                f"the recipe {self.manifest['recipe']['text']!r} stores more bits per weight than the source has")

    def summary(self) -> str:
        m, q = self.manifest, self.quality
        bpw = m["bits_per_weight"]
        src = self.source_bytes
        text = (f"{self.path}: {m['recipe']['text']} -> {bpw['linear']:.3f} bits/weight in the linears "
                f"({bpw['total']:.3f} overall), {m['sizes']['total'] / 1e6:.1f} MB"
                + (f" (source {src / 1e6:.1f} MB)" if src is not None else ""))
        if q:
            text += (f"; KLD {q['kld_mean']:.4f} (top-1 {q['top1_agreement']:.3f}, perplexity "
                     f"{q['perplexity']:.3f} vs {q['reference_perplexity']:.3f}) on {q['tokens_scored']} held-out tokens")
        return text + f"; {m['timings']['total_s']:.0f} s"
