"""The Llama family: Llama 2/3, Mistral, SmolLM, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).
Pre-norm decoder, rotate-half RoPE, grouped KV heads, SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .layers import INFERENCE, DecoderModel, Numerics, Rotary, rope_inv_freq


class LlamaModel(DecoderModel):
    """Holds the weights (HF names, fp32 tensors or packed kernel weights) and runs forward passes."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], numerics: Numerics = INFERENCE):
        self.w = weights
        self._build(cfg, numerics)
        weights.pop("rope_freqs", None)  # folded into the rotary's frequencies

    def _attention_setup(self, cfg: ModelConfig) -> None:
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if "rope_freqs" in self.w:  # GGUF Llama 3: per-frequency divisors stored as a tensor
            inv_freq = inv_freq / self.w["rope_freqs"].float()
        self.rotary = Rotary(cfg.head_dim, inv_freq)
        self.rotaries = {"full": self.rotary}
        self.layer_kinds = ["full"] * cfg.num_layers
        self.windows = {"full": cfg.sliding_window if cfg.layer_types else None}
        self.scale = cfg.head_dim ** -0.5
        self.attn_softcap = None

    act = staticmethod(F.silu)
