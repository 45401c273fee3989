"""Structured pruning on the default model (SmolLM2-135M-Instruct, 30 layers, MLP 1536): for each
form and budget, the one-shot KLD of the pruned float model (with its refit) and of the pruned
model after `gptq:w4g32`, its size, and decode / prefill tok/s against the unpruned `gptq:w4g32`.

KLD is mean KL(fp32 source || model) per token on held-out text of another kind than the
calibration text (default: the GPL-3 licence; calibration: the first half of the built-in pydoc
corpus). Each recipe runs through jisu.compress.compress in this process; the pruned float weights
are taken from the prune step as it returns (a wrapper around its apply), so the one-shot and the
quantized figures come from the same pruning. Speeds are measured afterwards, every artifact in
each round, the order reversed every other round (A B B A), prefill as 64-token chunks with one
logit row, decode as one-token steps after the prompt; report ratios from one run.

  python benchmarks/bench_prune.py [--layers 28,26,24,22,20] [--ffn 1280,1024,768] [--samples 32]
                                   [--heal "prune:layers=20,distill:minutes=20"] [--out benchmarks/results/prune]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUANT = "gptq:w4g32"   # --quant rtn:w4g32 gives the same format (same bytes and speed) without GPTQ's cost


def layer_params(cfg) -> int:
    """Weights in the decoder layers' linears (what depth and width pruning remove)."""
    E, D = cfg.hidden_size, cfg.head_dim
    return sum(E * D * (2 * q + 2 * kv) + 3 * E * cfg.mlp_width(i)
               for i, (q, kv) in ((i, cfg.heads(i)) for i in range(cfg.num_layers)))


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def speed(runner, ids: list[int], prompt: int, decode: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one sequence through a fresh cache."""
    from jisu.engine.batch import StepBatch
    from jisu.engine.kv_cache import PagedKVCache
    from jisu.engine.runner import resolve_kv_dtype

    kv = PagedKVCache(runner.cfg, 1, prompt + decode, dtype=resolve_kv_dtype(runner, None))
    t0 = time.perf_counter()
    for p0 in range(0, prompt, 64):
        part = ids[p0:p0 + 64]
        runner.run(StepBatch.single(part, p0, [0], [len(part) - 1]), kv)
    t1 = time.perf_counter()
    for j in range(decode):
        runner.run(StepBatch.single([ids[prompt + j]], prompt + j, [0], [0]), kv)
    t2 = time.perf_counter()
    return prompt / (t1 - t0), decode / (t2 - t1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", default="28,26,24,22,20")
    ap.add_argument("--ffn", default="1280,1024,768")
    ap.add_argument("--extra", default="", help="more prune steps, ';'-separated (e.g. prune:layers=20:by=kl)")
    ap.add_argument("--heal", default="", help="';'-separated transform chains run before gptq (with distill:)")
    ap.add_argument("--quant", default=QUANT, help="the quantization step after the pruning")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unpruned artifact (needs --rounds 0)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--heldout", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/prune"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import jisu
    from jisu.compress import prune as prune_mod
    from jisu.compress.measure import ReferenceLogprobs, compare
    from jisu.compress.steps import dense_float
    from jisu.engine.runner import make_runner
    from jisu.eval.bench import machine_info
    from jisu.io.sources import load_weights, resolve
    from jisu.io.text import heldout_ids, read_heldout
    from jisu.models import build_model

    cfg, weights, tok = load_weights(resolve(args.model))
    held = read_heldout(args.heldout)
    eval_ids, _ = heldout_ids(tok, held, args.chunks, args.ctx)
    work = tempfile.mkdtemp(prefix="bench_prune_")
    ref = ReferenceLogprobs(cfg, dense_float(weights), eval_ids, folder=work)
    del weights
    speed_ids = eval_ids.reshape(-1)[:args.prompt + args.decode].tolist()

    caught = {}
    apply = prune_mod.Prune.apply

    def spy(self, p, ctx):
        info = apply(self, p, ctx)
        caught["cfg"], caught["weights"] = ctx.cfg, dict(ctx.weights)
        return info

    prune_mod.Prune.apply = spy
    chains = ([] if args.no_baseline else [""]) + ([f"prune:layers={n}" for n in args.layers.split(",") if n]
              + [f"prune:ffn={w}" for w in args.ffn.split(",") if w]
              + [s for s in args.extra.split(";") if s] + [s for s in args.heal.split(";") if s])
    rows, arts = [], {}
    for chain in chains:
        recipe = f"{chain},{args.quant}" if chain else args.quant
        out = os.path.join(work, f"a{len(arts)}")
        caught.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        r = jisu.compress.compress(args.model, out, recipe, samples=args.samples, seq_len=args.seq_len,
                                   eval_text=args.heldout, eval_chunks=args.chunks, eval_ctx=args.ctx,
                                   threads=args.threads, progress=False)
        row = {"recipe": recipe, "compress_wall_s": time.perf_counter() - t0,
               "compress_cpu_s": time.process_time() - c0, "steps": r.manifest.get("steps", []),
               "kld_quantized": r.manifest["quality"]["kld_mean"],
               "top1_quantized": r.manifest["quality"]["top1_agreement"],
               "artifact_bytes": folder_bytes(out)}
        if caught:
            c = caught["cfg"]
            row["layers"] = c.num_layers
            row["mlp_widths"] = [c.mlp_width(i) for i in range(c.num_layers)]
            row["removed"] = 1 - layer_params(c) / layer_params(cfg)
            model = build_model(c, caught["weights"])
            q = compare(ref, make_runner(model), eval_ids)
            row["kld_oneshot"], row["top1_oneshot"] = q["kld_mean"], q["top1_agreement"]
            del model
        caught.clear()
        print(json.dumps({k: v for k, v in row.items() if k != "steps"}), flush=True)
        rows.append(row)
        arts[recipe] = out

    # speeds: all artifacts loaded at once, interleaved rounds (--rounds 0: none)
    llms = {k: jisu.load(v) for k, v in arts.items()}
    order = list(llms)
    times = {k: [] for k in order}
    for rnd in range(args.rounds):
        for k in (order if rnd % 2 == 0 else order[::-1]):
            times[k].append(speed(llms[k].runner, speed_ids, args.prompt, args.decode))
    base = args.quant
    med = {k: (sorted(p for p, _ in v)[len(v) // 2], sorted(d for _, d in v)[len(v) // 2])
           for k, v in times.items() if v}
    for row in rows:
        k = row["recipe"]
        if not args.no_baseline:
            row["size_x"] = row["artifact_bytes"] / next(r["artifact_bytes"] for r in rows if r["recipe"] == base)
        if k in med:
            row["prefill_tok_s"], row["decode_tok_s"] = med[k]
            row["prefill_x"] = med[k][0] / med[base][0]
            row["decode_x"] = med[k][1] / med[base][1]
            row["speed_raw"] = times[k]
    meta = {"machine": machine_info(), "model": args.model or "smollm2 (default)", "calibration": "builtin first half",
            "samples": args.samples, "seq_len": args.seq_len, "heldout": held.name, "chunks": args.chunks,
            "ctx": args.ctx, "threads": args.threads, "rounds": args.rounds, "prompt": args.prompt,
            "decode": args.decode, "load_average": os.getloadavg(),
            "command": " ".join([sys.executable, *sys.argv]),
            "note": "machine loaded by other work: compare ratios within this run only"}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.rounds:
        plot(rows, args.out + ".png", args.quant)
    shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        print(f"{row['recipe']:42s} one-shot {row.get('kld_oneshot', 0):.3f}  quantized {row['kld_quantized']:.3f}  "
              f"size x{row.get('size_x', 0):.2f}  prefill x{row.get('prefill_x', 0):.2f}  decode x{row.get('decode_x', 0):.2f}")
    return 0


def removed_fraction(row: dict) -> tuple[str, float]:
    """(form, fraction of the layers' weights removed) of a result row."""
    steps = row["recipe"].split(",")[:-1]
    if not steps:
        return "none", 0.0
    return ("depth" if "layers" in steps[0] else "width"), row["removed"]


def plot(rows: list[dict], path: str, quant: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for form, mark in (("depth", "o"), ("width", "s")):
        pts = sorted((removed_fraction(r)[1], r) for r in rows if removed_fraction(r)[0] in (form, "none")
                     and "distill" not in r["recipe"] and r["recipe"].count("prune") <= 1)
        xs = [x for x, _ in pts]
        a.plot(xs, [r.get("kld_oneshot", 0.0) for _, r in pts], mark + "--", label=f"{form}: one-shot (fp32)")
        a.plot(xs, [r["kld_quantized"] for _, r in pts], mark + "-", label=f"{form}: + {quant}")
        b.plot(xs, [r["decode_x"] for _, r in pts], mark + "-", label=f"{form}: decode")
        b.plot(xs, [r["prefill_x"] for _, r in pts], mark + "--", label=f"{form}: prefill")
    for r in rows:
        if "distill" in r["recipe"]:
            f = removed_fraction(r)[1]
            a.plot([f], [r["kld_quantized"]], "k*", ms=12, label="healed + " + quant)
    a.set_xlabel("fraction of the decoder layers' weights removed")
    a.set_ylabel("KLD vs fp32 (held-out)")
    a.set_yscale("log")
    a.legend(fontsize=7)
    b.set_xlabel("fraction removed")
    b.set_ylabel(f"tok/s ÷ unpruned {quant}")
    b.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M structured pruning (one run, loaded 2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
