"""Compression recipes on the default model (SmolLM2-135M-Instruct; the reference is the fp32 model
dequantized from the shipped Q4_1 GGUF): bits per weight, size, KLD, top-1 agreement, perplexity,
compress time and peak RSS, one `jisu compress` process per recipe.

Quality is what `jisu compress` measures before it commits an artifact: mean KL(fp32 || quantized)
per token over --chunks x --ctx tokens of held-out text (the second half of the built-in pydoc
corpus; calibration uses the first half), the top-1 agreement of the two models' predictions and
the quantized model's perplexity on the same tokens. Peak RSS is the compress process's maximum
resident set (os.wait4), time its wall clock (load, quantize, write, verify, measure).

  python benchmarks/bench_compress.py [--recipes "rtn:w4g32;gptq:w4g32;..."] [--samples 64] [--seq-len 256] [--merge]
                                      [--threads 2] [--out benchmarks/results/compress]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_RECIPES = ["rtn:w8", "rtn:w4g32", "gptq:w4g32", "awq:w4g32", "rtn:w3g32", "gptq:w3g32", "rtn:w2g32a",
                   "gptq:w2g32a", "nf4:g64", "gptq:nf4g64", "mixed:bpw=4.5", "mixed:bpw=4.5:w4",
                   "gptq:w4g64+embed=w4g64+head=w4g64", "gptq:w3g32+embed=w4g32+head=w4g32",
                   "mixed:bpw=4.15+embed=w4g32+head=w4g32", "gptq:w3g32+embed=w4g32+head=w4g32+tune"]
ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    from jisu.eval.bench import machine_info

    return machine_info()["cpu"]


def slug(recipe: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in recipe)


def run_one(recipe: str, out: str, args) -> dict:
    cmd = [sys.executable, "-m", "jisu.cli", "compress", *([args.model] if args.model else []), "-o", out,
           "--recipe", recipe, "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--force", "--json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log = out + ".log"
    t0 = time.perf_counter()
    with open(log, "w") as f:  # a file, not a pipe: the child never blocks on a full pipe while we wait4
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)  # the child's own rusage (peak RSS)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        with open(log) as f:
            tail = f.read().strip().splitlines()[-1:]
        return {"recipe": recipe, "error": tail or [f"exit {p.returncode}"]}
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    q = m["quality"]
    return {
        "recipe": recipe,
        "bpw_linear": m["bits_per_weight"]["linear"], "bpw_total": m["bits_per_weight"]["total"],
        "artifact_bytes": m["sizes"]["total"], "linear_bytes": m["params"]["linear_bytes"],
        "kld_mean": q["kld_mean"], "kld_p99": q["kld_p99"], "top1_agreement": q["top1_agreement"],
        "perplexity": q["perplexity"], "reference_perplexity": q["reference_perplexity"],
        "tokens_scored": q["tokens_scored"], "compress_s": wall, "quantize_s": m["timings"]["quantize_s"],
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "mixed": ({k: m["quantize_info"]["mixed"][k] for k in ("allocated_bpw", "linears_per_bits")}
                  if "mixed" in m.get("quantize_info", {}) else None),
        "gptq_beats_rtn_layers": _layer_wins(m.get("layers", {})),
    }


def _layer_wins(layers: dict):
    pairs = [(v["err"], v["rtn_err"]) for v in layers.values() if "err" in v and "rtn_err" in v]
    if not pairs or all(abs(a - b) <= 1e-12 * max(b, 1e-30) for a, b in pairs):
        return None
    return f"{sum(a < b for a, b in pairs)}/{len(pairs)}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# jisu compress on {meta['model']}", "",
             f"CPU: {meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}; calibration "
             f"{meta['samples']} x {meta['seq_len']} tokens (first half of the built-in corpus); quality on "
             f"{meta['tokens_scored']} held-out tokens (8 x 256, second half). Reference: fp32 weights dequantized "
             f"from the Q4_1 GGUF; embedding / LM head (tied) as in the source (Q8_0 in the shipped file) unless "
             f"the recipe says +embed / +head.", "",
             "| recipe | bits/weight (linears) | bits/weight (all) | linear MB | artifact MB | KLD mean | KLD p99 "
             "| top-1 | perplexity | compress s | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | failed: {' '.join(r['error'])} |||||||||")
            continue
        lines.append(f"| {r['recipe']} | {r['bpw_linear']:.3f} | {r['bpw_total']:.2f} | {r['linear_bytes'] / 1e6:.1f} "
                     f"| {r['artifact_bytes'] / 1e6:.1f} | {r['kld_mean']:.4f} | {r['kld_p99']:.3f} "
                     f"| {r['top1_agreement']:.3f} | {r['perplexity']:.3f} | {r['compress_s']:.0f} "
                     f"| {r['peak_rss_bytes'] / 1e6:.0f} |")
    dates = sorted({r["date"] for r in rows if r.get("date")})
    if len(dates) > 1 or any(not r.get("date") for r in rows):
        lines += ["", "Rows measured at different times (code changes between them move compress time and peak "
                  "RSS, and slightly KLD): " + "; ".join(f"{r['recipe']} {r.get('date', 'earlier')}" for r in rows) + "."]
    ref = next((r["reference_perplexity"] for r in rows if "reference_perplexity" in r), None)
    if ref is not None:
        lines += ["", f"Reference (fp32) perplexity on the same tokens: {ref:.3f}."]
    mixed = [r for r in rows if r.get("mixed")]
    for r in mixed:
        lines.append(f"{r['recipe']}: allocated {r['mixed']['allocated_bpw']:.3f} bits/weight; linears per width "
                     f"{r['mixed']['linears_per_bits']}.")
    wins = [f"{r['recipe']} {r['gptq_beats_rtn_layers']}" for r in rows if r.get("gptq_beats_rtn_layers")]
    if wins:
        lines.append("Linears whose calibration reconstruction error is below RTN's: " + ", ".join(wins) + ".")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model (default: the default model)")
    ap.add_argument("--recipes", default=";".join(DEFAULT_RECIPES),
                    help="recipes separated by ';'")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compress"),
                    help="writes OUT.json and OUT.md")
    ap.add_argument("--work", default=None, help="folder for the artifacts (default: a temporary folder)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in OUT.json for recipes not run now (each row records its date)")
    args = ap.parse_args()
    import torch

    recipes = [r for r in args.recipes.split(";") if r]
    work = args.work or tempfile.mkdtemp(prefix="jisu-bench-compress-")
    os.makedirs(work, exist_ok=True)
    rows = []
    meta = {"model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF)", "cpu": cpu_name(),
            "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
            "samples": args.samples, "seq_len": args.seq_len, "tokens_scored": None, "work": work}
    old, new_rows = [], []
    if args.merge and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = json.load(f)["rows"]
    for recipe in recipes:
        print(f"[{time.strftime('%H:%M:%S')}] {recipe} ...", file=sys.stderr, flush=True)
        row = run_one(recipe, os.path.join(work, slug(recipe)), args)
        row["date"] = time.strftime("%Y-%m-%d")
        new_rows.append(row)
        done = {r["recipe"]: r for r in new_rows}  # earlier rows in their order, replaced by the ones run now
        rows = [done.pop(r["recipe"], r) for r in old] + list(done.values())
        meta["tokens_scored"] = meta["tokens_scored"] or row.get("tokens_scored")
        print(json.dumps(row), file=sys.stderr, flush=True)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
