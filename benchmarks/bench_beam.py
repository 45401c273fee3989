"""Beam search's cost against greedy on the default model: beam-4 on a 512-token prompt + 128 new tokens
(EOS ignored, so every run decodes all 128 steps), in one engine with 16-token KV blocks.

  peak KV blocks  = the most blocks held right after a step's scheduling (its copy-on-write copies
                    made, before dropped beams free theirs), against one sequence's 640 / 16 = 40
  wall ratio      = beam search's wall time / greedy's (each: prefill + 128 new tokens), medians of
                    --reps rounds in which the two alternate, after one warm-up round

  python benchmarks/bench_beam.py [--threads 2] [--reps 3] [--beams 4] [--out results/beam.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

PROMPT_TOKENS, NEW_TOKENS = 512, 128
TEXT = Path(__file__).resolve().parent.parent / "README.md"


def prompt_ids(llm, n: int) -> list[int]:
    """The first `n` tokens of the project's README (repeated if short): ordinary English and code."""
    ids = llm.tokenizer.encode(TEXT.read_text())
    while len(ids) < n:
        ids += ids
    return ids[:n]


def run_once(engine, prompt: list[int], params) -> tuple[float, int, dict]:
    """(wall seconds, peak KV blocks right after scheduling, the result)."""
    sched = engine.scheduler
    peak = 0
    schedule = sched.schedule

    def watched():
        nonlocal peak
        batch = schedule()
        peak = max(peak, sched.num_blocks_used)
        return batch
    sched.schedule = watched
    try:
        t0 = time.perf_counter()
        out = engine.generate([prompt], params)[0]
        wall = time.perf_counter() - t0
    finally:
        del sched.schedule
    assert out["error"] is None, out["error"]
    return wall, peak, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the default model (SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--precise", action="store_true", help="load with precise=True")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import jisu
    from jisu.config import SamplingParams
    from jisu.engine.engine import Engine

    llm = jisu.load(args.model, threads=args.threads, precise=True if args.precise else None)
    prompt = prompt_ids(llm, PROMPT_TOKENS)
    engine = Engine.from_llm(llm, block_size=16, prefix_caching=False, max_num_seqs=max(16, args.beams))
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, speculative="off")  # plain decode, no drafts
    beam = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, num_beams=args.beams)
    one_seq = -(-(PROMPT_TOKENS + NEW_TOKENS) // engine.kv.block_size)

    run_once(engine, prompt, greedy)  # warm-up
    run_once(engine, prompt, beam)
    g_walls, b_walls, b_peaks, g_peaks = [], [], [], []
    for _ in range(args.reps):
        w, p, g_out = run_once(engine, prompt, greedy)
        g_walls.append(w)
        g_peaks.append(p)
        w, p, b_out = run_once(engine, prompt, beam)
        b_walls.append(w)
        b_peaks.append(p)
    g_wall, b_wall = statistics.median(g_walls), statistics.median(b_walls)
    best = b_out["sequences"][0]
    result = {
        "model": llm.source.name, "threads": args.threads, "precise": args.precise, "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(), "num_beams": args.beams,
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "block_size": engine.kv.block_size,
        "one_sequence_blocks": one_seq, "greedy_peak_blocks": max(g_peaks), "beam_peak_blocks": max(b_peaks),
        "beam_blocks_ratio": max(b_peaks) / one_seq,
        "greedy_wall_s": g_walls, "beam_wall_s": b_walls, "wall_ratio": b_wall / g_wall,
        "greedy_tok_s": NEW_TOKENS / g_wall, "beam_best_score": best.score,
        "beam_best_equals_greedy": best.token_ids == g_out["token_ids"],
        "targets": {"beam_blocks_ratio": 1.35, "wall_ratio": 1.8},
    }
    print(f"{llm.source.name}, {args.threads} threads, beam-{args.beams} on {PROMPT_TOKENS} + {NEW_TOKENS} tokens")
    print(f"  peak KV blocks: beam {max(b_peaks)} vs one sequence {one_seq} ({result['beam_blocks_ratio']:.2f}x; "
          f"target <= 1.35x)")
    print(f"  wall: beam {b_wall:.2f} s vs greedy {g_wall:.2f} s ({result['wall_ratio']:.2f}x; target <= 1.8x)"
          f"  [greedy runs {', '.join(f'{w:.2f}' for w in g_walls)}; beam {', '.join(f'{w:.2f}' for w in b_walls)}]")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
