"""What the architecture modules share: the config fields every decoder has in an HF config.json
and in GGUF metadata, llama.cpp's GGUF tensor names, its q/k row permutation, and the norm offset
(weights in memory hold the HF form; a model adds its NORM_OFFSET to every norm)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..errors import ModelFormatError

# GGUF tensor names outside the layers -> HF names.
GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight", "rope_freqs.weight": "rope_freqs"}
# GGUF per-layer names every decoder uses -> HF names (after "model.layers.{i}."); each module adds its norms.
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _per_layer(value: Any, n_layers: int, what: str, where: str) -> tuple[int, tuple[int, ...]]:
    """A size stored as one number or as one per layer -> (largest, per layer or ())."""
    if not isinstance(value, list):
        return int(value), ()
    if len(value) != n_layers:
        raise ModelFormatError(f"{where}: {what} has {len(value)} entries for {n_layers} layers")
    values = tuple(int(v) for v in value)
    return max(values), (values if len(set(values)) > 1 else ())


MAX_LAYERS = 1 << 12  # the deepest released decoders have ~130 layers


def _sizes(n_layers: int, heads: Any, kv_heads: Any, inter: Any, where: str) -> dict[str, Any]:
    """The head counts and MLP widths, each one number or one per layer (layers of their own widths).
    The layer count is bounded first: per-layer lists are built from it (a config claiming 10^12
    layers filled memory building them)."""
    if not 1 <= n_layers <= MAX_LAYERS:
        raise ModelFormatError(f"{where}: {n_layers} layers is not a layer count in [1, {MAX_LAYERS}]")
    kv_heads, layer_kv = _per_layer(kv_heads or heads, n_layers, "the KV head count", where)  # default: no GQA
    heads, layer_q = _per_layer(heads, n_layers, "the head count", where)
    inter, inters = _per_layer(inter, n_layers, "the MLP width", where)
    kw: dict[str, Any] = dict(num_layers=n_layers, num_heads=heads, num_kv_heads=kv_heads, intermediate_size=inter,
                              intermediate_sizes=inters)
    if layer_q or layer_kv:
        kw["layer_heads"] = tuple(zip(layer_q or (heads,) * n_layers, layer_kv or (kv_heads,) * n_layers))
    return kw


# --- HF config.json ------------------------------------------------------------------------------

def rope_params(d: dict, layer_type: str | None = None) -> dict:
    """transformers >= 5 keeps rope settings in `rope_parameters` (per layer type for Gemma 3)."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and layer_type and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    if isinstance(params, dict) and "rope_type" in params or isinstance(params, dict) and "rope_theta" in params:
        return params
    legacy = dict(d.get("rope_scaling") or {})
    if "type" in legacy and "rope_type" not in legacy:
        legacy["rope_type"] = legacy["type"]
    return legacy


def hf_fields(d: dict, arch: str, where: str) -> dict[str, Any]:
    """The ModelConfig fields every decoder's config.json names alike (KeyError, TypeError or
    ValueError on a missing or malformed one); the module overrides or adds its own."""
    hidden = int(d["hidden_size"])
    kw = _sizes(int(d["num_hidden_layers"]), d["num_attention_heads"], d.get("num_key_value_heads"),
                d["intermediate_size"], where)
    full = rope_params(d, "full_attention")
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return dict(
        arch=arch, vocab_size=int(d["vocab_size"]), hidden_size=hidden, **kw,
        head_dim=int(d.get("head_dim") or hidden // kw["num_heads"]),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(full.get("rope_theta", d.get("rope_theta", 10000.0))),
        rope_scaling=full if full.get("rope_type", "default") != "default" else None,
        max_position=int(d.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        attn_bias=bool(d.get("attention_bias", False)),
        bos_token_id=d.get("bos_token_id"), eos_token_ids=tuple(int(e) for e in eos_ids))


# --- GGUF metadata -------------------------------------------------------------------------------

def gguf_meta(metadata: dict, arch: str, where: str) -> Callable[..., Any]:
    """meta(key, default=None, required=False): the value of `{arch}.{key}`."""
    def meta(key: str, default: Any = None, required: bool = False) -> Any:
        v = metadata.get(f"{arch}.{key}", default)
        if v is None and required:
            raise ModelFormatError(f"{where}: metadata {arch}.{key} is missing")
        return v
    return meta


def gguf_fields(metadata: dict, shapes: dict[str, tuple[int, ...]], arch: str, where: str) -> dict[str, Any]:
    """The ModelConfig fields llama.cpp stores alike for every decoder (`shapes`: tensor name ->
    row-major shape); the module overrides or adds its own."""
    meta = gguf_meta(metadata, arch, where)
    hidden = int(meta("embedding_length", required=True))
    kw = _sizes(int(meta("block_count", required=True)), meta("attention.head_count", required=True),
                meta("attention.head_count_kv"), meta("feed_forward_length", required=True), where)
    if "token_embd.weight" not in shapes:
        raise ModelFormatError(f"{where}: no token_embd.weight tensor")
    # Linear RoPE scaling (convert_hf_to_gguf.py writes it for any architecture; Gemma 3 applies it
    # to its global layers only). Llama 3 scaling comes as the rope_freqs tensor instead.
    factor = meta("rope.scaling.factor")
    if factor and meta("rope.scaling.type", "linear") == "linear":
        kw["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    return dict(
        # the embedding's rows are the model's vocabulary (token lists may be shorter or padded)
        arch=arch, vocab_size=int(meta("vocab_size", 0) or shapes["token_embd.weight"][0]), hidden_size=hidden,
        head_dim=int(meta("attention.key_length", 0) or hidden // kw["num_heads"]),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)), max_position=int(meta("context_length", 4096)),
        tie_embeddings="output.weight" not in shapes, attn_bias="blk.0.attn_q.bias" in shapes,
        qk_norm="blk.0.attn_q_norm.weight" in shapes,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None)), **kw)


# --- load transforms -----------------------------------------------------------------------------

def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its converter reorders rows so that RoPE rotates
    adjacent pairs); jisu's models use HF's rotate-half layout."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def qk_unpermute(cfg: ModelConfig, name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The un-permutation of a q or k projection (weight or bias) `name`, else None."""
    if not name.startswith("model.layers.") or not name.endswith(("_proj.weight", "_proj.bias")):
        return None
    proj = name.rsplit(".", 2)[-2]
    if proj not in ("q_proj", "k_proj"):
        return None
    q, kv = cfg.heads(int(name.split(".")[2]))
    heads = q if proj == "q_proj" else kv
    return lambda w: unpermute_qk(w, heads)


def model_form(weights: dict, offset: float) -> dict:
    """A new dict over the same tensors with `offset` added to every norm (the form a model whose
    norms scale by (offset + w) computes with)."""
    w = dict(weights)
    if offset:
        for k, v in weights.items():
            if k.endswith("norm.weight"):
                w[k] = v.float() + offset
    return w
