"""jisu's decode and prefill speed on the default model (SmolLM2-135M-Instruct; the Q4_1 GGUF as
shipped, plus Q4_0 / Q8_0 GGUFs found next to it, in --quant-dir, or GGUFs and jisu artifact folders
given by --model), measured end to end, optionally against llama.cpp's llama-bench in the same run
(an artifact, which llama.cpp cannot read, is set beside llama.cpp on the Q4_0 file). Peak RSS is the
process's maximum resident set above its size after importing torch, jisu and the libraries a load
imports, against file + KV cache.

  decode tok/s  = (256 - 16) / (wall time of 256 new tokens - wall time of 16 new tokens)
                  (LLM.generate, greedy, EOS ignored, a short chat prompt)
  prefill tok/s = 256 / wall time of a 256-token prompt + 1 new token

One warm-up round, then --reps rounds; in each round jisu and llama-bench (-r 1) alternate, so a
change in machine load hits both; medians are reported. Also printed per model: the bytes a
decoded token reads (weights + KV cache at the mean context) x tok/s = achieved GB/s, and where a
decoded token's time goes (native step: linears / attention / rest; the runner's Python around it;
the engine loop around runner.run: scheduling, sampling, bookkeeping).

  python benchmarks/bench_decode.py [--threads 2] [--reps 3] [--model FILE.gguf ...]
      [--llama-bench PATH] [--make-quants]   # llama-quantize (next to llama-bench) writes Q4_0/Q8_0
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

import torch

SHORT, LONG, PREFILL = 16, 256, 256
CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
DEFAULT_QUANT_DIR = os.path.expanduser("~/.cache/jisu/bench-models")
PEAK_GBS = 25.0  # rough DRAM bandwidth of the reference machine


def cpu_name() -> str:
    from jisu.eval.bench import machine_info

    return machine_info()["cpu"]


def model_bytes(path: str) -> int:
    """A GGUF's size, or the sum of a jisu artifact folder's files."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if os.path.isfile(os.path.join(path, f)))
    return os.path.getsize(path)


def load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class TimedRunner:
    """Proxy recording the wall time of every runner.run call and the native step's time."""

    def __init__(self, runner):
        self.inner = runner
        self.calls: list[tuple[float, float]] = []  # (run call s, native s)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, *args):
        native = getattr(self.inner, "stats", None)
        before = native()["total_s"] if native else 0.0
        t0 = time.perf_counter()
        out = self.inner.run(*args)
        t1 = time.perf_counter()
        after = native()["total_s"] if native else 0.0
        self.calls.append((t1 - t0, after - before))
        return out


def bytes_per_token(runner, ctx: float) -> int:
    """Weight bytes a decode step streams (each matrix once, the LM head, one embedding row) plus
    the KV cache read at context `ctx`."""
    from jisu.kernels.packed import PackedWeight

    cfg = runner.cfg
    w = runner.model.w
    seen, total = set(), 0
    for name, t in w.items():
        if name == "model.embed_tokens.weight" or id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, PackedWeight):
            total += t.nbytes
        elif t.dim() == 2:
            total += t.numel() * t.element_size()
    emb = w["model.embed_tokens.weight"]
    total += (emb.nbytes if isinstance(emb, PackedWeight) else emb.numel() * 4) // cfg.vocab_size
    kv_item = runner.kv_dtype.itemsize  # the cache the engine gets by default
    total += int(2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_item * ctx)
    return total


