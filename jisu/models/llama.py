"""The Llama family: Llama 2/3, Mistral, SmolLM, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).
Pre-norm decoder, rotate-half RoPE, grouped KV heads, SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import UnsupportedError
from . import common
from .layers import INFERENCE, DecoderModel, Numerics, Rotary, rope_inv_freq

# --- architecture declaration (jisu.models registers it; the loaders read it) --------------------------

HF_TYPES = {"llama": "llama", "mistral": "mistral", "smollm": "llama", "smollm2": "llama",  # config.json
            "qwen2": "qwen2", "qwen3": "qwen3"}                                         # model_type -> arch
GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3")  # GGUF general.architecture (each its own arch)
GGUF_LAYER_NAMES = {**common.GGUF_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"}
NORM_OFFSET = 0.0  # the norms scale by w
NATIVE = True      # jisu.engine.native_runner runs it (when the config's details fit, see its supported())


def config_from_hf(d: dict, where: str) -> ModelConfig:
    arch = HF_TYPES[d["model_type"]]
    kw = common.hf_fields(d, arch, where)
    act = d.get("hidden_act", "silu")
    if act not in ("silu",):
        raise UnsupportedError(f"{where}: activation {act!r} is not supported for {arch}")
    if d.get("sliding_window") and arch == "mistral" and d["sliding_window"] < d.get("max_position_embeddings", 0):
        kw.update(sliding_window=int(d["sliding_window"]), layer_types=("sliding",) * kw["num_layers"])
    kw.update(attn_bias=bool(d.get("attention_bias", arch == "qwen2")), qk_norm=arch == "qwen3")
    return ModelConfig(**kw)


def config_from_gguf(metadata: dict, shapes: dict, where: str) -> ModelConfig:
    return ModelConfig(**common.gguf_fields(metadata, shapes, str(metadata["general.architecture"]), where))


def load_transform(cfg: ModelConfig, source: str, name: str):
    """The function that turns tensor `name` as a `source` ("hf" | "gguf") file stores it into its
    form in memory, or None: llama.cpp permutes the q/k rows of Llama and Mistral."""
    if source == "gguf" and cfg.arch in ("llama", "mistral"):
        return common.qk_unpermute(cfg, name)
    return None


# --- end of the architecture declaration ------------------------------------------------------------


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


MODEL = LlamaModel  # the model class of this architecture (the registry builds it)
