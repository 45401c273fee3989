"""Faithful by default, measured: for a GGUF (default: the default model), 50 chat prompts x 64
greedy tokens per mode, counted equal to the fp32 reference's on the same weights; decode and
256-token prefill speed of each mode, and with --llama-bench llama.cpp's on the same file.

    python benchmarks/bench_faithful.py [--model F.gguf] [--modes faithful,fast,precise,refine=1.2]
                                        [--llama-bench] [--no-timing] [--json out.json]

Modes: faithful (the default: precise activations, fp16 KV cache), fast (--fast: plain int8
activations, fp16 KV), precise (--precise: precise activations, fp32 KV), fast_kv32 (plain int8,
fp32 KV), refine=T (ops.set_act_refine(T): blocks above T x the row's mean block maximum refined).
The token counts are exact; the timings are only as good as the machine is quiet."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jisu  # noqa: E402
from jisu.api import LLM  # noqa: E402
from jisu.config import SamplingParams  # noqa: E402
from jisu.engine.config import EngineConfig  # noqa: E402
from jisu.engine.engine import Engine  # noqa: E402
from jisu.io.sources import resolve  # noqa: E402
from jisu.kernels import ops  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = os.path.join(HERE, "prompts_chat50.json")
LLAMA_BENCH = "/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-bench"


def greedy_all(llm: LLM, prompts: list[list[int]], n: int, kv_dtype=None) -> list[list[int]]:
    """Greedy tokens of every prompt, all in one engine (its steps are batch invariant: each
    sequence's tokens are those it gets alone)."""
    blocks = sum(-(-(len(p) + n) // 16) for p in prompts)
    engine = Engine(llm.step_runner, llm.tokenizer, EngineConfig(
        eos_ids=llm.eos_ids, max_context=llm.config.max_position, num_blocks=blocks, block_size=16,
        max_num_seqs=len(prompts), prefix_caching=False, kv_dtype=kv_dtype))
    return [r["token_ids"] for r in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=n))]


class Mode:
    """One way of running the packed model: the kernels' activation setting, whether generation
    goes through the faithful runner, and the KV dtype (None: the runner's own)."""

    def __init__(self, name: str):
        self.name, self.kv = name, None
        self.refine, self.faithful = 0.0, False
        if name == "faithful":
            self.faithful = True
        elif name == "precise":
            self.refine = ops.PRECISE
        elif name == "fast_kv32":
            self.kv = torch.float32
        elif name.startswith("refine="):
            self.refine = float(name.split("=", 1)[1])
        elif name != "fast":
            raise SystemExit(f"unknown mode {name!r}")

    def llm(self, base: LLM) -> LLM:
        ops.set_act_refine(self.refine)
        return LLM(base.model, base.tokenizer, base.source, base.runner, faithful=self.faithful)


def timing(llm: LLM, reps: int, decode_tokens: int = 128, prefill_tokens: int = 256) -> dict:
    """Best of `reps`: decode tok/s of one sequence (a short prompt, then `decode_tokens` tokens)
    and prefill tok/s of a `prefill_tokens`-token prompt."""
    g = torch.Generator().manual_seed(0)
    long = torch.randint(100, llm.config.vocab_size - 100, (prefill_tokens,), generator=g).tolist()
    short = llm.tokenizer.encode("The history of the printing press")
    llm.generate(short, max_tokens=8, temperature=0)  # warm-up (engine, pages)
    dec, pre = [], []
    for _ in range(reps):
        dec.append(llm.generate(short, max_tokens=decode_tokens, temperature=0, ignore_eos=True).decode_tok_s)
        pre.append(llm.generate(long, max_tokens=1, temperature=0).prefill_tok_s)
    return {"decode_tok_s": max(dec), "prefill_tok_s": max(pre), "decode_runs": dec, "prefill_runs": pre}


def llama_bench(path: str, threads: int) -> dict:
    """llama.cpp's decode (n=128) and prefill (p=256) tok/s on the same file."""
    cmd = [LLAMA_BENCH, "-m", path, "-t", str(threads), "-p", "256", "-n", "128", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    out = {}
    for r in rows:
        key = "prefill_tok_s" if r.get("n_prompt", 0) > 0 else "decode_tok_s"
        out[key] = float(r["avg_ts"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--modes", default="faithful,fast,precise")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--prompts", default=PROMPTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-timing", action="store_true", help="only the token counts")
    ap.add_argument("--llama-bench", action="store_true", help="also time llama-bench on the same file")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    path = resolve(args.model).path
    torch.set_num_threads(args.threads)
    modes = [Mode(m) for m in args.modes.split(",") if m]
    texts = json.load(open(args.prompts))
    before = ops.get_act_refine()
    result = {"model": path, "threads": args.threads, "tokens": args.tokens, "prompts": len(texts),
              "load_avg": list(os.getloadavg()), "modes": {}}
    try:
        ref_llm = jisu.load(path, packed=False, threads=args.threads)
        prompts = [ref_llm.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
        t0 = time.perf_counter()
        ref = greedy_all(ref_llm, prompts, args.tokens)
        result["reference_s"] = time.perf_counter() - t0
        del ref_llm
        base = jisu.load(path, threads=args.threads, fast=True)
        for mode in modes:
            llm = mode.llm(base)
            t0 = time.perf_counter()
            out = greedy_all(llm, prompts, args.tokens, mode.kv)
            differ = [i for i, (a, b) in enumerate(zip(out, ref)) if a != b]
            first = [next(j for j, (a, b) in enumerate(zip(out[i] + [-1], ref[i] + [-2])) if a != b) for i in differ]
            r = {"equal": len(texts) - len(differ), "differ": differ, "first_difference": first,
                 "kv_dtype": str(mode.kv or llm.step_runner.kv_dtype), "counts_s": time.perf_counter() - t0}
            if not args.no_timing and mode.kv is None:
                r.update(timing(llm, args.reps))
            result["modes"][mode.name] = r
            print(f"{mode.name:>12}: {r['equal']}/{len(texts)} prompts equal to fp32"
                  + (f"; decode {r['decode_tok_s']:.1f} tok/s, prefill {r['prefill_tok_s']:.1f} tok/s"
                     if "decode_tok_s" in r else ""), flush=True)
    finally:
        ops.set_act_refine(before)
    lc = None
    if args.llama_bench:
        try:
            lc = result["llama_cpp"] = llama_bench(path, args.threads)
        except (OSError, subprocess.CalledProcessError, ValueError, KeyError) as e:  # e.g. built for another CPU
            result["llama_cpp_error"] = str(e)
            print(f"llama-bench failed: {e}", file=sys.stderr)
    if lc:
        for name, r in result["modes"].items():
            if "decode_tok_s" in r:
                r["decode_ratio"] = r["decode_tok_s"] / lc["decode_tok_s"]
                r["prefill_ratio"] = r["prefill_tok_s"] / lc["prefill_tok_s"]
                print(f"{name:>12}: decode {r['decode_ratio']:.2f}x, prefill {r['prefill_ratio']:.2f}x llama.cpp")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