def run_llama_bench(path: str, model: str, threads: int) -> dict:
    cmd = [path, "-m", model, "-t", str(threads), "-p", str(PREFILL), "-n", "128", "-r", "1", "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode:
        raise RuntimeError(f"llama-bench failed: {res.stderr[-2000:]}")
    out = {}
    for row in json.loads(res.stdout):
        key = "prefill" if row["n_prompt"] and not row["n_gen"] else "decode"
        out[key] = float(row["avg_ts"])
    return out


def make_quants(llama_bench: str, src: str, out_dir: str) -> list[str]:
    quantize = os.path.join(os.path.dirname(llama_bench), "llama-quantize")
    if not os.path.isfile(quantize):
        print(f"no llama-quantize next to {llama_bench}; skipping --make-quants", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    made = []
    stem = Path(src).name.split(".Q")[0]
    for q in ("Q4_0", "Q8_0"):
        dst = os.path.join(out_dir, f"{stem}.{q}.gguf")
        if not os.path.isfile(dst):
            subprocess.run([quantize, "--allow-requantize", src, dst, q], check=True, capture_output=True)
        made.append(dst)
    return made


def find_models(args) -> list[str]:
    from jisu.io.sources import resolve

    if args.model:
        return args.model
    shipped = resolve(None).path
    models = [shipped]
    stem = Path(shipped).name.split(".Q")[0]
    for folder in (os.path.dirname(shipped), args.quant_dir):
        for q in ("Q4_0", "Q8_0"):
            p = os.path.join(folder, f"{stem}.{q}.gguf")
            if os.path.isfile(p) and p not in models:
                models.append(p)
    return models


def bench_model(path: str, args) -> dict:
    import psutil

    import jisu
    from jisu.engine.native_runner import NativeRunner

    # the runtime first: torch, jisu and the libraries a load imports (tokenizers, safetensors, the
    # kernels' module and jisu.kernels.ops, whose import-time check of the SIMD paths starts the
    # kernels' thread pool and torch's CPU runtime: ~10 MB), so that what is measured above rss0 is
    # the model's own memory
    import importlib

    for mod in ("tokenizers", "jinja2.sandbox", "safetensors.torch", "tqdm", "jisu.io.gguf", "jisu.io.tokenizer",
                "jisu.io.sources", "jisu.io.gguf_packed", "jisu.io.artifact", "jisu.kernels.ops",
                "jisu.engine.native_runner", "jisu.models.llama", "jisu.engine.engine"):
        importlib.import_module(mod)
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    llm = jisu.load(path, threads=args.threads, precise=args.precise)
    load_s = time.perf_counter() - t0
    rss = psutil.Process().memory_info().rss - rss0  # weights + tokenizer, before any KV cache
    native = isinstance(llm.runner, NativeRunner)
    ids = llm.tokenizer.encode_chat(CHAT)
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(100, llm.config.vocab_size, (PREFILL,), generator=g).tolist()

    def gen(prompt, n):
        return llm.generate(prompt, temperature=0, max_tokens=n, ignore_eos=True)

    def jisu_round() -> tuple[float, float]:
        t_short = timed(lambda: gen(ids, SHORT))
        t_long = timed(lambda: gen(ids, LONG))
        t_pre = timed(lambda: gen(long_prompt, 1))
        return (LONG - SHORT) / (t_long - t_short), PREFILL / t_pre

    jisu_round()  # warm-up
    lb = args.llama_bench if path.endswith(".gguf") else None  # llama.cpp reads GGUFs only
    if lb:
        run_llama_bench(args.llama_bench, path, args.threads)
    dec, pre, lc_dec, lc_pre = [], [], [], []
    for _ in range(args.reps):
        d, p = jisu_round()
        dec.append(d)
        pre.append(p)
        if lb:
            r = run_llama_bench(lb, path, args.threads)
            lc_dec.append(r["decode"])
            lc_pre.append(r["prefill"])
    # where a decoded token's time goes (one profiled run of LONG tokens)
    proxy = TimedRunner(llm.runner)
    if native:
        llm.runner.profile(True)
        llm.runner.handle.reset_stats()
    llm.runner = proxy
    t_all = timed(lambda: gen(ids, LONG))
    llm.runner = proxy.inner
    steps = proxy.calls[1:]  # the decode steps (the first call is the prompt)
    n = len(steps)
    fwd = sum(c[0] for c in steps) / n
    nat = sum(c[1] for c in steps) / n
    prefill_call = proxy.calls[0][0]
    per_tok = (t_all - prefill_call) / n
    breakdown = {"wall_ms": per_tok * 1e3, "forward_call_ms": fwd * 1e3, "native_ms": nat * 1e3,
                 "wrapper_ms": (fwd - nat) * 1e3, "loop_ms": (per_tok - fwd) * 1e3}
    if native:
        st = llm.runner.stats()
        breakdown.update({f"native_{k[:-2]}_share": st[k] / st["total_s"] for k in ("linear_s", "attention_s", "other_s")})
        llm.runner.profile(False)
    # the same loop around a model that answers instantly (replaying the tokens just generated,
    # so detokenizing sees the same text): Python's own cost per token
    replay = gen(ids, LONG).token_ids
    V = llm.config.vocab_size

    class Instant:
        cfg = llm.config
        kv_dtype = proxy.inner.kv_dtype
        max_step_tokens, prefill_chunk = proxy.inner.max_step_tokens, proxy.inner.prefill_chunk

        def __init__(self):
            self.i = self.hot = 0
            self.out = torch.zeros(1, V)  # one-hot, updated in place (torch.zeros itself costs ~ms
            #                                on a busy machine: it runs on torch's thread pool)

        def run(self, step, kv):
            if step.start_positions[0] == 0:  # a new sequence: replay from its first token
                self.i = 0
            self.out[0, self.hot] = 0.0
            self.hot = replay[min(self.i, len(replay) - 1)]
            self.out[0, self.hot] = 1.0
            self.i += 1
            return self.out[:len(step.logit_rows)]

    real = llm.runner
    llm.runner = Instant()
    gen(ids, SHORT)
    breakdown["loop_alone_ms"] = timed(lambda: gen(ids, LONG)) / LONG * 1e3
    llm.runner = real
    ctx = len(ids) + (SHORT + LONG) / 2
    bpt = bytes_per_token(llm.runner, ctx)
    from jisu.memory import peak_rss_bytes

    peak = peak_rss_bytes() - rss0
    cfg = llm.config
    kv_item = llm.runner.kv_dtype.itemsize
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_item * max(len(long_prompt) + 1, len(ids) + LONG)
    res = {"model": path, "file_mb": model_bytes(path) / 1e6, "peak_rss_mb": peak / 1e6, "kv_mb": kv / 1e6, "native": native, "load_s": load_s,
           "rss_mb": rss / 1e6, "decode_tok_s": statistics.median(dec), "prefill_tok_s": statistics.median(pre),
           "decode_runs": dec, "prefill_runs": pre, "bytes_per_token": bpt,
           "decode_gb_s": bpt * statistics.median(dec) / 1e9, "breakdown": breakdown}
    if lb:
        res.update({"llama_cpp_decode_tok_s": statistics.median(lc_dec), "llama_cpp_prefill_tok_s": statistics.median(lc_pre),
                    "llama_cpp_decode_runs": lc_dec, "llama_cpp_prefill_runs": lc_pre,
                    "decode_ratio": statistics.median(dec) / statistics.median(lc_dec),
                    "prefill_ratio": statistics.median(pre) / statistics.median(lc_pre)})
    del llm
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="GGUF file or jisu artifact folder (repeatable); default: the "
                                                     "shipped Q4_1 and Q4_0/Q8_0 siblings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llama-bench", help="path of llama.cpp's llama-bench: run it on the same files")
    ap.add_argument("--make-quants", action="store_true", help="write Q4_0 / Q8_0 copies of the shipped Q4_1 "
                                                              "with llama-quantize (into --quant-dir)")
    ap.add_argument("--quant-dir", default=DEFAULT_QUANT_DIR)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.json"))
    ap.add_argument("--precise", action="store_true", help="jisu with ~15-bit activations (jisu.load(precise=True))")
    ap.add_argument("--isa", help="force jisu's kernel ISA (avx2, avx512, scalar; sets JISU_ISA): e.g. the AVX2 "
                                  "path on an AVX-512 machine, against a llama-bench built for AVX2 only")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.isa:
        os.environ["JISU_ISA"] = args.isa  # read by jisu.kernels.ops at import (here and in the children)
    torch.set_num_threads(args.threads)
    if args.make_quants:
        if not args.llama_bench:
            ap.error("--make-quants needs --llama-bench (llama-quantize is looked up next to it)")
        from jisu.io.sources import resolve

        make_quants(args.llama_bench, resolve(None).path, args.quant_dir)
    if args.one:  # child process: one model, result as JSON on stdout
        print("JSON:" + json.dumps(bench_model(args.one, args)))
        return 0
    load0 = load_avg()
    results = []
    isa = os.environ.get("JISU_ISA") or "best"
    for m in find_models(args):
        # each model in a fresh process, so its load time and memory are its own
        cmd = [sys.executable, __file__, "--one", m, "--threads", str(args.threads), "--reps", str(args.reps)] + (["--precise"] if args.precise else [])
        if args.llama_bench:
            cmd += ["--llama-bench", args.llama_bench]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("JSON:")), None)
        if res.returncode or line is None:
            print(f"{m}: failed\n{res.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[5:]))
    load1 = load_avg()

    print(f"\n{cpu_name()}, {args.threads} threads, medians of {args.reps}; "
          f"load average {load0:.1f} -> {load1:.1f}")
    lc = bool(args.llama_bench)
    head = "| model | MB | decode tok/s |" + (" llama.cpp tg128 | ratio |" if lc else "") + \
           " prefill tok/s (256) |" + (" llama.cpp pp256 | ratio |" if lc else "") + " MB/token | GB/s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    # a model llama.cpp cannot run (a jisu artifact) is compared with llama.cpp on the Q4_0 file
    q4 = next((r for r in results if r["model"].endswith("Q4_0.gguf") and "llama_cpp_decode_tok_s" in r), None)
    for r in results:
        row = f"| {Path(r['model']).name} | {r['file_mb']:.0f} | {r['decode_tok_s']:.1f} |"
        peer = r if "llama_cpp_decode_tok_s" in r else q4
        if lc and peer is not None:
            tag = "" if peer is r else " (Q4_0)"
            row += (f" {peer['llama_cpp_decode_tok_s']:.1f}{tag} | "
                    f"{r['decode_tok_s'] / peer['llama_cpp_decode_tok_s']:.2f} |")
        elif lc:
            row += " – | – |"
        row += f" {r['prefill_tok_s']:.1f} |"
        if lc and peer is not None:
            row += (f" {peer['llama_cpp_prefill_tok_s']:.1f}{tag} | "
                    f"{r['prefill_tok_s'] / peer['llama_cpp_prefill_tok_s']:.2f} |")
        elif lc:
            row += " – | – |"
        row += f" {r['bytes_per_token'] / 1e6:.1f} | {r['decode_gb_s']:.1f} (of ~{PEAK_GBS:.0f}) |"
        print(row)
    print("\nper decoded token (ms): wall = native forward + Python wrapper + generate loop")
    for r in results:
        b = r["breakdown"]
        extra = ""
        if "native_linear_share" in b:
            extra = (f"  [native: linear {100 * b['native_linear_share']:.0f}%, attention "
                     f"{100 * b['native_attention_share']:.0f}%, other {100 * b['native_other_share']:.0f}%]")
        print(f"  {Path(r['model']).name}: {b['wall_ms']:.2f} = {b['native_ms']:.2f} + {b['wrapper_ms']:.2f} + "
              f"{b['loop_ms']:.2f} (the loop alone, model answering instantly: {b['loop_alone_ms']:.2f})"
              f"{extra}; load {r['load_s']:.1f} s, +{r['rss_mb']:.0f} MB RSS after load, peak "
              f"+{r['peak_rss_mb']:.0f} MB = {r['peak_rss_mb'] / (r['file_mb'] + r['kv_mb']):.2f} x (file "
              f"{r['file_mb']:.0f} MB + KV cache {r['kv_mb']:.0f} MB)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "reps": args.reps, "precise": args.precise, "isa": isa, "load_avg": [load0, load1],
                   "torch": torch.__version__, "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
