"""HF model folders: config.json + single or sharded *.safetensors, memory-mapped. Never pickle."""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterator

import torch

from ..config import ARCH_FAMILIES, ModelConfig
from ..errors import ModelFormatError, UnsupportedError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 << 20
_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                       "F8_E4M3", "F8_E5M2"}


def read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read(64 << 20))
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return value


def _checked_child(folder: str, name: Any, what: str) -> str:
    """A file name read from inside a file: must be a plain name within `folder`."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") \
            or "/" in name or "\\" in name:
        raise ModelFormatError(f"{folder}: {what} names an unsafe path {name!r}")
    return os.path.join(folder, name)


def check_safetensors(path: str) -> None:
    """Validate a safetensors header before the library maps it: sizes, dtypes, offsets."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelFormatError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ModelFormatError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: corrupt safetensors header (not an object)")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError
                numel *= d
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: tensor {name!r} has a malformed entry") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise UnsupportedError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_size):
            raise ModelFormatError(f"{path}: tensor {name!r} lies past the end of the file (truncated?)")


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(f"{index}: missing weight_map")
        return [_checked_child(folder, f, "weight_map") for f in dict.fromkeys(weight_map.values())]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(folder, f) for f in files]
    if any(f.endswith(PICKLE_SUFFIXES) for f in os.listdir(folder)):
        raise ModelFormatError(f"{folder}: only pickle checkpoints (*.bin/*.pt) found; jisu loads safetensors and "
                               f"GGUF only (pickle can run code). Convert with safetensors first.")
    raise ModelFormatError(f"{folder}: no *.safetensors weights found")


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        check_safetensors(path)
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # SafetensorError and friends
            if isinstance(e, (ModelFormatError, UnsupportedError)):
                raise
            raise ModelFormatError(f"{path}: corrupt safetensors file ({e})") from None


def _rope_params(cfg: dict, layer_type: str | None = None) -> dict:
    """transformers >= 5 keeps rope settings in `rope_parameters` (per layer type for Gemma 3)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    if isinstance(params, dict) and "rope_type" in params or isinstance(params, dict) and "rope_theta" in params:
        return params
    legacy = dict(cfg.get("rope_scaling") or {})
    if "type" in legacy and "rope_type" not in legacy:
        legacy["rope_type"] = legacy["type"]
    return legacy


def hf_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    cfg = read_json(path)
    if isinstance(cfg.get("text_config"), dict) and cfg.get("model_type") in ("gemma3",):
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
    model_type = cfg.get("model_type")
    if model_type not in ARCH_FAMILIES:
        raise UnsupportedError(f"{path}: unknown architecture {model_type!r} "
                               f"(supported: {', '.join(sorted(ARCH_FAMILIES))})")
    arch = {"gemma3_text": "gemma3", "smollm": "llama", "smollm2": "llama"}.get(model_type, model_type)
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        n_layers = int(cfg["num_hidden_layers"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        full = _rope_params(cfg, "full_attention")
        theta = float(full.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = full if full.get("rope_type", "default") != "default" else None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        kw: dict[str, Any] = {}
        if arch in ("gemma2", "gemma3"):
            types = cfg.get("layer_types")
            if not types:
                pattern = int(cfg.get("sliding_window_pattern", 6))
                types = [("full_attention" if (i + 1) % pattern == 0 else "sliding_attention") if arch == "gemma3"
                         else ("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(n_layers)]
            local = _rope_params(cfg, "sliding_attention")
            kw.update(
                sliding_window=cfg.get("sliding_window"),
                layer_types=tuple("sliding" if t == "sliding_attention" else "full" for t in types),
                attn_softcap=cfg.get("attn_logit_softcapping"),
                final_softcap=cfg.get("final_logit_softcapping"),
                query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
                embed_scale=hidden ** 0.5,
                hidden_act="gelu_tanh",
                rope_local_theta=float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))
                if arch == "gemma3" else None,
                qk_norm=arch == "gemma3",
            )
        else:
            act = cfg.get("hidden_act", "silu")
            if act not in ("silu",):
                raise UnsupportedError(f"{path}: activation {act!r} is not supported for {arch}")
            if cfg.get("sliding_window") and arch == "mistral" and cfg["sliding_window"] < cfg.get("max_position_embeddings", 0):
                kw.update(sliding_window=int(cfg["sliding_window"]), layer_types=("sliding",) * n_layers)
        return ModelConfig(
            arch=arch, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), num_layers=n_layers, num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", arch in ("gemma2", "gemma3"))),
            attn_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            qk_norm=kw.pop("qk_norm", arch == "qwen3"),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=tuple(int(e) for e in eos_ids), **kw)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{path}: missing or malformed field ({type(e).__name__}: {e})") from None
