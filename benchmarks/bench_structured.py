"""Structured output's costs on the default model (jisu.load() defaults: quantized, fp16 KV):

  compile   time to a ready matcher (schema -> llguidance grammar -> LLMatcher) for every schema of
            tests/structured_schemas.py, the compile cache emptied before each: p50 / p99 / max
  mask      per step: llguidance computing the mask (right after the previous token is accepted,
            on the mask thread) and applying it (waiting for it, masking the row in place): p50 / p99
  decode    time per generated token, constrained vs unconstrained, at 1 and 8 streams:
            (wall of 128 new tokens - wall of 16) / 112, greedy, the constrained rows under a JSON
            Schema that cannot end within 128 tokens, the free rows with EOS ignored; rounds alternate
            free / constrained (next mask on the mask thread) / constrained with the mask made on the
            engine thread, medians over --reps

  python benchmarks/bench_structured.py [--threads 2] [--reps 3] [--out benchmarks/results/structured.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHORT, LONG = 16, 128
ROWS = {"type": "array", "minItems": 40, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                                     "name": {"type": "string", "maxLength": 16},
                                     "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}}},
    "required": ["id", "name", "tags"], "additionalProperties": False}}
PROMPT = [{"role": "user", "content": "List forty users as JSON objects with an id, a name and tags."}]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def bench_compile(llm, reps: int) -> dict:
    from jisu.engine import structured as es
    from tests.structured_schemas import SCHEMAS

    lltok = es.ll_tokenizer(llm.tokenizer, llm.config.vocab_size, llm.eos_ids)   # built once per model, not timed
    times, per = [], {}
    for _ in range(reps):
        for name, schema, _ in SCHEMAS:
            es._COMPILED.clear()
            t0 = time.perf_counter()
            m = es.compile_matcher(es.json_schema_grammar(schema), lltok)
            dt = (time.perf_counter() - t0) * 1e3
            assert not m.is_error()
            times.append(dt)
            per[name] = min(per.get(name, dt), dt)
    return {"schemas": len(SCHEMAS), "runs": len(times), "p50_ms": pct(times, 50), "p99_ms": pct(times, 99),
            "max_ms": max(times), "slowest": sorted(per.items(), key=lambda kv: -kv[1])[:5]}


class MaskTimer:
    """Wraps Constraint._fill (llguidance's mask) and Constraint.apply (masking the row) with timers."""

    def __init__(self):
        from jisu.engine import structured as es

        self.es, self.fill, self.apply = es, [], []
        self._fill0, self._apply0 = es.Constraint._fill, es.Constraint.mask_

    def __enter__(self):
        fill0, apply0, fill, apply = self._fill0, self._apply0, self.fill, self.apply

        def timed_fill(c):
            t0 = time.perf_counter()
            fill0(c)
            fill.append((time.perf_counter() - t0) * 1e6)

        def timed_apply(c, row):
            t0 = time.perf_counter()
            apply0(c, row)
            apply.append((time.perf_counter() - t0) * 1e6)

        self.es.Constraint._fill, self.es.Constraint.mask_ = timed_fill, timed_apply
        return self

    def __exit__(self, *exc):
        self.es.Constraint._fill, self.es.Constraint.mask_ = self._fill0, self._apply0


def run_once(engine, prompt, streams: int, n: int, constrained) -> tuple[float, list[dict]]:
    """`constrained`: False, True (the next mask on the mask thread) or "serial" (on the engine thread)."""
    from jisu.config import SamplingParams
    from jisu.engine import structured as es

    es.OVERLAP_MASKS = constrained != "serial"
    p = (SamplingParams(max_tokens=n, temperature=0, json_schema=ROWS) if constrained
         else SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, speculative="off"))  # drafts would flatter the free rows
    t0 = time.perf_counter()
    out = engine.generate([prompt] * streams, [p] * streams)
    return time.perf_counter() - t0, out


def bench_decode(llm, reps: int) -> dict:
    from jisu.engine.engine import Engine

    engine = Engine.from_llm(llm, max_num_seqs=8, kv_memory_mb=64, prefix_caching=False)
    prompt = llm.tokenizer.encode_chat(PROMPT)
    res: dict = {}
    timer = MaskTimer()
    kinds = (False, True, "serial")
    for streams in (1, 8):
        for constrained in kinds:                # warm-up (and the compile cache)
            run_once(engine, prompt, streams, SHORT, constrained)
        per = {k: [] for k in kinds}
        for _ in range(reps):
            for constrained in kinds:
                with timer if constrained is True else _Null():
                    short, _ = run_once(engine, prompt, streams, SHORT, constrained)
                    long, out = run_once(engine, prompt, streams, LONG, constrained)
                assert all(len(o["token_ids"]) == LONG for o in out), [o["finish_reason"] for o in out]
                per[constrained].append((long - short) / (LONG - SHORT) * 1e3)
        free, cons, serial = (statistics.median(per[k]) for k in kinds)
        res[f"{streams}_stream"] = {"unconstrained_ms_per_step": free, "constrained_ms_per_step": cons,
                                    "ratio": cons / free, "constrained_serial_mask_ms_per_step": serial,
                                    "ratio_serial_mask": serial / free,
                                    "runs": {"free": per[False], "constrained": per[True], "serial_mask": per["serial"]}}
    res["mask_fill_us"] = {"p50": pct(timer.fill, 50), "p99": pct(timer.fill, 99), "n": len(timer.fill)}
    res["mask_apply_us"] = {"p50": pct(timer.apply, 50), "p99": pct(timer.apply, 99), "n": len(timer.apply)}
    return res


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "structured.json"))
    ap.add_argument("--skip-compile", action="store_true", help="decode and mask figures only")
    args = ap.parse_args()

    import jisu
    import llguidance

    load0 = os.getloadavg()[0]
    llm = jisu.load(threads=args.threads)
    result = {"model": llm.source.path, "threads": args.threads, "reps": args.reps,
              "llguidance": llguidance.__version__, "load_avg_before": load0}
    if not args.skip_compile:
        result["compile"] = c = bench_compile(llm, args.reps)
        print(f"compile over {c['schemas']} schemas x {args.reps}: p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms, "
              f"max {c['max_ms']:.2f} ms")
    result["decode"] = d = bench_decode(llm, args.reps)
    for k in ("1_stream", "8_stream"):
        r = d[k]
        print(f"{k}: unconstrained {r['unconstrained_ms_per_step']:.2f} ms/step, constrained "
              f"{r['constrained_ms_per_step']:.2f} ms/step, ratio {r['ratio']:.3f} (mask on the engine thread: "
              f"{r['constrained_serial_mask_ms_per_step']:.2f} ms/step, ratio {r['ratio_serial_mask']:.3f})")
    print(f"mask (llguidance) p50 {d['mask_fill_us']['p50']:.0f} us, p99 {d['mask_fill_us']['p99']:.0f} us; "
          f"applying it p50 {d['mask_apply_us']['p50']:.0f} us, p99 {d['mask_apply_us']['p99']:.0f} us")
    result["load_avg_after"] = os.getloadavg()[0]
    from jisu.eval.bench import machine_info

    result["machine"] = machine_info()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} (load average {load0:.1f} -> {result['load_avg_after']:.1f} on "
          f"{os.cpu_count()} CPUs: timings on a busy machine are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
