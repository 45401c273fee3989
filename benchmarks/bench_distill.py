"""Distillation on the default model, at equal CPU-minute budgets (process CPU time / threads):

  --part quant: gptq:w4g32 once, then (a) +tune for --tune-steps steps and (b) the step
      `distill:minutes=M` after it with M = the CPU-minutes +tune used; full-vocabulary KLD against
      the float32 source on a held-out text of another kind (default: the GPL-3 licence), both arms
      the same size; (c) the distill arm's held-out KL curve against minutes.
  --part lstm: the `jisu distill` LSTM student distilled vs trained with cross-entropy alone
      (--no-teacher), same windows, same CPU-minutes; held-out perplexity curves of both.

Writes JSON (raw figures, the command, the machine's load) and, for lstm, a PNG of both curves."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch

GPL = "/usr/share/common-licenses/GPL-3"


def cpu_minutes(c0: float, threads: int) -> float:
    return (time.process_time() - c0) / threads / 60.0


@torch.no_grad()
def full_kld(features, head, ids: torch.Tensor, ref: torch.Tensor) -> dict:
    """Mean / p99 KL(source || model) over every held-out position, full vocabulary; top-1 agreement."""
    kl, agree = [], []
    for s in range(ids.shape[0]):
        h = features(ids[s:s + 1])
        for t0 in range(0, ids.shape[1], 64):
            lq = torch.log_softmax(head(h[:, t0:t0 + 64]).float(), -1)[0]
            lp = ref[s, t0:t0 + 64]
            kl.append((lp.exp() * (lp - lq)).sum(-1))
            agree.append(lp.argmax(-1) == lq.argmax(-1))
    kl, agree = torch.cat(kl), torch.cat(agree)
    return {"kld_mean": float(kl.mean()), "kld_p99": float(kl.quantile(0.99)), "top1_agreement": float(agree.float().mean()),
            "tokens": int(kl.numel())}


def part_quant(args) -> dict:
    from jisu.compress import tune
    from jisu.compress.distill_cache import TOP_K, decoder_teacher, teacher_targets, weights_fingerprint
    from jisu.compress.distill_step import Distill, QuantizedStudent, split_heldout
    from jisu.compress.observe import CTX, ReferenceNumerics, compression_model, model_form
    from jisu.compress.pipeline import quantize_model
    from jisu.compress.recipe import parse_recipe
    from jisu.compress.steps import StepContext, Teacher, dense_float
    from jisu.compress.stream import load_streamed
    from jisu.io.sources import resolve
    from jisu.io.text import calibration_ids, heldout_ids, read_calibration, read_text

    threads = torch.get_num_threads()
    source = resolve(args.model)
    cfg, weights, tok = load_streamed(source)
    teacher_w = dense_float(weights)
    del weights
    calib = calibration_ids(tok, read_calibration(None), args.samples, args.seq_len)
    held, _ = heldout_ids(tok, read_text(args.heldout, "evaluation"), args.chunks, args.ctx)
    tid = weights_fingerprint(cfg, teacher_w)
    compute = decoder_teacher(cfg, teacher_w)
    c0 = time.process_time()
    train_ids, held_ids = split_heldout(calib)   # the windows and targets the step uses (cached on disk)
    ta, _ = teacher_targets(tid, train_ids, compute, k=TOP_K, progress=True)
    tb, _ = teacher_targets(tid, held_ids, compute, k=TOP_K, progress=True)
    targets_min = cpu_minutes(c0, threads)
    teacher = compression_model(cfg, model_form(cfg, teacher_w), ReferenceNumerics(exact=True))
    with torch.no_grad():
        ref = torch.stack([torch.log_softmax(teacher.head(teacher.final_hidden(
            _layers(teacher, held[s:s + 1], CTX))).float(), -1)[0] for s in range(held.shape[0])])
    c0 = time.process_time()
    qz = quantize_model(cfg, dict(teacher_w), parse_recipe("gptq:w4g32"), calib, progress=True)
    gptq_min = cpu_minutes(c0, threads)

    def kld(q) -> dict:
        s = QuantizedStudent(copy.copy(q))
        return full_kld(s.distill_features, s.distill_head, held, ref)

    rows = {"gptq:w4g32": {**kld(qz), "cpu_minutes": gptq_min}}
    print(json.dumps(rows), file=sys.stderr)
    # (a) +tune at its own settings, fed the cached targets (float16 log-probs) on all the windows
    q1 = copy.deepcopy(qz)
    lp = torch.cat([ta.lp, tb.lp]).float()
    ix = torch.cat([ta.ix, tb.ix])
    c0, w0 = time.process_time(), time.perf_counter()
    info = tune.tune(q1, (lp, ix), torch.cat([train_ids, held_ids]), args.tune_steps, progress=True)
    tune_min = cpu_minutes(c0, threads)
    rows[f"gptq:w4g32+tune={args.tune_steps}"] = {**kld(q1), "cpu_minutes": tune_min,
                                                 "wall_minutes": (time.perf_counter() - w0) / 60, "tune": info}
    print(json.dumps(rows), file=sys.stderr)
    del q1
    # (b) distill after quantizing, the same CPU-minutes; (c) with --gen, also on windows of the
    # teacher's own text added to the calibration windows (generated and their targets computed once,
    # outside the budget, as the calibration windows' targets are)
    minutes = args.minutes or round(tune_min, 3)
    curves = {}
    for text in [f"distill:minutes={minutes}"] + ([f"distill:minutes={minutes}:gen={args.gen}"] if args.gen else []):
        step = Distill()
        params = step.parse(text.split(":", 1)[1], lambda m: ValueError(m))
        q2 = copy.deepcopy(qz)
        with tempfile.TemporaryDirectory() as work:
            ctx = StepContext(cfg, None, Teacher(cfg, teacher_w), calib, tok, workdir=work, progress=True,
                              threads=threads, quantized=q2)
            c0, w0 = time.process_time(), time.perf_counter()
            dinfo = step.apply(params, ctx)
        rows[f"gptq:w4g32,{text}"] = {**kld(q2), "cpu_minutes": cpu_minutes(c0, threads),
                                      "wall_minutes": (time.perf_counter() - w0) / 60, "distill": dinfo}
        print(json.dumps({k: {a: b for a, b in v.items() if a != "distill"} for k, v in rows.items()}), file=sys.stderr)
        curves[text] = [{"cpu_minutes": c["cpu_minutes"], "tokens": c["tokens"], "heldout_binned_kl": c["value"]}
                        for c in dinfo["curve"]]
    return {"rows": rows, "teacher_targets_cpu_minutes": targets_min, "curve_kl_vs_minutes": curves}


def _layers(model, ids, ctx):
    x = model.embed(ids)
    for i in range(model.cfg.num_layers):
        x = model.layer(i, x, ctx)
    return x


def part_lstm(args) -> dict:
    from jisu.compress.distill import heldout_perplexity
    from jisu.compress.distill_student import distill_student
    from jisu.io.sources import load_weights, resolve
    from jisu.io.text import heldout_ids, read_text
    from jisu.models.lstm import LSTMModel

    out = {}
    arms = [("distilled", False), ("cross-entropy", True)] if args.arm == "both" else \
        [(args.arm, args.arm == "cross-entropy")]
    for name, no_teacher in arms:
        folder = os.path.join(args.workdir, f"lstm-{name}")
        r = distill_student(args.model, folder, args.student, minutes=args.minutes, samples=args.samples,
                            seq_len=args.seq_len, no_teacher=no_teacher, force=True, lr=args.lr, progress=True)
        cfg, w, tok = load_weights(resolve(folder))
        held, _ = heldout_ids(tok, read_text(args.heldout, "evaluation"), args.chunks, args.ctx)
        r["other_text"] = {"text": args.heldout, "perplexity": heldout_perplexity(LSTMModel(cfg, w), held)}
        out[name] = r
        print(json.dumps({name: {k: r[k] for k in ("heldout_perplexity", "tokens", "cpu_minutes")}}), file=sys.stderr)
    return out


def plot(data: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in data.items():
        ax.plot([c["cpu_minutes"] for c in r["curve"]], [c["value"] for c in r["curve"]], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("CPU-minutes (process CPU time / threads)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("LSTM student: distilled vs cross-entropy alone")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def merge(paths: list[str], out: str, png: str | None) -> None:
    """One lstm result from the runs of its arms (one process per arm, run side by side)."""
    data, metas = {}, []
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        data.update(d["results"])
        metas.append(d["meta"])
    with open(out, "w") as f:
        json.dump({"meta": {"runs": metas}, "results": data}, f, indent=1)
    if png:
        plot(data, png)


def plot_quant(path: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        d = json.load(f)["results"]
    curves = d["curve_kl_vs_minutes"]
    if isinstance(curves, list):  # results written before the teacher-text arm
        curves = {"distill": curves}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([c["cpu_minutes"] for c in curve], [c["heldout_binned_kl"] for c in curve], marker="o",
                label=f"gptq:w4g32,{name} (held-out calibration windows, top-64 + rest KL)")
    ax.set_xlabel("CPU-minutes (process CPU time / threads)")
    ax.set_ylabel("held-out KL")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("quant", "lstm", "merge"), required=True)
    p.add_argument("--inputs", nargs="*", default=[], help="merge: the lstm JSONs of the arms")
    p.add_argument("--model", default=None)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heldout", default=GPL)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--tune-steps", type=int, default=8)
    p.add_argument("--gen", type=int, default=0, help="quant: also distill with this many windows of the teacher's own text")
    p.add_argument("--minutes", type=float, default=None, help="quant: default = +tune's CPU-minutes; lstm: per arm")
    p.add_argument("--student", default="lstm:layers=2,hidden=768")
    p.add_argument("--arm", choices=("both", "distilled", "cross-entropy"), default="both")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--json", required=True)
    p.add_argument("--png", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "merge":
        merge(args.inputs, args.json, args.png)
        return 0
    t0 = time.perf_counter()
    data = part_quant(args) if args.part == "quant" else part_lstm(args)
    meta = {"command": " ".join(sys.argv), "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "wall_minutes": (time.perf_counter() - t0) / 60,
            "note": "2-core machine shared with other jobs (load average above): budgets are CPU-minutes, wall times "
                    "are not comparable"}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": data}, f, indent=1)
    if args.png:
        plot(data, args.png) if args.part == "lstm" else plot_quant(args.json, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
