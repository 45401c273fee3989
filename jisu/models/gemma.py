"""Gemma 2 and Gemma 3 (text): (1 + w) RMSNorm before and after each block, scaled embeddings,
GeLU-tanh MLP, sliding-window and global layers, attention/final soft-capping, Gemma 3 q/k norms
and a separate RoPE base for the sliding layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from . import common
from .layers import INFERENCE, DecoderModel, Numerics, Rotary, rope_inv_freq

# --- architecture declaration (jisu.models registers it; the loaders read it) --------------------------

HF_TYPES = {"gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3"}  # config.json model_type -> arch
GGUF_ARCHS = ("gemma2", "gemma3")  # GGUF general.architecture (each its own arch)
GGUF_LAYER_NAMES = {**common.GGUF_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
# The norms scale by (1 + w). Weights in memory hold w, as HF files and jisu artifacts store it; the
# model adds the 1 once when built (common.model_form); llama.cpp stores 1 + w (load_transform).
NORM_OFFSET = 1.0
NATIVE = True   # jisu.engine.native_runner runs it (when the config's details fit, see its supported())

# Layer counts of the 27B Gemmas, whose queries are scaled by (hidden / heads) ** -0.5 instead of
# head_dim ** -0.5. GGUF does not store query_pre_attn_scalar; llama.cpp picks the scale this way.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_fields(arch: str, hidden: int, types: list[str] | tuple[str, ...]) -> dict:
    """The fields a Gemma config has beside the common ones, alike from HF and GGUF."""
    return dict(layer_types=tuple(types), embed_scale=hidden ** 0.5, hidden_act="gelu_tanh", qk_norm=arch == "gemma3")


def config_from_hf(d: dict, where: str) -> ModelConfig:
    if isinstance(d.get("text_config"), dict) and d.get("model_type") == "gemma3":  # the multimodal config
        d = {**d["text_config"], "model_type": "gemma3_text"}
    arch = HF_TYPES[d["model_type"]]
    kw = common.hf_fields(d, arch, where)
    n_layers = kw["num_layers"]
    types = d.get("layer_types")
    if not types:
        pattern = int(d.get("sliding_window_pattern", 6))
        types = [("full_attention" if (i + 1) % pattern == 0 else "sliding_attention") if arch == "gemma3"
                 else ("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(n_layers)]
    local = common.rope_params(d, "sliding_attention")
    kw.update(_gemma_fields(arch, kw["hidden_size"], ["sliding" if t == "sliding_attention" else "full" for t in types]),
              sliding_window=d.get("sliding_window"), attn_softcap=d.get("attn_logit_softcapping"),
              final_softcap=d.get("final_logit_softcapping"),
              query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or kw["head_dim"]),
              rope_local_theta=float(local.get("rope_theta", d.get("rope_local_base_freq", 10000.0)))
              if arch == "gemma3" else None,
              tie_embeddings=bool(d.get("tie_word_embeddings", True)))
    return ModelConfig(**kw)


def config_from_gguf(metadata: dict, shapes: dict, where: str) -> ModelConfig:
    arch = str(metadata["general.architecture"])
    kw = common.gguf_fields(metadata, shapes, arch, where)
    meta = common.gguf_meta(metadata, arch, where)
    n_layers, hidden = kw["num_layers"], kw["hidden_size"]
    window = meta("attention.sliding_window")
    if arch == "gemma2":
        types = tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers))
    else:  # llama.cpp's Gemma 3: every 6th layer is global, the rest use the sliding window
        types = tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(n_layers))
    kw.update(_gemma_fields(arch, hidden, types if window else ()),
              sliding_window=int(window) if window else None,
              attn_softcap=meta("attn_logit_softcapping"), final_softcap=meta("final_logit_softcapping"),
              query_pre_attn_scalar=float(hidden // kw["num_heads"] if n_layers == _GEMMA_27B_LAYERS.get(arch)
                                          else kw["head_dim"]),
              rope_local_theta=10000.0 if arch == "gemma3" else None)
    return ModelConfig(**kw)


def load_transform(cfg: ModelConfig, source: str, name: str):
    """The function that turns tensor `name` as a `source` ("hf" | "gguf") file stores it into its
    form in memory, or None: llama.cpp stores the norms as 1 + w."""
    if source == "gguf" and name.endswith("norm.weight"):
        return _from_model_form
    return None


def _from_model_form(w: torch.Tensor) -> torch.Tensor:
    return w - NORM_OFFSET


# --- end of the architecture declaration ------------------------------------------------------------


class GemmaModel(DecoderModel):
    MLP_NORM = "pre_feedforward_layernorm"
    ATTN_POST_NORM = "post_attention_layernorm"
    MLP_POST_NORM = "post_feedforward_layernorm"

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], numerics: Numerics = INFERENCE):
        # Gemma's norms scale by (1 + w): fold the 1 in once so the shared rms_norm kernel applies.
        self.w = common.model_form(weights, NORM_OFFSET)
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


MODEL = GemmaModel  # the model class of this architecture (the registry builds it)
