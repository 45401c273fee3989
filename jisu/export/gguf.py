"""Write a GGUF that stock llama.cpp loads: the architecture's metadata from the ModelConfig, the
tokenizer's GGUF metadata (pre-tokenizer and chat template included) with the value types llama.cpp
reads, llama.cpp's tensor names, Llama's q/k rows permuted back to llama.cpp's order, and every
matrix as packed blocks of its grid (norms, biases: F32)."""
from __future__ import annotations

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import UnsupportedError
from ..models.common import GGUF_GLOBAL_NAMES

# jisu architecture -> what llama.cpp needs of it (q/k permuted: llama.cpp rotates adjacent pairs)
EXPORTABLE = {"llama": True, "qwen2": False, "qwen3": False}


def check_exportable(cfg: ModelConfig, where: str) -> None:
    """A one-line error for a model llama.cpp cannot load as jisu would write it."""
    if cfg.arch not in EXPORTABLE:
        raise UnsupportedError(f"{where}: architecture {cfg.arch!r} cannot be exported to GGUF "
                               f"(supported: {', '.join(EXPORTABLE)})")
    if cfg.layer_heads or cfg.intermediate_sizes:
        raise UnsupportedError(f"{where}: layers of different widths cannot be exported to GGUF")
    if cfg.sliding_window or cfg.layer_types:
        raise UnsupportedError(f"{where}: sliding-window attention cannot be exported to GGUF")
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") not in ("linear", "llama3"):
        raise UnsupportedError(f"{where}: rope scaling {cfg.rope_scaling.get('rope_type')!r} cannot be exported")


def gguf_name(hf: str, cfg: ModelConfig) -> str | None:
    """llama.cpp's name of an HF-named tensor (None: not written)."""
    from ..models import archs

    for g, h in GGUF_GLOBAL_NAMES.items():
        if h == hf:
            return g
    parts = hf.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        table = {v: k for k, v in archs()[cfg.arch].GGUF_LAYER_NAMES.items()}
        inner = ".".join(parts[3:-1])
        if inner in table:
            return f"blk.{parts[2]}.{table[inner]}.{parts[-1]}"
    return None


def qk_rows(cfg: ModelConfig, hf: str) -> torch.Tensor | None:
    """The row order llama.cpp stores a Llama q / k projection in (index into jisu's rows)."""
    if not EXPORTABLE.get(cfg.arch) or not hf.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias",
                                                        "k_proj.bias")):
        return None
    heads = cfg.num_heads if ".q_proj." in hf else cfg.num_kv_heads
    n = heads * cfg.head_dim
    return torch.arange(n).reshape(heads, 2, cfg.head_dim // 2).transpose(1, 2).reshape(n)


# tokenizer metadata: the GGUF value types llama.cpp reads them with
def _tok_kv(writer, key: str, v) -> None:
    from gguf import GGUFValueType as V

    if isinstance(v, bool):
        writer.add_key_value(key, v, V.BOOL)
    elif isinstance(v, int):
        writer.add_key_value(key, v, V.UINT32)
    elif isinstance(v, float):
        writer.add_key_value(key, v, V.FLOAT32)
    elif isinstance(v, str):
        if v:  # gguf drops empty strings silently; say nothing rather than something else
            writer.add_key_value(key, v, V.STRING)
    elif isinstance(v, list):
        if all(isinstance(x, str) for x in v):
            writer.add_key_value(key, v, V.ARRAY, V.STRING)
        elif all(isinstance(x, bool) for x in v):
            writer.add_key_value(key, v, V.ARRAY, V.BOOL)
        elif all(isinstance(x, int) for x in v):
            writer.add_key_value(key, v, V.ARRAY, V.INT32)
        else:
            writer.add_key_value(key, [float(x) for x in v], V.ARRAY, V.FLOAT32)
    else:
        raise UnsupportedError(f"tokenizer metadata {key} has a value of type {type(v).__name__}")


def write_gguf(path: str, cfg: ModelConfig, tok_meta: dict, tensors: list, *, file_type: int, name: str) -> None:
    """tensors: (GGUF name, array, GGUF type name) with the array as packed uint8 rows [N, bytes]
    for a quantized type, float32 otherwise."""
    import gguf

    w = gguf.GGUFWriter(path, cfg.arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, v in tok_meta.items():
        _tok_kv(w, key, v)
    for tname, arr, tname_type in tensors:
        if tname_type == "F32":
            w.add_tensor(tname, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            w.add_tensor(tname, np.ascontiguousarray(arr), raw_dtype=gguf.GGMLQuantizationType[tname_type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
