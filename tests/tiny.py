"""Tiny random models written to disk for tests: an HF Llama folder and a GGUF, both with a real
(tiny) byte-level BPE tokenizer. Small enough to build in milliseconds."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_vocab() -> tuple[list[str], list[str]]:
    """Specials, the 256 byte-level symbols, and a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = SPECIALS + sorted(ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        tokens.append(a + b)
    tokens += [f"[PAD{i}]" for i in range(TINY["vocab_size"] - len(tokens))]
    return tokens, [f"{a} {b}" for a, b in merges]


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
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    os.makedirs(folder, exist_ok=True)
    tokens, merges = tiny_vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", **TINY}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, f)
    save_file({k: v.contiguous() for k, v in tiny_weights(seed).items()}, os.path.join(folder, "model.safetensors"))
    return folder


def write_gguf_llama(path: str, seed: int = 0, *, arch: str = "llama", chat_template: str = CHAT_TEMPLATE,
                     tensor_type=None) -> str:
    """A tiny GGUF as llama.cpp's converter writes it (q/k rows permuted for RoPE pairs)."""
    import gguf

    w = tiny_weights(seed)
    tokens, merges = tiny_vocab()
    wr = gguf.GGUFWriter(path, arch)
    wr.add_block_count(TINY["num_hidden_layers"])
    wr.add_context_length(TINY["max_position_embeddings"])
    wr.add_embedding_length(TINY["hidden_size"])
    wr.add_feed_forward_length(TINY["intermediate_size"])
    wr.add_head_count(TINY["num_attention_heads"])
    wr.add_head_count_kv(TINY["num_key_value_heads"])
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_freq_base(10000.0)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(tokens)
    wr.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    wr.add_token_merges(merges)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_chat_template(chat_template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in w.items():
        if name in names:
            out = names[name]
        else:
            _, _, i, *rest = name.split(".")
            out = f"blk.{i}.{layer['.'.join(rest[:-1])]}.weight"
        a = t.numpy().astype(np.float32)
        if out.endswith(("attn_q.weight", "attn_k.weight")):
            heads = TINY["num_attention_heads"] if "attn_q" in out else TINY["num_key_value_heads"]
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        if tensor_type is not None and a.ndim == 2:
            wr.add_tensor(out, gguf.quants.quantize(a, tensor_type), raw_dtype=tensor_type)
        else:
            wr.add_tensor(out, a)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path
