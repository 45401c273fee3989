"""Tiny random models for tests, written to disk the way jisu finds them, in milliseconds: HF
folders (config.json + model.safetensors + tokenizer.json) and GGUF files as llama.cpp's converter
writes them (q/k rows permuted for Llama's RoPE pairs, Gemma norms stored as 1 + w, tied or
unused output matrices dropped). One byte-level BPE tokenizer and one GGUF writer serve both kinds
of weights: the hand-made Llama of `tiny_weights` (with chat specials and a template) and the
transformers models of `CASES` (ten architecture variants, checked against transformers)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# --- tokenizer -------------------------------------------------------------------------------
# The 256 byte-level symbols plus a few merges; the chat flavour puts three control tokens first
# and pads the vocabulary to TINY's 300.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
CHAT_MERGES = MERGES + [("Ġ", "a")]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB_SIZE = 256 + len(MERGES)
BOS_ID, EOS_ID = 0, 1  # of the plain flavour: any ids in range will do, the tests feed ids directly


def tokenizer_vocab(chat: bool = False, size: int = 300) -> tuple[list[str], list[str]]:
    """(tokens by id, merges as "a b" strings); `chat`: control tokens first, padded to `size`."""
    from tokenizers.pre_tokenizers import ByteLevel

    merges = CHAT_MERGES if chat else MERGES
    tokens = (SPECIALS if chat else []) + sorted(ByteLevel.alphabet())
    tokens += [a + b for a, b in merges]
    if chat:
        tokens += [f"[PAD{i}]" for i in range(size - len(tokens))]
    return tokens, [f"{a} {b}" for a, b in merges]


def save_tokenizer(folder: str, chat: bool = False) -> None:
    """tokenizer.json (and for `chat` a tokenizer_config.json with the template) in `folder`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = tokenizer_vocab(chat)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if chat:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": CHAT_TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, f)
    tok.save(os.path.join(folder, "tokenizer.json"))


# --- GGUF ------------------------------------------------------------------------------------

def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: reorder q/k rows for its interleaved RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_file(path: str, arch: str, state: dict[str, torch.Tensor], hp: dict, *, chat: bool,
                    chat_template: str | None = None, tensor_type=None, drop_head: bool = False,
                    permute: bool = False, extra=None) -> str:
    """A GGUF of `state` (HF names, HF conventions) with llama.cpp's names and conventions.
    hp: HF-style config keys (hidden_size, num_hidden_layers, ...); `permute`: q/k rows in llama.cpp's
    Llama order (its converter does this for Llama only); `extra(writer)` adds the
    architecture's own metadata; `tensor_type` quantizes every matrix (gguf-py's quantizer)."""
    import gguf

    n_layers, heads, kv_heads = hp["num_hidden_layers"], hp["num_attention_heads"], hp["num_key_value_heads"]
    w = gguf.GGUFWriter(path, arch)
    if hp.get("name"):
        w.add_name(hp["name"])
    w.add_block_count(n_layers)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if extra is not None:
        extra(w)
    tokens, merges = tokenizer_vocab(chat)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS and chat else gguf.TokenType.NORMAL
                       for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1 if chat else BOS_ID)
    w.add_eos_token_id(2 if chat else EOS_ID)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    # an architecture gguf-py does not know (a test of jisu's refusal) is written with Llama's names
    known = gguf.MODEL_ARCH[arch.upper()] if arch.upper() in gguf.MODEL_ARCH.__members__ else gguf.MODEL_ARCH.LLAMA
    tmap = gguf.get_tensor_name_map(known, n_layers)
    for name, t in state.items():
        t = t.detach().float().clone()
        if name == "rope_freqs" or (name == "lm_head.weight" and drop_head):
            continue
        if permute:
            if name.endswith("q_proj.weight"):
                t = permute_qk(t, heads)
            elif name.endswith("k_proj.weight"):
                t = permute_qk(t, kv_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1  # llama.cpp folds Gemma's (1 + w) into the stored weight
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        a = t.numpy().astype(np.float32)
        if tensor_type is not None and a.ndim == 2:
            w.add_tensor(new, gguf.quants.quantize(a, tensor_type), raw_dtype=tensor_type)
        else:
            w.add_tensor(new, a)
    if "rope_freqs" in state:
        w.add_tensor("rope_freqs.weight", state["rope_freqs"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- the hand-made Llama (chat tokenizer and template) ----------------------------------------

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_weights(seed: int = 0, cfg: dict = TINY) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w = {"model.embed_tokens.weight": r(v, h, scale=1.0), "model.norm.weight": 1 + r(h, scale=0.1),
         "lm_head.weight": r(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + r(h, scale=0.1), p + "post_attention_layernorm.weight": 1 + r(h, scale=0.1),
              p + "self_attn.q_proj.weight": r(h, h), p + "self_attn.k_proj.weight": r(kv, h),
              p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.o_proj.weight": r(h, h),
              p + "mlp.gate_proj.weight": r(f, h), p + "mlp.up_proj.weight": r(f, h), p + "mlp.down_proj.weight": r(h, f)}
    return w


def write_hf_llama(folder: str, seed: int = 0) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_tokenizer(folder, chat=True)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", **TINY}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({k: v.contiguous() for k, v in tiny_weights(seed).items()}, os.path.join(folder, "model.safetensors"))
    return folder


def write_gguf_llama(path: str, seed: int = 0, *, arch: str = "llama", chat_template: str = CHAT_TEMPLATE,
                     tensor_type=None) -> str:
    """The hand-made Llama as a GGUF (F32, or every matrix in `tensor_type`)."""
    return write_gguf_file(path, arch, tiny_weights(seed), {**TINY, "rms_norm_eps": 1e-5}, chat=True,
                           chat_template=chat_template, tensor_type=tensor_type, permute=True,
                           extra=lambda w: w.add_rope_freq_base(10000.0))


# --- transformers models: ten variants of five architectures ----------------------------------

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
    """A transformers model as llama.cpp's convert_hf_to_gguf.py writes it (F32 tensors)."""
    import gguf

    arch = case.gguf_arch
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters

    def extra(w) -> None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
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

    state = dict(model.state_dict())
    if arch == "llama" and rope.get("rope_type") == "llama3":
        state["rope_freqs"] = _llama3_rope_factors(cfg)
    # llama.cpp drops the tied (or, for Gemma, unused) output matrix
    drop = bool(cfg.tie_word_embeddings) or arch.startswith("gemma")
    write_gguf_file(path, arch, state, {**cfg.to_dict(), "name": f"tiny-{case.name}"}, chat=False,
                    drop_head=drop, permute=arch == "llama", extra=extra)
