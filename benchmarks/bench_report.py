"""The full report card for one or more models: `jisu eval` against the fp32 reference, then
`jisu bench` (with peers), one combined table and a quality-vs-speed plot.

    .venv/bin/python benchmarks/bench_report.py [MODEL ...] [--reference REF] [--against llama.cpp,transformers]
                                                [--out DIR] [--reps 3] [--chunks 8] [--ctx 256]

MODEL defaults to the default model; REF defaults to an artifact's manifest source, else the default
model (its Q4_1 weights dequantized to fp32 are the reference). Writes DIR/<name>.quality.json,
DIR/<name>.bench.json, DIR/report.md and DIR/quality_vs_speed.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=[None])
    p.add_argument("--reference", default=None)
    p.add_argument("--against", default="llama.cpp,transformers")
    p.add_argument("--out", default="bench_report")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--replot", action="store_true", help="redraw DIR's table and plot from its saved results")
    a = p.parse_args()

    from jisu.eval.bench import plot, run_bench, to_markdown
    from jisu.eval.report import ReportCard
    from jisu.eval.runner import evaluate, format_quality, manifest_source
    from jisu.io.sources import resolve

    if a.replot:  # the table and plot again from DIR/*.bench.json (no measuring)
        import glob

        benches = []
        for path in sorted(glob.glob(os.path.join(a.out, "*.bench.json")), key=os.path.getmtime):
            with open(path) as f:
                benches.append(json.load(f))
        print(to_markdown(benches))
        plot(benches, os.path.join(a.out, "quality_vs_speed.png"))
        return 0
    os.makedirs(a.out, exist_ok=True)
    against = [x for x in a.against.split(",") if x]
    benches, cards = [], []
    for model in a.models:
        reference = a.reference or manifest_source(model) or resolve(None).path
        q = evaluate(model, reference, chunks=a.chunks, ctx=a.ctx, threads=a.threads, progress=sys.stderr.isatty())
        print(format_quality(q), file=sys.stderr)
        b = run_bench(model, against=against, threads=a.threads, reps=a.reps,
                      log=lambda m: print(m, file=sys.stderr))
        b["quality"] = q.to_dict()
        name = b["model"]
        for suffix, data in (("quality", q.to_dict()), ("bench", b)):
            with open(os.path.join(a.out, f"{name}.{suffix}.json"), "w") as f:
                json.dump(data, f, indent=2)
        benches.append(b)
        cards.append(ReportCard(model=name, quality=q.to_dict(), speed=b["engines"]["jisu"],
                                size={"file_bytes": b["file_bytes"],
                                      "weight_bytes_per_token": b["engines"]["jisu"]["weight_bytes_per_token"]}))
    table = to_markdown(benches)
    report = "\n\n".join([table] + [c.to_markdown() for c in cards]) + "\n"
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(report)
    print(report)
    plot(benches, os.path.join(a.out, "quality_vs_speed.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
