"""jisu against native llama.cpp (llama-bench) on the same GGUF files, interleaved A B B A, with
peak memory against file size and decode speed against the machine's measured memory bandwidth.

  python benchmarks/bench_gguf.py [FILE.gguf ...] [--set default|quants|real|qwen|all] [--reps 3]
      [--threads 2] [--models DIR] [--llama-bench PATH] [--quick] [--prefill-only] [--out results/gguf.json]

Per file and round: jisu in a fresh process (load, warm-up, then greedy, EOS ignored:
  decode tok/s  = (N2 - N1) / (t(N2 new tokens) - t(N1 new tokens)) after a short chat prompt,
  prefill tok/s = 256 / t(256-token prompt + 1 new token)), in the default (faithful) mode and then
  in the same process with --fast, and `llama-bench -t 2 -p 256 -n 128
-r 1 -o json` (pp256, tg128), in the order jisu, llama, llama, jisu, ...; medians over --reps.
Memory: the jisu process's peak RSS (VmHWM, its ru_maxrss) minus its RSS after importing the runtime with no
model, against file size + KV cache; and the whole peak against file + KV + that runtime RSS. Bytes per token: jisu's linear weights' nbytes + one embedding
row; the file's tensor bytes likewise (llama.cpp). Bandwidth: the best of 5 torch.sum passes over a
1 GiB float32 array with --threads threads. Files come from benchmarks/make_models.py.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_models import ARCHS, DEFAULT_LLAMA_CPP, DEFAULT_OUT, QUANT_TYPES, default_gguf, random_stem  # noqa: E402

CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
TEXT = "The history of computing is a story of abstraction layered on abstraction. " * 60


def model_set(name: str, folder: str) -> list[str]:
    """The files of a named set that exist in folder (the default model's shipped file included)."""
    shipped = default_gguf()
    stem = Path(shipped).name.split(".Q")[0]
    quants = [os.path.join(folder, f"{stem}.{t}.gguf") for t in QUANT_TYPES]
    real = [os.path.join(folder, f"{random_stem(k)}.Q4_K_M.gguf") for k in ("qwen2.5-1.5b", "llama-3.2-3b", "llama-3.1-8b")]
    qwen = [os.path.join(folder, f"{random_stem('qwen2.5-1.5b')}.{t}.gguf") for t in ("BF16",) + ARCHS["qwen2.5-1.5b"]["types"]]
    files = {"default": [shipped], "quants": [shipped] + quants, "real": real, "qwen": qwen,
             "all": [shipped] + quants + qwen + real[1:]}[name]
    return [f for f in files if os.path.isfile(f)]


def gguf_info(path: str) -> dict:
    """Architecture, tensor-type mix, the bytes a decoded token reads from the file (every tensor
    but the token embedding, of which one row; the whole embedding too when it is the output),
    and what jisu's fp32 fallback would hold for the types its native kernels do not run."""
    from gguf import GGUFReader

    from jisu.io.gguf_packed import PACKABLE
    from jisu.kernels.packed_ggml import native_types

    r = GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    native = native_types() | {int(t) for t in PACKABLE} | {0}  # 0: F32 (norms, small)
    mix, total, per_tok, fallback = {}, 0, 0, 0
    names = {t.name for t in r.tensors}
    for t in r.tensors:
        n = int(t.n_bytes)
        e = mix.setdefault(t.tensor_type.name, [0, 0])
        e[0] += 1
        e[1] += n
        total += n
        if t.name == "token_embd.weight":
            rows = int(t.shape[-1])
            per_tok += n if "output.weight" not in names else n // rows
        else:
            per_tok += n
        if int(t.tensor_type) not in native and len(t.shape) == 2:
            fallback += 4 * int(t.n_elements)
    return {"arch": arch, "tensor_types": mix, "tensor_bytes": total, "file_bytes_per_token": per_tok,
            "fp32_fallback_bytes": fallback}


def bandwidth_gbs(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB, touched
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def peak_rss() -> int:
    """The process's peak resident set (VmHWM; ru_maxrss where /proc is missing). ru_maxrss itself
    carries the parent's peak across fork + exec on Linux, VmHWM is the process's own."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(path: str, threads: int, n1: int, n2: int, n_pre: int) -> dict:
    """One jisu process on one file: load, warm up, time decode and prefill once."""
    import importlib
    import warnings

    import psutil
    import torch

    import jisu
    from jisu.kernels.packed import PackedInt, PackedWeight
    from jisu.kernels.packed_ggml import PackedGGML

    for mod in ("tokenizers", "jinja2.sandbox", "safetensors.torch", "jisu.io.gguf", "jisu.io.tokenizer",
                "jisu.io.gguf_packed", "jisu.kernels.ops", "jisu.engine.native_runner", "jisu.models.llama",
                "jisu.engine.engine"):
        importlib.import_module(mod)
    base = peak_rss()
    base_now = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = jisu.load(path, threads=threads)
    load_s = time.perf_counter() - t0
    w, cfg = llm.runner.model.w, llm.config
    emb = w["model.embed_tokens.weight"]
    kinds: dict[str, list[int]] = {}
    seen, bpt = set(), 0
    for name, t in w.items():
        if name == "model.embed_tokens.weight" or id(t) in seen:
            continue
        if not (isinstance(t, PackedWeight) or (isinstance(t, torch.Tensor) and t.dim() == 2)):
            continue
        seen.add(id(t))
        nb = t.nbytes if isinstance(t, PackedWeight) else t.numel() * t.element_size()
        kind = (f"PackedGGML {t.qtype.name}" if isinstance(t, PackedGGML) else "PackedInt" if isinstance(t, PackedInt)
                else type(t).__name__ if isinstance(t, PackedWeight) else f"tensor {str(t.dtype)[6:]}")
        e = kinds.setdefault(kind, [0, 0])
        e[0] += 1
        e[1] += nb
        bpt += nb
    emb_bytes = emb.nbytes if isinstance(emb, PackedWeight) else emb.numel() * emb.element_size()
    bpt += emb_bytes // cfg.vocab_size
    ids = llm.tokenizer.encode_chat(CHAT)
    long_ids = (llm.tokenizer.encode(TEXT) * 4)[:n_pre]

    def timed(prompt, n):
        t = time.perf_counter()
        llm.generate(prompt, temperature=0, max_tokens=n, ignore_eos=True)
        return time.perf_counter() - t

    def measure():
        if not n2:  # --prefill-only
            timed(long_ids, 1)  # warm-up
            return None, None, timed(long_ids, 1)
        timed(ids, n1), timed(long_ids, 1)  # warm-up
        return timed(ids, n1), timed(ids, n2), timed(long_ids, 1)

    t1, t2, tp = measure()  # the default (faithful) mode
    llm.faithful, llm._engine = False, None  # --fast: plain int8 activations
    f1, f2, fp = measure()
    kv_item = llm.runner.kv_dtype.itemsize
    ctx = max(len(ids) + n2, n_pre + 1)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_item * ctx
    peak = peak_rss()
    dec = {"decode_tok_s": (n2 - n1) / (t2 - t1), "fast_decode_tok_s": (n2 - n1) / (f2 - f1)} if n2 else {}
    return {**dec, "prefill_tok_s": n_pre / tp, "load_s": load_s, "fast_prefill_tok_s": n_pre / fp,
            "runtime_rss": base, "runtime_rss_now": base_now, "peak_rss": peak, "kv_bytes": kv,
            "jisu_bytes_per_token": bpt, "weight_kinds": kinds, "native_runner": type(llm.runner).__name__,
            "warnings": [str(c.message)[:300] for c in caught if issubclass(c.category, RuntimeWarning)]}


def run_jisu(path: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--threads", str(args.threads)] + (["--quick"] if args.quick else []) + (
        ["--prefill-only"] if args.prefill_only else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("JSON:")), None)
    if res.returncode or line is None:
        return {"error": ((res.stderr or res.stdout)[-1500:] + f"\nexit {res.returncode}").strip()}
    return json.loads(line[5:])


def run_llama(path: str, args) -> dict:
    p, n = (64, 32) if args.quick else (256, 128)
    n = 0 if args.prefill_only else n
    cmd = [args.llama_bench, "-m", path, "-t", str(args.threads), "-p", str(p), "-n", str(n), "-r", "1", "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        why = f"killed by signal {-res.returncode}" if res.returncode < 0 else f"exit {res.returncode}"
        if res.returncode in (-4, 132):
            why += " (illegal instruction: llama.cpp was built with GGML_NATIVE for another CPU; rebuild it here)"
        return {"error": (res.stderr[-1500:] + "\n" + why).strip()}
    out = {}
    for row in json.loads(res.stdout):
        out["prefill_tok_s" if row["n_prompt"] and not row["n_gen"] else "decode_tok_s"] = float(row["avg_ts"])
    return out


def med(runs: list[dict], key: str):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def bench_file(path: str, args, bw: float) -> dict:
    info = gguf_info(path)
    res = {"model": path, "file_bytes": os.path.getsize(path), **info, "jisu_runs": [], "llama_runs": []}
    avail = __import__("psutil").virtual_memory().available
    skip_jisu = info["fp32_fallback_bytes"] + info["tensor_bytes"] > 0.8 * avail
    if skip_jisu:
        res["jisu_skipped"] = (f"its fp32 fallback needs {info['fp32_fallback_bytes'] / 1e9:.1f} GB, "
                               f"{avail / 1e9:.1f} GB available")
    for i in range(args.reps):  # jisu, llama, llama, jisu, ...
        order = ("jisu", "llama") if i % 2 == 0 else ("llama", "jisu")
        for who in order:
            if who == "jisu" and not skip_jisu:
                r = run_jisu(path, args)
                res["jisu_runs"].append(r)
                print(f"    jisu  {_short(r)}", flush=True)
            elif who == "llama" and args.llama_bench:
                r = run_llama(path, args)
                res["llama_runs"].append(r)
                print(f"    llama {_short(r)}", flush=True)
    jr = [r for r in res["jisu_runs"] if "error" not in r]
    for eng, runs in (("jisu", jr), ("llama", res["llama_runs"])):
        for k in ("decode_tok_s", "prefill_tok_s"):
            res[f"{eng}_{k}"] = med(runs, k)
    for k in ("decode_tok_s", "prefill_tok_s"):
        res[f"jisu_fast_{k}"] = med(jr, f"fast_{k}")
    if jr:
        last = jr[-1]
        res.update({k: last[k] for k in ("weight_kinds", "native_runner", "warnings", "jisu_bytes_per_token", "kv_bytes")})
        res["jisu_peak_rss"] = max(r["peak_rss"] for r in jr)
        res["runtime_rss"] = statistics.median(r["runtime_rss"] for r in jr)
        res["jisu_model_rss"] = res["jisu_peak_rss"] - res["runtime_rss"]
        res["rss_over_file_kv"] = res["jisu_model_rss"] / (res["file_bytes"] + res["kv_bytes"])
        # the bound as users count it: peak RSS against weights + KV cache + the loaded runtime
        res["peak_over_file_kv_runtime"] = res["jisu_peak_rss"] / (res["file_bytes"] + res["kv_bytes"] + res["runtime_rss"])
        if res["jisu_decode_tok_s"]:
            res["jisu_decode_gb_s"] = res["jisu_bytes_per_token"] * res["jisu_decode_tok_s"] / 1e9
            res["jisu_bw_share"] = res["jisu_decode_gb_s"] / bw
    elif res["jisu_runs"]:
        res["jisu_error"] = res["jisu_runs"][-1]["error"]
    if res.get("llama_decode_tok_s"):
        res["llama_decode_gb_s"] = info["file_bytes_per_token"] * res["llama_decode_tok_s"] / 1e9
        res["llama_bw_share"] = res["llama_decode_gb_s"] / bw
    for k in ("decode_tok_s", "prefill_tok_s"):
        if res.get(f"jisu_{k}") and res.get(f"llama_{k}"):
            res[f"{k.split('_')[0]}_ratio"] = res[f"jisu_{k}"] / res[f"llama_{k}"]
        if res.get(f"jisu_fast_{k}") and res.get(f"llama_{k}"):
            res[f"fast_{k.split('_')[0]}_ratio"] = res[f"jisu_fast_{k}"] / res[f"llama_{k}"]
    return res


def _short(r: dict) -> str:
    if "error" in r:
        return "FAILED: " + r["error"].strip().splitlines()[-1][:200]
    return f"decode {r.get('decode_tok_s', 0):.1f} tok/s, prefill {r.get('prefill_tok_s', 0):.1f} tok/s"


def _f(x, fmt="{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def path_of(r: dict) -> str:
    """The weight kinds jisu's linears ran on, by bytes: PackedGGML <type>, PackedInt, tensor float32."""
    kinds = r.get("weight_kinds") or {}
    tot = sum(b for _, b in kinds.values()) or 1
    return ", ".join(f"{k} {100 * b / tot:.0f}%" for k, (_, b) in sorted(kinds.items(), key=lambda kv: -kv[1][1]))


def report(results: list[dict], bw: float) -> None:
    head = ("| file | MB | jisu tg | llama tg128 | ratio | jisu pp | llama pp256 | ratio | --fast tg / pp ratios "
            "| jisu GB/s (% bw) "
            "| llama GB/s (% bw) | jisu RSS MB / (file+KV) | peak / (file+KV+runtime) | jisu weights |")
    print("\n" + head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for r in results:
        share = lambda e: None if r.get(f"{e}_decode_gb_s") is None else \
            f"{r[f'{e}_decode_gb_s']:.1f} ({100 * r[f'{e}_bw_share']:.0f}%)"  # noqa: E731
        rss = (f"{r['jisu_model_rss'] / 1e6:.0f} / {(r['file_bytes'] + r['kv_bytes']) / 1e6:.0f} = "
               f"{r['rss_over_file_kv']:.2f}x") if "jisu_model_rss" in r else r.get("jisu_skipped", r.get("jisu_error", "–"))[:80]
        print(f"| {Path(r['model']).name} | {r['file_bytes'] / 1e6:.0f} | {_f(r.get('jisu_decode_tok_s'))} | "
              f"{_f(r.get('llama_decode_tok_s'))} | {_f(r.get('decode_ratio'), '{:.2f}')} | "
              f"{_f(r.get('jisu_prefill_tok_s'))} | {_f(r.get('llama_prefill_tok_s'))} | "
              f"{_f(r.get('prefill_ratio'), '{:.2f}')} | {_f(r.get('fast_decode_ratio'), '{:.2f}')} / "
              f"{_f(r.get('fast_prefill_ratio'), '{:.2f}')} | {share('jisu') or '–'} | {share('llama') or '–'} | {rss} | "
              f"{_f(r.get('peak_over_file_kv_runtime'), '{:.2f}x')} | {path_of(r) or '–'} |")
    print(f"\nbandwidth: {bw:.1f} GB/s (torch.sum over 1 GiB fp32, best of 5)")


def plot(results: list[dict], png: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    rows = [r for r in results if r.get("decode_ratio") or r.get("prefill_ratio")]
    if not rows:
        return
    names = [Path(r["model"]).name.replace(".gguf", "") for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    ax.bar([i - 0.2 for i in x], [r.get("decode_ratio") or 0 for r in rows], 0.4, label="decode (tg)")
    ax.bar([i + 0.2 for i in x], [r.get("prefill_ratio") or 0 for r in rows], 0.4, label="prefill (pp)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("jisu / llama.cpp tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="GGUF files (default: --set)")
    ap.add_argument("--set", default=None, choices=("default", "quants", "real", "qwen", "all"),
                    help="a named set of make_models.py's files (default: default)")
    ap.add_argument("--models", default=DEFAULT_OUT, help="make_models.py's folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llama-bench", default=os.path.join(DEFAULT_LLAMA_CPP, "build", "bin", "llama-bench"),
                    help="a llama-bench built for this CPU (benchmarks/README: a GGML_NATIVE build crashed on a Xeon with AMX)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 rep, short runs (decode 4 -> 32, "
                                                         "prefill 64, llama-bench -p 64 -n 32)")
    ap.add_argument("--prefill-only", action="store_true", help="only the prefill (no decode, llama-bench -n 0): "
                                                                "the short run for a loaded machine")
    ap.add_argument("--out", default=str(HERE / "results" / "gguf.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n1, n2, n_pre = (4, 32, 64) if args.quick else (16, 144, 256)
    n1, n2 = (0, 0) if args.prefill_only else (n1, n2)
    if args.worker:
        print("JSON:" + json.dumps(worker(args.worker, args.threads, n1, n2, n_pre)))
        return 0
    if args.quick:
        args.reps = 1
    if not os.path.isfile(args.llama_bench):
        print(f"no llama-bench at {args.llama_bench}: jisu only", file=sys.stderr)
        args.llama_bench = None
    files = args.files or model_set(args.set or "default", args.models)
    from jisu.eval.bench import machine_info

    load0 = os.getloadavg()[0]
    bw = bandwidth_gbs(args.threads)
    print(f"{machine_info()['cpu']}, {args.threads} threads, {args.reps} reps; bandwidth {bw:.1f} GB/s; "
          f"load average {load0:.1f}" + ("  (busy machine: timings unreliable)" if load0 > os.cpu_count() else ""))
    results = []
    for f in files:
        print(f"{Path(f).name}:", flush=True)
        results.append(bench_file(f, args, bw))
    load1 = os.getloadavg()[0]
    report(results, bw)
    print(f"load average {load0:.1f} -> {load1:.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {"threads": args.threads, "reps": args.reps, "quick": args.quick, "bandwidth_gb_s": bw,
            "bandwidth_method": "best of 5 torch.sum over a 1 GiB float32 tensor, torch threads = --threads",
            "decode_tokens": [n1, n2], "prefill_tokens": n_pre, "load_avg": [load0, load1],
            "machine": machine_info(), "results": results}
    with open(args.out, "w") as fh:
        json.dump(meta, fh, indent=1, default=str)
    print(f"wrote {args.out}")
    plot(results, os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
