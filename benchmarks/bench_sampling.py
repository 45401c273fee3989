"""What sampling costs in decode: greedy vs temperature 0.7 / top-p 0.95 with a seed per request,
through the engine (jisu's Python API), at 1 and 16 streams, on llama.cpp's Q4_0 file of the
default model.

    python benchmarks/bench_sampling.py [--threads 2] [--tokens 128] [--passes 2] [--reference]

Each level runs its configurations interleaved (A B B A ..., with --reference A B C C B A ...:
C is the same sampling drawn by the Python reference sampler), so that a shared machine's drift
hits every configuration alike. Decode tok/s of a pass = tokens generated after every stream has
its first token / the time they took (prefill excluded). Reports the median per configuration,
the ratio to greedy, and writes benchmarks/results/sampling.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jisu  # noqa: E402
from jisu.config import SamplingParams  # noqa: E402
from jisu.engine import sampling  # noqa: E402
from jisu.engine.engine import Engine  # noqa: E402

MODEL = os.path.expanduser("~/.cache/jisu/bench-models/SmolLM2-135M-Instruct.Q4_0.gguf")
PROMPTS = [
    "The history of the printing press begins",
    "Here is a short story about a lighthouse keeper who",
    "Explain how a refrigerator works. A refrigerator",
    "The three most important ideas in economics are",
    "Once upon a time, in a village by the sea,",
    "A good recipe for tomato soup starts with",
    "The main differences between cats and dogs are",
    "In computer science, a hash table is",
]


def params_for(config: str, i: int, tokens: int) -> SamplingParams:
    # speculation off in both: the sampler alone
    if config == "greedy":
        return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, speculative="off")
    return SamplingParams(temperature=0.7, top_p=0.95, seed=1000 + i, max_tokens=tokens, ignore_eos=True,
                          speculative="off")


def one_pass(llm, config: str, streams: int, tokens: int) -> dict:
    """Decode tok/s of `streams` requests generating `tokens` each, after their prefill."""
    native = sampling.native_sampler_available
    if config == "reference":
        sampling.native_sampler_available = lambda: False
    try:
        engine = Engine.from_llm(llm, max_num_seqs=max(16, streams))
        tok = llm.tokenizer
        ids = [engine.add_request(tok.encode(PROMPTS[i % len(PROMPTS)]), params_for(config, i, tokens))
               for i in range(streams)]
        got = {rid: 0 for rid in ids}
        t0 = None
        n0 = 0
        while engine.has_work():
            for out in engine.step():
                got[out.request_id] = out.num_generated_tokens
            if t0 is None and all(v > 0 for v in got.values()):
                t0, n0 = time.perf_counter(), sum(got.values())
        elapsed = time.perf_counter() - t0
        n = sum(got.values()) - n0
        return {"tok_s": n / elapsed, "tokens": n, "seconds": elapsed}
    finally:
        sampling.native_sampler_available = native


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--passes", type=int, default=2, help="pairs of interleaved passes per level")
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--reference", action="store_true", help="also time the Python reference sampler")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sampling.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = jisu.load(args.model, threads=args.threads)
    configs = ["greedy", "sampled"] + (["reference"] if args.reference else [])
    one_pass(llm, "sampled", 1, 8)  # warm up (kernels, caches)
    levels = []
    for streams in [int(s) for s in args.streams.split(",")]:
        runs = {c: [] for c in configs}
        for p in range(args.passes):
            order = configs + configs[::-1]          # A B C C B A
            for c in order:
                r = one_pass(llm, c, streams, args.tokens)
                runs[c].append(r["tok_s"])
                print(f"streams {streams:2d} pass {p} {c:9s} {r['tok_s']:8.1f} tok/s", flush=True)
        med = {c: statistics.median(v) for c, v in runs.items()}
        level = {"streams": streams, "tok_s": runs, "median_tok_s": med,
                 "cost_vs_greedy": {c: 1 - med[c] / med["greedy"] for c in configs if c != "greedy"}}
        levels.append(level)
        print(f"streams {streams:2d}: " + ", ".join(f"{c} {med[c]:.1f}" for c in configs) + "; sampling costs "
              + ", ".join(f"{c} {100 * v:+.1f}%" for c, v in level["cost_vs_greedy"].items()), flush=True)
    result = {"model": args.model, "threads": args.threads, "tokens": args.tokens, "passes": args.passes,
              "sampling": "temperature 0.7, top_p 0.95, one seed per request",
              "native_sampler": sampling.native_sampler_available(), "machine": platform.processor() or platform.machine(),
              "load_avg": os.getloadavg(), "levels": levels}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
