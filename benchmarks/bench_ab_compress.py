"""Two jisu checkouts compress the same model with the same recipes: are the artifacts' tensors
bit-for-bit equal, and their measured KLD / perplexity the same? For checking that a change
to the compression code keeps its results.

    python benchmarks/bench_ab_compress.py --a /path/to/old/checkout --b . \
        [--recipes "rtn:w4g32;gptq:w4g32;awq:w4g32"] [--samples 16] [--seq-len 128] [--model M] [--out F]

Each checkout must have its native module built in place. One `jisu compress` process per
checkout and recipe; the artifacts go to a temporary folder and are deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

DEFAULT = "rtn:w4g32;gptq:w4g32;awq:w4g32;nf4:g64;mixed:bpw=4.5:w4;gptq:w3g32+embed=w4g32+head=w4g32"


def compress(tree: str, model: str | None, recipe: str, out: str, args) -> tuple[dict, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cmd = [sys.executable, "-m", "jisu.cli", "compress", *([model] if model else []), "-o", out,
           "--recipe", recipe, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--threads", str(args.threads), "--json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=os.path.abspath(tree), env=env, capture_output=True, text=True, timeout=7200)
    if p.returncode:
        raise SystemExit(f"{tree}: {recipe} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def tensors_equal(a: str, b: str) -> tuple[bool, int, list[str]]:
    import torch
    from safetensors import safe_open

    fa = safe_open(os.path.join(a, "model.safetensors"), "pt")
    fb = safe_open(os.path.join(b, "model.safetensors"), "pt")
    ka, kb = set(fa.keys()), set(fb.keys())
    differ = sorted(ka ^ kb)
    for k in sorted(ka & kb):
        x, y = fa.get_tensor(k).contiguous(), fb.get_tensor(k).contiguous()
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            differ.append(k)
    return not differ, len(ka), differ[:5]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--recipes", default=DEFAULT)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="jisu-ab-") as tmp:
        for i, recipe in enumerate(r for r in args.recipes.split(";") if r):
            got = {}
            for side in ("a", "b"):
                out = os.path.join(tmp, f"{side}{i}")
                got[side] = (out, *compress(getattr(args, side), args.model, recipe, out, args))
            same, n, differ = tensors_equal(got["a"][0], got["b"][0])
            qa, qb = got["a"][1], got["b"][1]
            row = {"recipe": recipe, "tensors": n, "bitwise_equal": same, "differ": differ,
                   **{f"{k}_{s}": q.get(k) for k in ("kld_mean", "perplexity", "top1_agreement")
                      for s, q in (("a", qa.get("quality", qa)), ("b", qb.get("quality", qb)))},
                   "seconds_a": round(got["a"][2], 1), "seconds_b": round(got["b"][2], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"a": os.path.abspath(args.a), "b": os.path.abspath(args.b), "samples": args.samples,
                       "seq_len": args.seq_len, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
