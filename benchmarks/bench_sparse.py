"""SparseGPT and Wanda sparsity on the default model (SmolLM2-135M-Instruct, the fp32 model
dequantized from the shipped Q4_1 GGUF): KLD against fp32 of each sparse model alone (float32, zeros
run densely) and then quantized by `gptq:w4g32` with its zeros kept, a KLD curve over the fraction
removed, artifact sizes and decode / prefill tok/s of the artifacts (zeros stored and run densely).

Calibration: the built-in corpus's first half (the compress default), --samples x --seq-len tokens,
walked layer by layer in order (each layer sees the already pruned earlier ones). Held-out text of
another kind: the GPL-3 licence (--heldout), --chunks x --ctx tokens, KL(fp32 || model) per token.
One process: the fp32 reference log-probs are computed once; rows are written as they finish.

  python benchmarks/bench_sparse.py [--samples 32] [--seq-len 256] [--threads 2] [--reps 3]
        [--joint "sparsegpt:50%;..."] [--alone "wanda:2:4;..."] [--curve 25,50,60,70] [--curve-methods M,M]
        [--no-baseline] [--out benchmarks/results/sparse_part_x] [--quick]
  python benchmarks/bench_sparse.py --speed --speed-of DENSE,SPARSE,... [--art DIR]   (tok/s, interleaved)
  python benchmarks/bench_sparse.py --merge PART.json ... [--manifests ARTIFACT ...] --out benchmarks/results/sparse_results

On a loaded machine the configurations are split over several processes (--joint / --alone /
--curve / --no-baseline pick each one's share) and merged afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

JOINT = ["sparsegpt:50%", "wanda:50%", "sparsegpt:2:4", "wanda:2:4", "sparsegpt:4:8", "wanda:4:8"]
CURVE = [25, 50, 60, 70]
QUANT = "gptq:w4g32"
SHORT, LONG = 16, 128
PROMPT = ("Here is a paragraph about CPU inference. Small language models can run on an ordinary laptop CPU. "
          "The speed of generation is then limited mostly by memory bandwidth during decoding, because every "
          "new token needs all the weights to be read once. Explain why sparse weights stored densely do not "
          "make decoding faster.")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clock():
    return time.perf_counter(), time.process_time()


def spent(t) -> dict:
    w, c = clock()
    return {"wall_s": w - t[0], "cpu_s": c - t[1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--heldout", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--joint", default=",".join(JOINT).replace(",", ";"), help="';'-separated sparsity steps, "
                    "each measured alone and + gptq:w4g32")
    ap.add_argument("--alone", default="", help="';'-separated sparsity steps measured alone only")
    ap.add_argument("--curve", default=",".join(map(str, CURVE)), help="percentages for the KLD curve (both methods)")
    ap.add_argument("--curve-methods", default="sparsegpt,wanda")
    ap.add_argument("--art", default="/tmp/jisu-sparse-artifacts", help="where the artifacts are written")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse"))
    ap.add_argument("--no-baseline", action="store_true", help="skip the fp32 / gptq:w4g32 / magnitude rows "
                    "(a second process running other configs)")
    ap.add_argument("--magnitude-only", action="store_true", help="of the baseline rows, only magnitude pruning's")
    ap.add_argument("--speed", action="store_true", help="only the tok/s of the artifacts already in --art")
    ap.add_argument("--speed-of", default="", help="with --speed: these folders of --art, the first the dense base")
    ap.add_argument("--merge", nargs="+", help="merge these result files (rows, speed) into --out .json/.md/.png")
    ap.add_argument("--manifests", nargs="*", help="with --merge: `jisu compress` artifacts whose figures join the rows")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny calibration / held-out, one config")
    args = ap.parse_args()
    if args.merge:
        return merge(args)
    if args.quick:
        args.samples, args.seq_len, args.chunks, args.ctx, args.reps = 4, 64, 2, 64, 1
        args.joint, args.curve = "sparsegpt:50%", ""
        args.out += "_quick"
    torch.set_num_threads(args.threads)
    if args.speed:
        names = args.speed_of.split(",") if args.speed_of else sorted(os.listdir(args.art))
        speed = tok_s({name: os.path.join(args.art, name) for name in names}, args, base=names[0])
        Path(args.out).with_suffix(".json").write_text(json.dumps({"speed": speed}, indent=1))
        return 0

    from jisu.compress.measure import ReferenceLogprobs, compare
    from jisu.compress.pipeline import Quantized, quantize_model
    from jisu.compress.recipe import parse_recipe
    from jisu.compress.sparse import magnitude, parse_sparsity
    from jisu.compress.steps import StepContext, Teacher, dense_float
    from jisu.errors import JisuError
    from jisu.io.sources import load_weights, resolve
    from jisu.io.text import calibration_ids, heldout_ids, read_calibration, read_heldout
    from jisu.models.layers import linear_names

    source = resolve(None)
    cfg, src, tok = load_weights(source, packed=False)
    weights = dense_float(src)
    del src
    calib = read_calibration(None)
    calib_ids = calibration_ids(tok, calib, args.samples, args.seq_len)
    held = read_heldout(args.heldout)
    eval_ids, notes = heldout_ids(tok, held, args.chunks, args.ctx)
    t = clock()
    ref = ReferenceLogprobs(cfg, weights, eval_ids)
    log(f"reference log-probs {spent(t)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.makedirs(args.art, exist_ok=True)
    meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)", "threads": args.threads,
            "calibration": {"text": calib.name, "samples": args.samples, "seq_len": args.seq_len},
            "heldout": {"text": held.name, "chunks": int(eval_ids.shape[0]), "ctx": int(eval_ids.shape[1]),
                        "notes": notes},
            "kld": "mean KL(fp32 || model) per token on the held-out text",
            "note": ("measured on a shared 2-core machine under heavy load (load average in each row): times are "
                     "wall and CPU seconds of this process; tok/s only as ratios within the interleaved run"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    rows, speed = [], {}

    def save():
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "speed": speed}, indent=1))

    def zeros_of(w: dict) -> float:
        z = n = 0
        for name in linear_names(cfg):
            z += int((w[name] == 0).sum())
            n += w[name].numel()
        return z / n

    def measure(qz: Quantized) -> dict:
        q = compare(ref, _runner(qz), eval_ids)
        return {k: q[k] for k in ("kld_mean", "kld_median", "kld_p99", "top1_agreement", "perplexity",
                                  "reference_perplexity", "tokens_scored")}

    def row(step: str, **kw) -> dict:
        r = {"step": step, **kw, "load_average": os.getloadavg()[0]}
        rows.append(r)
        save()
        log(json.dumps(r))
        return r

    def write(qz: Quantized, recipe: str) -> str:
        from jisu.io import artifact

        folder = os.path.join(args.art, slug(recipe))
        if os.path.isdir(folder):
            import shutil
            shutil.rmtree(folder)
        os.makedirs(folder)
        artifact.write_artifact(folder, qz.cfg, qz.tensors, {"recipe": {"text": recipe}}, source_kind=source.kind,
                                source_path=source.path,
                                same_as={"lm_head.weight": "model.embed_tokens.weight"} if qz.tied_head else None)
        return folder

    def quantized(w: dict, recipe: str) -> dict:
        t = clock()
        rec = parse_recipe(recipe)
        qz = quantize_model(cfg, dict(w), rec, calib_ids, progress=False)
        took = spent(t)
        zeros = sum(int((qz.tensors[n].dequantize() == 0).sum()) for n in linear_names(cfg)) / sum(
            w[n].numel() for n in linear_names(cfg))
        q = measure(qz)
        folder = write(qz, recipe)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        artifacts[recipe] = folder
        return {"quantize": took, "zeros_after_quant": zeros, "artifact_bytes": size, **q}

    artifacts = {}
    if not (args.no_baseline or args.magnitude_only):
        row("fp32", zeros=zeros_of(weights), **measure(Quantized(cfg, dict(weights), {})))
        row(QUANT, **quantized(weights, QUANT))
    # magnitude pruning: the baseline needs no calibration
    for pat in [p for p in ("50%", "2:4") if not (args.quick or args.no_baseline)]:
        sp = parse_sparsity(pat, JisuError)
        w = dict(weights)
        for n in linear_names(cfg):
            w[n] = magnitude(weights[n], sp)[0]
        row(f"magnitude:{pat}", zeros=zeros_of(w), **measure(Quantized(cfg, w, {})))

    def sparse(step: str) -> dict:
        rec = parse_recipe(f"{step},{QUANT}")
        st = rec.before[0]
        ctx = StepContext(cfg, dict(weights), Teacher(cfg, weights), calib_ids, tok)
        t = clock()
        info = st.transform.impl.apply(st.params, ctx)
        took = spent(t)
        r = row(step, sparsify=took, zeros=zeros_of(ctx.weights), layer_error=info["layer_error"],
                **measure(Quantized(cfg, dict(ctx.weights), {})))
        return ctx.weights, r

    joint = [s for s in args.joint.split(";") if s]
    for step in joint:
        w, _ = sparse(step)
        row(f"{step},{QUANT}", **quantized(w, f"{step},{QUANT}"))
        del w
    for step in [s for s in args.alone.split(";") if s]:
        sparse(step)
    for p in [p for p in args.curve.split(",") if p]:
        for method in args.curve_methods.split(","):
            step = f"{method}:{p}%"
            if step not in joint and step not in args.alone.split(";"):
                sparse(step)

    if args.quick:
        speed.update(tok_s(artifacts, args, base=QUANT))
    save()
    plot(rows, out.with_suffix(".png"))
    ref.close()
    return 0


def slug(recipe: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in recipe)


def merge(args) -> int:
    """One result file (rows in the order given, a step measured twice kept once; the speed of the
    file that has it; the rows of `jisu compress` manifests given by --manifests), its table and plot."""
    meta, rows, speed, seen = None, [], {}, set()
    for f in args.merge:
        d = json.loads(Path(f).read_text())
        meta = meta or d.get("meta")
        for r in d.get("rows", []):
            if r["step"] not in seen:
                seen.add(r["step"])
                rows.append(r)
        speed = d.get("speed") or speed
    for folder in args.manifests or []:
        m = json.loads((Path(folder) / "manifest.json").read_text())
        q = m["quality"]
        rows.append({"step": m["recipe"]["text"], "via": "jisu compress", "artifact_bytes": m["sizes"]["total"],
                     "calibration": m["calibration"], "steps": m.get("steps"),
                     **{k: q[k] for k in ("kld_mean", "kld_median", "kld_p99", "top1_agreement", "perplexity",
                                          "reference_perplexity", "tokens_scored")}})
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": {**(meta or {}), "merged_from": args.merge},
                                                    "rows": rows, "speed": speed}, indent=1))
    out.with_suffix(".md").write_text(table(rows, speed))
    plot(rows, out.with_suffix(".png"))
    return 0


def table(rows: list, speed: dict) -> str:
    lines = ["| step | zeros | KLD mean | KLD p99 | top-1 | perplexity | MB | sparsify / quantize s (wall, CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        z = r.get("zeros", r.get("zeros_after_quant"))
        t = r.get("sparsify") or r.get("quantize")
        cells = [r["step"], "" if z is None else f"{z:.3f}", f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.3f}",
                 f"{r['top1_agreement']:.3f}", f"{r['perplexity']:.2f}",
                 f"{r['artifact_bytes'] / 1e6:.1f}" if "artifact_bytes" in r else "",
                 f"{t['wall_s']:.0f}, {t['cpu_s']:.0f}" if t else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for k, r in (speed.get("artifacts") or {}).items():
        lines.append(f"- {k}: decode {r['decode_tok_s']:.1f} tok/s ({r['decode_vs_dense']:.2f}x dense), prefill "
                     f"{r['prefill_tok_s']:.1f} tok/s ({r['prefill_vs_dense']:.2f}x dense)")
    return "\n".join(lines) + "\n"


def _runner(qz):
    from jisu.engine.runner import make_runner
    from jisu.compress.pipeline import runtime_weights
    from jisu.models import build_model

    return make_runner(build_model(qz.cfg, runtime_weights(qz)))


def tok_s(folders: dict, args, base: str) -> dict:
    """Decode and prefill tok/s of each artifact, loaded as `jisu.load` loads it, interleaved
    round by round (A B C, C B A, ...) so that the load falls on all of them alike."""
    import jisu

    llms = {k: jisu.load(f, threads=args.threads) for k, f in folders.items()}
    first = next(iter(llms.values()))
    prompt = first.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    times = {k: {1: [], SHORT: [], LONG: []} for k in llms}
    names = list(llms)
    for k in names:   # warm-up
        llms[k].generate(prompt, temperature=0, max_tokens=SHORT, ignore_eos=True)
    load_before = os.getloadavg()
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for n in (1, SHORT, LONG):
            for k in order:
                t0 = time.perf_counter()
                llms[k].generate(prompt, temperature=0, max_tokens=n, ignore_eos=True)
                times[k][n].append(time.perf_counter() - t0)
        log(f"speed round {rep + 1}/{args.reps}")
    res = {}
    for k, t in times.items():
        med = {n: statistics.median(v) for n, v in t.items()}
        res[k] = {"decode_tok_s": (LONG - SHORT) / max(med[LONG] - med[SHORT], 1e-9),
                  "prefill_tok_s": len(prompt) / med[1], "runs_s": {str(n): v for n, v in t.items()}}
    dense = res[base]
    for k, r in res.items():
        r["decode_vs_dense"] = r["decode_tok_s"] / dense["decode_tok_s"]
        r["prefill_vs_dense"] = r["prefill_tok_s"] / dense["prefill_tok_s"]
    return {"artifacts": res, "dense": base, "prompt_tokens": len(prompt), "reps": args.reps,
            "decode": f"({LONG} - {SHORT}) new tokens / (t({LONG}) - t({SHORT})), medians, EOS ignored",
            "prefill": "prompt tokens / t(1 new token), medians",
            "load_average": {"before": load_before, "after": os.getloadavg()}}


def plot(rows: list, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, style in (("sparsegpt", "o-"), ("wanda", "s--"), ("magnitude", "x:")):
        pts = sorted((r["zeros"] * 100, r["kld_mean"]) for r in rows
                     if r["step"].startswith(method + ":") and r["step"].endswith("%") and "," not in r["step"])
        if pts:
            ax.plot(*zip(*pts), style, label=f"{method} (float32, zeros dense)")
    for r in rows:
        s = r["step"]
        if ":2:4" in s or ":4:8" in s or s.startswith("gptq"):
            ax.scatter([r.get("zeros", r.get("zeros_after_quant", 0)) * 100], [r["kld_mean"]], marker="*", s=60)
            ax.annotate(s.replace(",gptq:w4g32", "+w4g32"), (r.get("zeros", r.get("zeros_after_quant", 0)) * 100,
                                                               r["kld_mean"]), fontsize=6)
    ax.set_yscale("log")
    ax.set_xlabel("% of linear weights zero")
    ax.set_ylabel("KLD vs fp32 (held-out GPL-3 text)")
    ax.set_title("SmolLM2-135M: one-shot sparsity, KLD against the fraction removed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot {path}")


if __name__ == "__main__":
    sys.exit(main())
