"""bench_prune.py's measurement in one process for a loaded machine: the source loaded and its
held-out log-probs computed once, each pruned model built in memory (prune step, then `rtn:w4g32`,
the same format, bytes and kernels as `gptq:w4g32` without GPTQ's calibration cost), its one-shot
and quantized KLD, then decode / prefill tok/s of every model in interleaved rounds (A B B A).

  python benchmarks/bench_prune_quick.py --forms "prune:layers=20;prune:ffn=1024" [--minutes 30]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_prune import layer_params, speed  # noqa: E402


def packed_bytes(w: dict) -> int:
    seen, total = set(), 0
    for t in w.values():
        data = t if isinstance(t, torch.Tensor) else getattr(t, "data", None)
        if isinstance(data, torch.Tensor) and id(data) not in seen:
            seen.add(id(data))
            total += data.numel() * data.element_size()
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forms", default="prune:layers=20;prune:ffn=1024;prune:layers=24;prune:ffn=1280")
    ap.add_argument("--quant", default="rtn:w4g32")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--heldout", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=30, help="wall minutes for the forms; speeds after")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/prune_quick"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    from jisu.compress.measure import ReferenceLogprobs, compare
    from jisu.compress.pipeline import quantize_model, runtime_weights
    from jisu.compress.prune import Prune
    from jisu.compress.recipe import parse_recipe
    from jisu.compress.steps import StepContext, Teacher, dense_float
    from jisu.engine.runner import make_runner
    from jisu.eval.bench import machine_info
    from jisu.io.sources import load_weights, resolve
    from jisu.io.text import calibration_ids, heldout_ids, read_calibration, read_heldout
    from jisu.models import build_model

    cfg, weights, tok = load_weights(resolve(None))
    teacher = dense_float(weights)
    del weights
    held = read_heldout(args.heldout)
    eval_ids, _ = heldout_ids(tok, held, args.chunks, args.ctx)
    calib = calibration_ids(tok, read_calibration(None), args.samples, args.seq_len)
    ref = ReferenceLogprobs(cfg, teacher, eval_ids, folder="/tmp")
    speed_ids = calib.reshape(-1)[:args.prompt + args.decode].tolist()
    meta = {"machine": machine_info(), "model": "smollm2 (default)", "quant": args.quant,
            "calibration": "builtin first half", "samples": args.samples, "seq_len": args.seq_len,
            "heldout": held.name, "chunks": args.chunks, "ctx": args.ctx, "threads": args.threads,
            "command": " ".join([sys.executable, *sys.argv]),
            "note": "machine loaded by other work (load average ~45 on 2 cores): ratios within this run only"}
    rows, runners = [], {}

    def save():
        meta["load_average"] = os.getloadavg()
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    for form in [""] + [f for f in args.forms.split(";") if f]:
        if form and time.time() - t_start > args.minutes * 60:
            break
        row = {"form": form or "unpruned"}
        c0, t0 = time.process_time(), time.perf_counter()
        ctx = StepContext(cfg, dict(teacher), Teacher(cfg, teacher), calib)
        if form:
            st = parse_recipe(form + ",rtn:w8").before[0]
            row["step"] = {k: v for k, v in Prune().apply(st.params, ctx).items() if k not in ("layers",)}
            row["prune_cpu_s"], row["prune_wall_s"] = time.process_time() - c0, time.perf_counter() - t0
            q = compare(ref, make_runner(build_model(ctx.cfg, dict(ctx.weights))), eval_ids)
            row["kld_oneshot"], row["top1_oneshot"] = q["kld_mean"], q["top1_agreement"]
        c = ctx.cfg
        row["layers"], row["mlp_widths"] = c.num_layers, sorted(set(map(c.mlp_width, range(c.num_layers))))
        row["heads"] = sorted(set(map(c.heads, range(c.num_layers))))
        row["removed"] = 1 - layer_params(c) / layer_params(cfg)
        qz = quantize_model(c, ctx.weights, parse_recipe(args.quant), None)
        model = build_model(qz.cfg, runtime_weights(qz))
        runners[row["form"]] = runner = make_runner(model)
        row["bytes"] = packed_bytes(model.w)
        q = compare(ref, runner, eval_ids)
        row["kld_quantized"], row["top1_quantized"] = q["kld_mean"], q["top1_agreement"]
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    times = {k: [] for k in runners}
    order = list(runners)
    for rnd in range(args.rounds):
        for k in (order if rnd % 2 == 0 else order[::-1]):
            times[k].append(speed(runners[k], speed_ids, args.prompt, args.decode))
    med = {k: (sorted(p for p, _ in v)[len(v) // 2], sorted(d for _, d in v)[len(v) // 2]) for k, v in times.items()}
    base = rows[0]
    for row in rows:
        k = row["form"]
        row["prefill_tok_s"], row["decode_tok_s"] = med[k]
        row["prefill_x"], row["decode_x"] = med[k][0] / med["unpruned"][0], med[k][1] / med["unpruned"][1]
        row["size_x"] = row["bytes"] / base["bytes"]
        row["speed_raw"] = times[k]
        print(f"{k:24s} one-shot {row.get('kld_oneshot', 0):.3f}  {args.quant} {row['kld_quantized']:.3f}  "
              f"size x{row['size_x']:.3f}  prefill x{row['prefill_x']:.2f}  decode x{row['decode_x']:.2f}")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
