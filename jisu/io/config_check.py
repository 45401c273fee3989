"""Field checks of a ModelConfig read from a file (artifact config.json, HF config.json, GGUF
metadata): every field of the right type and in range, or a one-line ModelFormatError naming it."""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from ..config import ModelConfig
from ..errors import JisuError, ModelFormatError


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _is_num(v) and v > 0


_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
def _is_token(v) -> bool:
    """A token id the tokenizer library can take (it indexes with 32-bit integers)."""
    return _is_int(v) and 0 <= v < 1 << 31


_CHECKS = {
    **{k: (_is_int, "an integer") for k in _INTS},
    "arch": (lambda v: isinstance(v, str), "a name"),
    "rms_norm_eps": (lambda v: _positive(v) and v < 1, "a number in (0, 1)"),
    "rope_theta": (_positive, "a positive number"),
    "rope_scaling": (lambda v: v is None or isinstance(v, dict) and all(isinstance(k, str) for k in v), "an object"),
    "max_position": (lambda v: _is_int(v) and 0 < v <= 1 << 31, "a positive integer"),
    "tie_embeddings": (lambda v: isinstance(v, (bool, int)), "a boolean"),
    "attn_bias": (lambda v: isinstance(v, (bool, int)), "a boolean"),
    "qk_norm": (lambda v: isinstance(v, (bool, int)), "a boolean"),
    "hidden_act": (lambda v: v in ("silu", "gelu_tanh"), "'silu' or 'gelu_tanh'"),
    "sliding_window": (lambda v: v is None or _is_int(v) and v > 0, "a positive integer"),
    "layer_types": (lambda v: isinstance(v, (list, tuple)) and all(t in ("sliding", "full") for t in v),
                    "a list of 'sliding' / 'full'"),
    "attn_softcap": (lambda v: v is None or _positive(v), "a positive number"),
    "final_softcap": (lambda v: v is None or _positive(v), "a positive number"),
    "query_pre_attn_scalar": (lambda v: v is None or _positive(v), "a positive number"),
    "rope_local_theta": (lambda v: v is None or _positive(v), "a positive number"),
    "embed_scale": (_is_num, "a finite number"),
    "bos_token_id": (lambda v: v is None or _is_token(v), "a token id (0 to 2^31 - 1)"),
    "eos_token_ids": (lambda v: isinstance(v, (list, tuple)) and all(map(_is_token, v)),
                      "a list of token ids (0 to 2^31 - 1)"),
    "intermediate_sizes": (lambda v: isinstance(v, (list, tuple)) and all(map(_is_int, v)), "a list of integers"),
    "layer_heads": (lambda v: isinstance(v, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_is_int, p)) for p in v), "a list of [q, kv] pairs"),
}


def check_fields(kw: dict, where: str) -> dict:
    """`kw` (ModelConfig fields by name) with every present field checked; lists become tuples."""
    for name, value in kw.items():
        ok, what = _CHECKS.get(name, (lambda v: True, ""))
        if not ok(value):
            raise ModelFormatError(f"{where}: config field {name}={value!r:.60} is not {what}")
        if name == "rope_scaling" and value is not None:
            bad = next((k for k, v in value.items() if not (isinstance(v, str) or v is None or _is_num(v))), None)
            if bad is not None:
                raise ModelFormatError(f"{where}: config field rope_scaling[{bad!r}] is not a finite number")
    return {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in kw.items()}


def build_config(kw: dict, where: str) -> ModelConfig:
    """ModelConfig(**kw) after check_fields; its own refusals as ModelFormatError naming `where`."""
    kw = check_fields(kw, where)
    try:
        return ModelConfig(**kw)
    except JisuError as e:
        raise ModelFormatError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"{where}: bad config ({e})") from None


def checked(cfg: ModelConfig, where: str) -> ModelConfig:
    """A config an architecture module built from a file, checked field by field."""
    check_fields({f.name: getattr(cfg, f.name) for f in fields(ModelConfig)}, where)
    return cfg



