"""The Llama family: Llama 2/3, Mistral, SmolLM, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).
Pre-norm decoder, rotate-half RoPE, grouped KV heads, SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels import ops
from .layers import KVCache, Rotary, embed_tokens, rope_inv_freq, self_attention


class LlamaModel:
    """Holds the weights (HF names, fp32 tensors or packed kernel weights) and runs forward passes."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.w = weights
        if cfg.tie_embeddings or "lm_head.weight" not in weights:
            self.w["lm_head.weight"] = weights["model.embed_tokens.weight"]
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if "rope_freqs" in weights:  # GGUF Llama 3: per-frequency divisors stored as a tensor
            inv_freq = inv_freq / weights.pop("rope_freqs").float()
        self.rotary = Rotary(cfg.head_dim, inv_freq)
        self.scale = cfg.head_dim ** -0.5

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.cfg, batch, max_len, dtype=dtype or torch.float32)

    def forward(self, tokens: torch.Tensor, cache, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [B, T] appended after the cached positions (cache: KVCache or engine PagedBatch)
        -> logits [B, T, V] fp32, or only at positions `logits_index` [R] -> [B, R, V]."""
        cfg, w = self.cfg, self.w
        seq = tokens.shape[1]
        cos, sin = self.rotary.tables(cache.positions(seq))
        x = embed_tokens(w["model.embed_tokens.weight"], tokens)
        window = cfg.sliding_window if cfg.layer_types else None
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            h = ops.rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
            x = x + self_attention(h, w, p, cfg, i, cache, (cos, sin), self.scale, window=window)
            h = ops.rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
            gate = ops.linear(h, w[p + "mlp.gate_proj.weight"])
            up = ops.linear(h, w[p + "mlp.up_proj.weight"])
            x = x + ops.linear(F.silu(gate) * up, w[p + "mlp.down_proj.weight"])
        cache.advance(seq)
        if logits_index is not None:
            x = x[:, logits_index]
        x = ops.rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
        return ops.linear(x, w["lm_head.weight"])
