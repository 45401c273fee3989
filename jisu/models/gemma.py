"""Gemma 2 and Gemma 3 (text): (1 + w) RMSNorm before and after each block, scaled embeddings,
GeLU-tanh MLP, sliding-window and global layers, attention/final soft-capping, Gemma 3 q/k norms
and a separate RoPE base for the sliding layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels import ops
from .layers import KVCache, Rotary, embed_tokens, rope_inv_freq, self_attention


class GemmaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        # Gemma's norms scale by (1 + w): fold the 1 in once so the shared rms_norm kernel applies.
        self.w = {k: (v.float() + 1.0 if k.endswith("norm.weight") else v) for k, v in weights.items()}
        if cfg.tie_embeddings or "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.rotary_full = Rotary(cfg.head_dim, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        self.rotary_local = Rotary(cfg.head_dim, rope_inv_freq(cfg.head_dim, local_theta,
                                                               None if cfg.rope_local_theta else cfg.rope_scaling))
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.cfg, batch, max_len, dtype=dtype or torch.float32)

    def forward(self, tokens: torch.Tensor, cache, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [B, T] appended after the cached positions (cache: KVCache or engine PagedBatch)
        -> logits [B, T, V] fp32, or only at positions `logits_index` [R] -> [B, R, V]."""
        cfg, w = self.cfg, self.w
        seq = tokens.shape[1]
        positions = cache.positions(seq)
        tables = {"full": self.rotary_full.tables(positions), "sliding": self.rotary_local.tables(positions)}
        windows = {"full": None, "sliding": cfg.sliding_window}
        x = embed_tokens(w["model.embed_tokens.weight"], tokens) * torch.tensor(cfg.embed_scale, dtype=torch.float32)
        eps = cfg.rms_norm_eps
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            kind = "sliding" if cfg.is_sliding(i) else "full"
            h = ops.rms_norm(x, w[p + "input_layernorm.weight"], eps)
            h = self_attention(h, w, p, cfg, i, cache, tables[kind], self.scale, cfg.attn_softcap, windows[kind])
            x = x + ops.rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
            h = ops.rms_norm(x, w[p + "pre_feedforward_layernorm.weight"], eps)
            gate = ops.linear(h, w[p + "mlp.gate_proj.weight"])
            up = ops.linear(h, w[p + "mlp.up_proj.weight"])
            h = ops.linear(F.gelu(gate, approximate="tanh") * up, w[p + "mlp.down_proj.weight"])
            x = x + ops.rms_norm(h, w[p + "post_feedforward_layernorm.weight"], eps)
        cache.advance(seq)
        if logits_index is not None:
            x = x[:, logits_index]
        logits = ops.linear(ops.rms_norm(x, w["model.norm.weight"], eps), w["lm_head.weight"])
        if cfg.final_softcap:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits
