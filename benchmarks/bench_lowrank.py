"""Low-rank error correction on the default model: `gptq:w3g32+lowrank=R` (+ its embedding / head at
4 bits) against plain w3 and w4 GPTQ and against `mixed:bpw=X` at the same size; KLD against the fp32
model on held-out text of another kind than the calibration text (default: the GPL-3 licence text;
calibration: the built-in pydoc corpus), decode and prefill speed of every artifact measured in one
process, interleaved (A B C ... then C B A, per round), so that a loaded machine gives ratios.

  python benchmarks/bench_lowrank.py [--ranks 8,16,32] [--mixed-at 16] [--workdir DIR] [--reuse]
                                     [--samples 64] [--threads 2] [--reps 3] [--tag NAME]

One `jisu compress` process per recipe (artifacts kept in --workdir; --reuse takes a finished one
from there); the mixed recipe's budget is the bits per weight of the linears of the low-rank
artifact it is compared with. Writes benchmarks/results/lowrank_TAG.json and .png (KLD vs MB).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
W4 = "gptq:w4g32"
W3 = "gptq:w3g32+embed=w4g32+head=w4g32"
TABLES = "+embed=w4g32+head=w4g32"
UNFINISHED: list = []   # --only-finished: recipes without a finished artifact


def slug(recipe: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in recipe)


def compress(recipe: str, args):
    out = os.path.join(args.workdir, slug(recipe))
    manifest = os.path.join(out, "manifest.json")
    if args.only_finished and not os.path.isfile(manifest):
        print(f"{recipe}: not finished in {args.workdir}; left out", flush=True)
        UNFINISHED.append(recipe)
        return None
    if not (args.reuse and os.path.isfile(manifest)):
        cmd = [sys.executable, "-m", "jisu.cli", "compress", "-o", out, "--recipe", recipe, "--eval-text", args.heldout,
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--force", "--json",
               *(["--threads", str(args.threads)] if args.threads else [])]
        t0 = time.perf_counter()
        with open(out + ".log", "w") as f:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        if p.returncode:
            raise SystemExit(f"{recipe}: compress failed (see {out}.log)")
        print(f"{recipe}: compressed in {time.perf_counter() - t0:.0f} s", flush=True)
    with open(manifest) as f:
        m = json.load(f)
    q = m["quality"]
    step_s = m["timings"]["quantize_s"]
    return {"recipe": recipe, "path": out, "mb": m["sizes"]["total"] / 1e6,
            "weight_mb": m["params"]["weight_bytes"] / 1e6, "bpw_linear": m["bits_per_weight"]["linear"],
            "bpw_total": m["bits_per_weight"]["total"], "kld_mean": q["kld_mean"], "kld_p99": q.get("kld_p99"),
            "top1": q.get("top1_agreement"), "perplexity": q.get("perplexity"),
            "reference_perplexity": q.get("reference_perplexity"), "heldout": q.get("text"), "quantize_s": step_s}


def rtn_models(ranks: list[int], threads: int) -> dict:
    """recipe -> LLM built in memory by RTN with the artifacts' formats and factor shapes (random
    factors): decode speed depends on formats and shapes only, so this measures it without the
    calibrated runs. w4: int4 g32 linears, the source's Q8_0 embedding / head (as gptq:w4g32 leaves
    them); w3: int3 g32 linears, int4 g32 embedding and head; + rank-R int8 factors."""
    import torch

    from jisu.api import LLM
    from jisu.compress import rtn
    from jisu.compress.spec import FormatSpec
    from jisu.engine.runner import make_runner
    from jisu.io.sources import load_weights, resolve
    from jisu.kernels import ops
    from jisu.kernels.lowrank import Factors, LowRankWeight
    from jisu.kernels.packed import pack
    from jisu.models import build_model
    from jisu.models.layers import linear_names

    ops.set_num_threads(threads)
    torch.set_num_threads(threads)
    source = resolve(None)
    cfg, w, tok = load_weights(source, packed=True)   # the GGUF's Q8_0 embedding stays packed
    from jisu.compress.observe import as_float

    dense = {n: as_float(w[n]) for n in linear_names(cfg)}
    g = torch.Generator().manual_seed(0)
    table = pack(rtn.quantize(as_float(w["model.embed_tokens.weight"]), FormatSpec("int", 4, 32)))
    out = {}
    for recipe, bits, r in [(W4, 4, 0), (W3, 3, 0)] + [(f"gptq:w3g32+lowrank={r}{TABLES}", 3, r) for r in ranks]:
        weights = dict(w)
        for n, t in dense.items():
            q = rtn.quantize(t, FormatSpec("int", bits, 32))
            if r:
                f = Factors.quantize(torch.randn(t.shape[0], r, generator=g) * 1e-3,
                                     torch.randn(r, t.shape[1], generator=g))
                q = LowRankWeight(q, f)
            weights[n] = pack(q)
        if bits == 3:
            weights["model.embed_tokens.weight"] = table
            weights["lm_head.weight"] = table
        net = build_model(cfg, weights)
        out[recipe] = LLM(net, tok, source, make_runner(net))
    return out


def speeds(rows: list[dict], args) -> None:
    """Decode / prefill tok/s of every artifact (or of its RTN twin, --speed-rtn), interleaved, in
    this process."""
    import torch

    import jisu
    from jisu.engine.native_runner import NativeRunner

    if args.speed_rtn:
        llms = rtn_models([int(x) for x in args.ranks.split(",") if x], args.threads)
    else:
        llms = {r["recipe"]: jisu.load(r["path"], threads=args.threads) for r in rows}
    g = torch.Generator().manual_seed(0)
    any_llm = next(iter(llms.values()))
    prompt = any_llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    long_prompt = torch.randint(100, any_llm.config.vocab_size, (args.prefill,), generator=g).tolist()

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def one(llm) -> tuple[float, float]:
        def gen(p, n):
            return llm.generate(p, temperature=0, max_tokens=n, ignore_eos=True)
        t_short = timed(lambda: gen(prompt, 16))
        t_long = timed(lambda: gen(prompt, 16 + args.tokens))
        t_pre = timed(lambda: gen(long_prompt, 1))
        return args.tokens / max(t_long - t_short, 1e-9), args.prefill / t_pre

    for llm in llms.values():  # warm-up
        one(llm)
    dec = {k: [] for k in llms}
    pre = {k: [] for k in llms}
    order = list(llms)
    for rep in range(args.reps):
        for k in (order if rep % 2 == 0 else order[::-1]):
            d, p = one(llms[k])
            dec[k].append(d)
            pre[k].append(p)
        print(f"round {rep + 1}: " + ", ".join(f"{k} {dec[k][-1]:.1f}" for k in order), flush=True)
    base = statistics.median(dec[W4]) if W4 in dec else None
    if args.speed_rtn:  # rows for the RTN twins that have no finished artifact
        rows += [{"recipe": k, "speed_only": True} for k in llms if k not in {r["recipe"] for r in rows}]
    for r in rows:
        k = r["recipe"]
        if k not in llms:
            continue
        r.update({"native": isinstance(llms[k].runner, NativeRunner), "decode_tok_s": statistics.median(dec[k]),
                  "prefill_tok_s": statistics.median(pre[k]), "decode_runs": dec[k], "prefill_runs": pre[k],
                  "decode_vs_w4": statistics.median(dec[k]) / base if base else None})


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("gptq", "o"), ("lowrank", "s"), ("mixed", "^")):
        pts = [r for r in rows if "kld_mean" in r and _kind(r["recipe"]) == kind]
        ax.scatter([r["mb"] for r in pts], [r["kld_mean"] for r in pts], marker=marker, label=kind)
        for r in pts:
            ax.annotate(_label(r["recipe"]), (r["mb"], r["kld_mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.set_xlabel("artifact MB")
    ax.set_ylabel("KLD mean vs fp32 (held-out text)")
    ax.set_title("SmolLM2-135M: low-rank correction of w3g32 vs w3 / w4 / mixed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _kind(recipe: str) -> str:
    return "lowrank" if "lowrank" in recipe else ("mixed" if recipe.startswith("mixed") else "gptq")


def _label(recipe: str) -> str:
    return recipe.replace(TABLES, "").replace("+embed=w4g32+head=w4g32", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="8,16,32")
    ap.add_argument("--mixed-at", default="16", help="ranks whose size a mixed-precision artifact is made at")
    ap.add_argument("--workdir", default="/tmp/jisu-lowrank")
    ap.add_argument("--reuse", action="store_true", help="take finished artifacts from --workdir")
    ap.add_argument("--heldout", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=64, help="calibration sequences (jisu compress --samples)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96, help="decoded tokens timed per run")
    ap.add_argument("--prefill", type=int, default=128, help="prompt tokens of the prefill run")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--speed-rtn", action="store_true", help="time RTN-built models of the same formats and "
                    "factor shapes instead of the artifacts")
    ap.add_argument("--only-finished", action="store_true", help="report the artifacts already in --workdir, "
                    "compress nothing")
    ap.add_argument("--tag", default="default")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    if args.only_finished:
        args.reuse = True
    rows = [compress(W4, args), compress(W3, args)]
    lr = {}
    for r in ranks:
        lr[r] = compress(f"gptq:w3g32+lowrank={r}{TABLES}", args)
        rows.append(lr[r])
    for r in (int(x) for x in args.mixed_at.split(",") if x):
        if lr.get(r) is not None:
            row = compress(f"mixed:bpw={lr[r]['bpw_linear']:.3f}{TABLES}", args)
            if row is not None:
                row["same_size_as"] = lr[r]["recipe"]
            rows.append(row)
    rows = [r for r in rows if r is not None]
    if not rows and not args.speed_rtn:
        raise SystemExit("no finished artifact")
    load_1m = os.getloadavg()[0]
    if not args.no_speed:
        speeds(rows, args)
    w3 = next((r for r in rows if r["recipe"] == W3), None)
    for r in rows:  # KLD gained per extra MB over plain w3, the frontier slope the issue compares
        if w3 is not None and r is not w3 and "mb" in r and r["mb"] != w3["mb"]:
            r["kld_drop_per_mb_vs_w3"] = (w3["kld_mean"] - r["kld_mean"]) / (r["mb"] - w3["mb"])
    from jisu.eval.bench import machine_info

    res = {"bench": "lowrank", "command": " ".join(sys.argv), "machine": machine_info(), "threads": args.threads,
           "calibration": {"samples": args.samples, "seq_len": args.seq_len,
                           "text": "built-in pydoc corpus (first half)"},
           "load_avg_1m_at_start": load_1m, "load_avg_1m_at_end": os.getloadavg()[0],
           "note": "decode/prefill measured in one process, interleaved; on a loaded machine only the ratios "
                   "(decode_vs_w4) mean anything",
           "rows": [{k: v for k, v in r.items() if k != "path"} for r in rows],
           **({"unfinished": UNFINISHED} if UNFINISHED else {})}
    out = ROOT / "benchmarks" / "results" / f"lowrank_{args.tag}"
    with open(f"{out}.json", "w") as f:
        json.dump(res, f, indent=1)
    if any("kld_mean" in r for r in rows):
        plot(rows, f"{out}.png")
    for r in rows:
        print(f"{r['recipe']:55s}" + (f" {r['mb']:7.1f} MB  bpw {r['bpw_linear']:.3f}  KLD {r['kld_mean']:.4f}"
                                      if "mb" in r else " (speed only)")
              + (f"  decode x{r['decode_vs_w4']:.2f}" if r.get("decode_vs_w4") else ""))
    print(f"wrote {out}.json and .png")


if __name__ == "__main__":
    main()
