"""Two jisu checkouts compared in one run: single-stream decode, 256-token prefill and 16 streams
through the engine, on the same models, in alternating processes (A B B A ...), plus whether
their greedy tokens agree. For checking that a change keeps speed and exactness.

    python benchmarks/bench_ab.py --a /path/to/old/checkout --b . [--model FILE ...] [--precise]
        [--reps 4] [--threads 2] [--quick] [--out results.json]

Each checkout must have its native module built in place (`python setup.py build_ext --inplace`).
Every process loads the model once, warms up, then measures (greedy, EOS ignored):
  decode tok/s   = (256 - 16) / (time of 256 new tokens - time of 16 new tokens), LLM.generate
  prefill tok/s  = 256 / time of a 256-token prompt + 1 new token
  16 streams     = 16 x 64 new tokens / wall time, Engine.generate (greedy, and temperature 0.7 /
                   top-p 0.95 with a seed per request)
Ratios are B / A of the medians over reps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import torch
import jisu
from jisu.config import SamplingParams
from jisu.engine.engine import Engine

model, precise, threads, quick = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4] == "1"
llm = jisu.load(None if model == "default" else model, threads=threads, precise=precise)
chat = llm.tokenizer.encode_chat([{"role": "user", "content": "Write a short story about a robot who learns to paint."}])
text = ("The history of computing is a story of abstraction layered on abstraction. " * 40)
long_ids = llm.tokenizer.encode(text)[:256]
assert len(long_ids) == 256

def timed(ids, n):
    t0 = time.perf_counter()
    out = llm.generate(ids, temperature=0, max_tokens=n, ignore_eos=True)
    return time.perf_counter() - t0, out

timed(chat, 16); timed(long_ids, 1)            # warm-up
t16 = min(timed(chat, 16)[0] for _ in range(2))
t256 = min(timed(chat, 256)[0] for _ in range(2))
tp = min(timed(long_ids, 1)[0] for _ in range(2))
res = {"decode_tok_s": (256 - 16) / (t256 - t16), "prefill_tok_s": 256 / tp}
prompts = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain recursion to a child."}],
]
res["greedy"] = [list(llm.generate(llm.tokenizer.encode_chat(p), temperature=0, max_tokens=32).token_ids)
                 for p in prompts]
if quick:
    print("RESULT " + json.dumps(res))
    sys.exit(0)
eng = Engine.from_llm(llm)
many = [llm.tokenizer.encode_chat([{"role": "user", "content": f"Tell me fact number {i} about space."}])
        for i in range(16)]
for name, mk in [("streams16_greedy", lambda i: SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)),
                 ("streams16_t07", lambda i: SamplingParams(temperature=0.7, top_p=0.95, seed=i, max_tokens=64,
                                                            ignore_eos=True))]:
    eng.generate(many[:2], [mk(i) for i in range(2)])
    t0 = time.perf_counter()
    outs = eng.generate(many, [mk(i) for i in range(16)])
    dt = time.perf_counter() - t0
    res[name + "_tok_s"] = sum(len(o["token_ids"]) for o in outs) / dt
    if name == "streams16_greedy":
        res["streams16_tokens"] = [o["token_ids"] for o in outs]
print("RESULT " + json.dumps(res))
"""

METRICS = ["decode_tok_s", "prefill_tok_s", "streams16_greedy_tok_s", "streams16_t07_tok_s"]


def run_one(tree: str, model: str, precise: bool, threads: int, quick: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    p = subprocess.run([sys.executable, "-c", WORKER, model, "1" if precise else "0", str(threads),
                        "1" if quick else "0"],
                       cwd=os.path.abspath(tree), env=env, capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{tree}: worker failed:\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="the baseline checkout")
    ap.add_argument("--b", required=True, help="the checkout under test")
    ap.add_argument("--model", action="append", help="GGUF file or folder (default: the default model)")
    ap.add_argument("--precise", action="store_true", help="also run each model with --precise")
    ap.add_argument("--reps", type=int, default=4, help="process pairs per model and mode (A B, then B A)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="decode, prefill and greedy tokens only (more reps fit)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    metrics = METRICS[:2] if args.quick else METRICS
    report = {"a": os.path.abspath(args.a), "b": os.path.abspath(args.b), "runs": []}
    for model in args.model or ["default"]:
        for precise in ([False, True] if args.precise else [False]):
            got = {"a": [], "b": []}
            for r in range(args.reps):
                order = ["a", "b"] if r % 2 == 0 else ["b", "a"]
                for side in order:
                    got[side].append(run_one(getattr(args, side), model, precise, args.threads, args.quick))
            row = {"model": model, "precise": precise}
            for m in metrics:
                a = statistics.median(x[m] for x in got["a"])
                b = statistics.median(x[m] for x in got["b"])
                row[m] = {"a": round(a, 1), "b": round(b, 1), "ratio": round(b / a, 3)}
            row["greedy_equal"] = all(x["greedy"] == got["a"][0]["greedy"] for x in got["a"] + got["b"])
            if not args.quick:
                row["streams16_equal"] = all(x["streams16_tokens"] == got["a"][0]["streams16_tokens"]
                                             for x in got["a"] + got["b"])
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
