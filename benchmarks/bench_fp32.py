"""jisu fp32 vs transformers fp32 on the default model (SmolLM2-135M-Instruct, the Q4_1 GGUF
dequantized to fp32 by each: jisu.load(packed=False), with jisu's native forward when built),
same process, same threads, same prompt ids.

  decode tok/s  = (128 - 16) / (wall time of 128 new tokens - wall time of 16 new tokens)
  prefill tok/s = prompt tokens / wall time of 1 new token

Every time is end to end (jisu `LLM.generate`, transformers `model.generate`), greedy, EOS ignored.
One warm-up round, then --reps rounds (engines alternate inside each round); medians are reported.

  python benchmarks/bench_fp32.py [--threads 2] [--reps 3] [--out benchmarks/results/fp32.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHORT, LONG = 16, 128
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant who explains technical ideas clearly."},
    {"role": "user", "content": (
        "Here is a paragraph about CPU inference. Large language models are often run on GPUs, but "
        "small models such as SmolLM2 with 135 million parameters can run on an ordinary laptop CPU. "
        "The speed of generation is then limited mostly by memory bandwidth during decoding, because "
        "every new token needs all the weights to be read once, while processing the prompt is limited "
        "by arithmetic throughput, because many tokens share each weight read. Explain in a few "
        "sentences why quantizing the weights to 4 bits can make decoding faster, and what it costs.")},
]


def cpu_name() -> str:
    from jisu.eval.bench import machine_info

    return machine_info()["cpu"]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fp32.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM

    import jisu
    from jisu.io.sources import resolve

    gguf = resolve(None).path
    # packed=False: every tensor dequantized to fp32 (the default keeps Q4_1 packed for the native
    # kernels); threads= sets torch's and jisu's native thread pool
    llm = jisu.load(gguf, packed=False, threads=args.threads)
    with tempfile.TemporaryDirectory() as folder:  # transformers wants folder + file name
        os.symlink(os.path.realpath(gguf), os.path.join(folder, "model.gguf"))
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()
    assert torch.get_num_threads() == args.threads

    prompt = llm.tokenizer.encode_chat(MESSAGES)
    x = torch.tensor([prompt])

    def run_jisu(n: int) -> list[int]:
        c = llm.generate(prompt, temperature=0, max_tokens=n, ignore_eos=True)
        assert len(c.token_ids) == n
        return c.token_ids

    @torch.inference_mode()
    def run_hf(n: int) -> list[int]:
        # eos_token_id=None as a keyword turns off the stop on EOS (min_new_tokens would instead
        # forbid EOS, changing the tokens). The explicit mask matters: without EOS, generate() tells
        # padding (id 2, <|im_end|>) from EOS and would mask every <|im_end|> of the prompt.
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                          eos_token_id=None)
        assert out.shape[1] == len(prompt) + n
        return out[0, len(prompt):].tolist()

    engines = {"jisu": run_jisu, "transformers": run_hf}
    same_tokens = run_jisu(LONG) == run_hf(LONG)  # also the warm-up
    times = {e: {1: [], SHORT: [], LONG: []} for e in engines}
    load_before = os.getloadavg()
    for rep in range(args.reps):
        for n in (1, SHORT, LONG):
            for name, fn in engines.items():
                times[name][n].append(timed(lambda: fn(n)))
        print(f"round {rep + 1}/{args.reps}: " + ", ".join(
            f"{name} {t[LONG][-1]:.2f}s/{LONG} tok" for name, t in times.items()), file=sys.stderr)
    load_after = os.getloadavg()

    results = {}
    for name, t in times.items():
        med = {n: statistics.median(v) for n, v in t.items()}
        results[name] = {
            "decode_tok_s": (LONG - SHORT) / (med[LONG] - med[SHORT]),
            "prefill_tok_s": len(prompt) / med[1],
            "median_s": {str(n): v for n, v in med.items()},
            "runs_s": {str(n): v for n, v in t.items()},
        }
    ratio = {k: results["jisu"][k] / results["transformers"][k] for k in ("decode_tok_s", "prefill_tok_s")}

    print(f"\nSmolLM2-135M-Instruct fp32, {args.threads} threads, {cpu_name()}, prompt {len(prompt)} tokens, "
          f"median of {args.reps} (load average {load_before[0]:.1f} -> {load_after[0]:.1f})\n")
    print("| engine | decode tok/s | prefill tok/s |")
    print("|---|---:|---:|")
    for name in engines:
        r = results[name]
        print(f"| {name} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.1f} |")
    print(f"| **jisu / transformers** | **{ratio['decode_tok_s']:.2f}x** | **{ratio['prefill_tok_s']:.2f}x** |")
    print(f"\ngreedy tokens identical ({LONG} new): {same_tokens}")
    if load_after[0] > os.cpu_count() or load_before[0] > os.cpu_count():
        print(f"warning: load average above {os.cpu_count()} CPUs: other processes competed for the cores")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)", "gguf": os.path.basename(gguf),
        "threads": args.threads, "reps": args.reps, "prompt_tokens": len(prompt),
        "decode": f"({LONG} - {SHORT}) new tokens / (t({LONG}) - t({SHORT})), end to end, EOS ignored",
        "prefill": "prompt tokens / t(1 new token), end to end",
        "results": results, "ratio_jisu_over_transformers": ratio, "greedy_tokens_identical": same_tokens,
        "load_average": {"before": load_before, "after": load_after},
        "jisu_model": type(llm.model).__name__,
        "env": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "jisu": getattr(jisu, "__version__", "?"), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
