"""FormatSpec: a logical weight format a recipe names (jisu.kernels.formats: int 2/3/4/8, nf4,
k-means) and what it costs in bits per weight."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class FormatSpec:
    """A logical weight format (jisu.kernels.formats): kind "int" (bits 2/3/4/8), "nf4" or "kmeans"."""
    kind: str
    bits: int
    group_size: Optional[int]       # None: int8 per output channel / k-means without group scale
    sym: bool = True

    @property
    def name(self) -> str:
        g = f"g{self.group_size}" if self.group_size else ""
        if self.kind == "int":
            return f"w{self.bits}{g}{'' if self.sym else 'a'}"
        return f"{self.kind}{g}"

    def bits_per_weight(self, K: int) -> float:
        """Stored bits per weight of an [N, K] matrix in a jisu artifact (codes + scales + tables)."""
        g = self.group_size
        if self.kind == "int":
            if g is None:                      # int8 per channel: float32 scale per row
                return self.bits + 32.0 / K
            return self.bits + 16.0 * (1 if self.sym else 2) / g
        if self.kind == "nf4":                 # fixed table (not stored), float16 group scale
            return 4.0 + 16.0 / g
        # k-means: 16 float16 entries per row, optional float16 group scale
        return 4.0 + 16.0 * 16 / K + (16.0 / g if g else 0.0)

    def check_k(self, K: int) -> bool:
        return self.group_size is None or K % self.group_size == 0
