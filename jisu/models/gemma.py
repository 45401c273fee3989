"""Gemma 2 and Gemma 3 (text): (1 + w) RMSNorm before and after each block, scaled embeddings,
GeLU-tanh MLP, sliding-window and global layers, attention/final soft-capping, Gemma 3 q/k norms
and a separate RoPE base for the sliding layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .layers import INFERENCE, DecoderModel, Numerics, Rotary, rope_inv_freq


class GemmaModel(DecoderModel):
    MLP_NORM = "pre_feedforward_layernorm"
    ATTN_POST_NORM = "post_attention_layernorm"
    MLP_POST_NORM = "post_feedforward_layernorm"

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], numerics: Numerics = INFERENCE):
        # Gemma's norms scale by (1 + w): fold the 1 in once so the shared rms_norm kernel applies.
        self.w = {k: (v.float() + 1.0 if k.endswith("norm.weight") else v) for k, v in weights.items()}
        self._build(cfg, numerics)

    def _attention_setup(self, cfg: ModelConfig) -> None:
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        self.rotaries = {
            "full": Rotary(cfg.head_dim, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)),
            "sliding": Rotary(cfg.head_dim, rope_inv_freq(cfg.head_dim, local_theta,
                                                          None if cfg.rope_local_theta else cfg.rope_scaling))}
        self.layer_kinds = ["sliding" if cfg.is_sliding(i) else "full" for i in range(cfg.num_layers)]
        self.windows = {"full": None, "sliding": cfg.sliding_window}
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.attn_softcap = cfg.attn_softcap

    @staticmethod
    def act(gate: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh")

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().embed(tokens) * torch.tensor(self.cfg.embed_scale, dtype=torch.float32)

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.final_softcap:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits
