"""Random-block GGUF files at real model shapes, written directly (no HF folder, converter or
quantizer): every matrix is random blocks of its type with finite f16 scales sized so the weights
have a std of about 0.02, norms are 1, the type mix follows llama.cpp's Q4_K_M rule (Q6_K for
attn_v / ffn_down of the use_more_bits layers and for the output, Q4_K elsewhere; Q8_0 / Q5_0 where
a row is not a multiple of 256), and the vocabulary is the default model's padded to the shape's
size. For speed and memory at 3B-8B shapes, where converting random bf16 weights costs an hour
here; the text such a model writes is noise.

    python benchmarks/make_random_gguf.py llama-3.2-3b llama-3.1-8b [--out DIR] [--ftype Q4_K_M]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

SHAPES = {  # hidden, layers, heads, kv heads, ffn, vocab, tied
    "qwen2.5-0.5b": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv=2, ffn=4864, vocab=151936, tied=True),
    "llama-3.2-1b": dict(arch="llama", hidden=2048, layers=16, heads=32, kv=8, ffn=8192, vocab=128256, tied=True),
    "llama-3.2-3b": dict(arch="llama", hidden=3072, layers=28, heads=24, kv=8, ffn=8192, vocab=128256, tied=True),
    "llama-3.1-8b": dict(arch="llama", hidden=4096, layers=32, heads=32, kv=8, ffn=14336, vocab=128256, tied=False),
}


def _f16_field(n: int, lo: float, hi: float, rng) -> np.ndarray:
    return rng.uniform(lo, hi, (n, 1)).astype(np.float16).view(np.uint8)


def random_blocks(qtype, shape: tuple[int, int], rng) -> np.ndarray:
    """Random blocks [rows, row bytes] of a type, with f16 fields giving weights of std ~0.02."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    block, size = GGML_QUANT_SIZES[qtype]
    N, K = shape
    nb = N * K // block
    b = rng.integers(0, 256, (nb, size), dtype=np.uint8)
    if qtype == T.Q4_K:  # d * sc * q - dmin * m, sc, m in 0..63, q in 0..15
        b[:, 0:2], b[:, 2:4] = _f16_field(nb, 4e-5, 6e-5, rng), _f16_field(nb, 4e-5, 6e-5, rng)
    elif qtype == T.Q6_K:  # d * sc * (q - 32), sc int8
        b[:, 208:210] = _f16_field(nb, 3e-6, 5e-6, rng)
    elif qtype in (T.Q8_0, T.Q5_0):
        b[:, 0:2] = _f16_field(nb, 2e-4 if qtype == T.Q8_0 else 2e-3, 3e-4 if qtype == T.Q8_0 else 3e-3, rng)
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    return b.reshape(N, K // block * size)


def q4_k_m_type(name: str, layer: int, n_layers: int, K: int):
    """llama.cpp's Q4_K_M choice for a tensor (KQUANTS.md A4), with its shape fallbacks."""
    from gguf import GGMLQuantizationType as T

    more = layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2
    if name == "output" or (name in ("attn_v", "ffn_down") and more):
        return T.Q6_K if K % 256 == 0 else T.Q8_0
    return T.Q4_K if K % 256 == 0 else T.Q5_0


def write(shape_name: str, out: str, seed: int = 0) -> str:
    import gguf

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_models import default_gguf

    s = SHAPES[shape_name]
    path = os.path.join(out, f"{shape_name}-randblocks.Q4_K_M.gguf")
    if os.path.exists(path):
        print(f"{path} exists")
        return path
    rng = np.random.default_rng(seed)
    src = gguf.GGUFReader(default_gguf())
    tokens = [bytes(src.fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8", "replace")
              for i in src.fields["tokenizer.ggml.tokens"].data]
    merges = [bytes(src.fields["tokenizer.ggml.merges"].parts[i]).decode("utf-8", "replace")
              for i in src.fields["tokenizer.ggml.merges"].data]
    tokens += [f"[PAD{i}]" for i in range(s["vocab"] - len(tokens))]
    h, L, H, KV, F, V = s["hidden"], s["layers"], s["heads"], s["kv"], s["ffn"], s["vocab"]
    D = h // H
    w = gguf.GGUFWriter(path + ".part", s["arch"])
    w.add_name(f"{shape_name} random blocks")
    w.add_block_count(L)
    w.add_context_length(8192)
    w.add_embedding_length(h)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tpl = src.fields.get("tokenizer.chat_template")
    if tpl is not None:
        w.add_chat_template(bytes(tpl.parts[-1]).decode())
    mats = [("token_embd", -1, (V, h))]
    for i in range(L):
        mats += [(f"blk.{i}.attn_q", i, (H * D, h)), (f"blk.{i}.attn_k", i, (KV * D, h)),
                 (f"blk.{i}.attn_v", i, (KV * D, h)), (f"blk.{i}.attn_output", i, (h, H * D)),
                 (f"blk.{i}.ffn_gate", i, (F, h)), (f"blk.{i}.ffn_up", i, (F, h)), (f"blk.{i}.ffn_down", i, (h, F))]
    if not s["tied"]:
        mats.append(("output", -1, (V, h)))
    t0 = time.time()
    for name, layer, shp in mats:
        short = name.split(".")[-1]
        if short == "token_embd":
            qt = q4_k_m_type("output" if s["tied"] else "token_embd", 0, L, shp[1])
        else:
            qt = q4_k_m_type(short, layer, L, shp[1])
        w.add_tensor(f"{name}.weight", random_blocks(qt, shp, rng), raw_dtype=qt)
        if layer >= 0 and short == "attn_q":
            w.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(h, np.float32))
            w.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(h, np.float32))
            if s["arch"] == "qwen2":
                for p, n in (("q", H * D), ("k", KV * D), ("v", KV * D)):
                    w.add_tensor(f"blk.{layer}.attn_{p}.bias", np.zeros(n, np.float32))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    os.replace(path + ".part", path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB, {time.time() - t0:.0f} s)")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="+", choices=sorted(SHAPES))
    ap.add_argument("--out", default=os.path.expanduser("~/.cache/jisu/bench-models"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.shapes:
        write(name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
