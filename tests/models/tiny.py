"""Tiny random `transformers` models saved the way jisu finds them on disk: an HF folder
(config.json + model.safetensors + tokenizer.json) and, from the same weights, a GGUF file written
the way llama.cpp's convert_hf_to_gguf.py writes one (F32 tensors)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# --- tokenizer -------------------------------------------------------------------------------

# A few merges on top of the 256 byte-level symbols: vocab = 256 + len(MERGES).
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
VOCAB_SIZE = 256 + len(MERGES)
BOS_ID, EOS_ID = 0, 1  # any ids in range will do; the tests feed token ids directly


def tokenizer_vocab() -> tuple[list[str], list[str]]:
    """(tokens by id, merges as "a b" strings) of a byte-level BPE tokenizer."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet())
    assert len(tokens) == 256
    tokens += [a + b for a, b in MERGES]
    return tokens, [f"{a} {b}" for a, b in MERGES]


def save_tokenizer(folder: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, _ = tokenizer_vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=list(MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(folder, "tokenizer.json"))


# --- models ----------------------------------------------------------------------------------

BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None)


@dataclass
class Case:
    name: str
    config_cls: str                 # transformers class names
    model_cls: str
    config: dict[str, Any]
    gguf_arch: str | None = None    # None: no GGUF variant

    def hf_config(self):
        import transformers

        kw = {**BASE, **self.config}
        return getattr(transformers, self.config_cls)(**kw)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

CASES = {c.name: c for c in [
    Case("llama", "LlamaConfig", "LlamaForCausalLM", dict(head_dim=16, rope_parameters={"rope_type": "default",
                                                                                        "rope_theta": 5000.0}),
         gguf_arch="llama"),
    # head_dim 16, theta 1e4, original context 64: one frequency kept, two smoothed, five divided by 8
    Case("llama3_rope", "LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=3, rope_parameters=LLAMA3_ROPE),
         gguf_arch="llama"),
    Case("llama_linear_rope", "LlamaConfig", "LlamaForCausalLM",
         dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}), gguf_arch="llama"),
    Case("mistral", "MistralConfig", "MistralForCausalLM", dict(head_dim=16, sliding_window=5)),
    Case("qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 1e6}),
         gguf_arch="qwen2"),
    Case("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True),
         gguf_arch="qwen3"),
    Case("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
         dict(num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=6,
              attn_logit_softcapping=2.0, final_logit_softcapping=15.0, hidden_activation="gelu_pytorch_tanh")),
    # llama.cpp does not store query_pre_attn_scalar: it uses head_dim (hidden/heads for the 27B)
    Case("gemma2_gguf", "Gemma2Config", "Gemma2ForCausalLM",
         dict(num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=32, sliding_window=6,
              attn_logit_softcapping=2.0, final_logit_softcapping=15.0, hidden_activation="gelu_pytorch_tanh"),
         gguf_arch="gemma2"),
    # six layers: five sliding, then a global one (llama.cpp's fixed Gemma 3 pattern)
    Case("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
         dict(num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32, sliding_window=5,
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
              hidden_activation="gelu_pytorch_tanh"),
         gguf_arch="gemma3"),
    # HF only: an explicit non-default layer pattern, local base != 1e4, qpas != head_dim, final softcap
    Case("gemma3_pattern", "Gemma3TextConfig", "Gemma3ForCausalLM",
         dict(num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=20, sliding_window=4,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              final_logit_softcapping=8.0,
              rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
              hidden_activation="gelu_pytorch_tanh")),
]}


def is_gemma(case: Case) -> bool:
    return case.config_cls.startswith("Gemma")


def build_hf_model(case: Case, seed: int = 0):
    """The transformers model with random weights big enough that every path matters."""
    import transformers

    torch.manual_seed(seed)
    config = case.hf_config()
    config._attn_implementation = "eager"
    model = getattr(transformers, case.model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                # Gemma scales by (1 + w) and initialises w = 0; the others scale by w, init 1
                p.copy_((0.0 if is_gemma(case) else 1.0) + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:  # linear [out, in]
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model


def save_hf(model, folder: str) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder)


# --- GGUF ------------------------------------------------------------------------------------

def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: reorder q/k rows for its interleaved RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(cfg) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors (the rope_freqs tensor)."""
    p = cfg.rope_parameters
    dim = cfg.head_dim
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def write_gguf(model, case: Case, path: str) -> None:
    import gguf

    arch = case.gguf_arch
    cfg = model.config
    n_layers, heads, kv_heads = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{case.name}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    rope = cfg.rope_parameters
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    elif arch == "gemma3":
        full = rope.get("full_attention", rope)
        w.add_rope_freq_base(full["rope_theta"])
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
    else:
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])

    tokens, merges = tokenizer_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    for name, t in model.state_dict().items():
        t = t.detach().float().clone()
        if name == "lm_head.weight" and (cfg.tie_word_embeddings or arch.startswith("gemma")):
            continue  # llama.cpp drops the tied (or, for Gemma, unused) output matrix
        if arch == "llama":
            if name.endswith("q_proj.weight"):
                t = _permute(t, heads)
            elif name.endswith("k_proj.weight"):
                t = _permute(t, kv_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1  # llama.cpp folds Gemma's (1 + w) into the stored weight
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        w.add_tensor(new, t.numpy().astype(np.float32))
    if arch == "llama" and rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
