"""Which llama.cpp grid each tensor takes for an export type, by llama.cpp's own rule
(llama-quant.cpp: output / tied embedding at Q6_K, Q4_K_M's attn_v and ffn_down bumps, and
the shape fallback to a 32-block type when a row is not a multiple of 256)."""
from __future__ import annotations

from ..errors import JisuError

# export type -> llama_ftype written as general.file_type
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "Q4_K_M": 15}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def check_type(t: str) -> str:
    if t not in FTYPES:
        raise JisuError(f"--type {t}: not a GGUF export type (one of {', '.join(FTYPES)})")
    return t


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(ftype: str, gguf_name: str, K: int, n_layers: int, tied: bool) -> str:
    """The grid of matrix `gguf_name` (rows of K weights) in an export of type `ftype`."""
    base = "Q4_K" if ftype == "Q4_K_M" else ftype
    if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        return "Q8_0" if K % 256 or base == "Q8_0" else "Q6_K"
    t = base
    parts = gguf_name.split(".")
    if ftype == "Q4_K_M" and len(parts) == 4 and parts[2] in ("attn_v", "ffn_down"):
        if use_more_bits(int(parts[1]), n_layers):
            t = "Q6_K"
    if K % 256 and t in FALLBACK:
        t = FALLBACK[t]
    return t
