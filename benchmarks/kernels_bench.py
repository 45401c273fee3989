"""Benchmarks jisu's native CPU kernels on the default model's shapes (SmolLM2-135M):
GEMV (decode, M=1) per weight format with achieved GB/s against the machine's streaming
limit, GEMM at M=256 (prefill) in GMAC/s, the fp32 paths against torch, and the Python
per-call overhead of ops.linear. Prints tables; `--json PATH` also writes the numbers.

    python benchmarks/kernels_bench.py [--threads 2] [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from jisu.kernels import ops
from jisu.kernels.formats import CodebookWeight, Int2Weight, Int3Weight, Int4Weight, Int8Weight
from jisu.kernels.packed import pack

GEMV_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (N, K)
GEMM_SHAPES = [(576, 576), (1536, 576), (576, 1536)]
FORMATS = {
    "q4_0": lambda w: Int4Weight.quantize_rtn(w, 32),
    "q4_1": lambda w: Int4Weight.quantize_rtn(w, 32, sym=False),
    "q8_0": lambda w: Int8Weight.quantize_rtn(w, 32),
    "int8-pc": lambda w: Int8Weight.quantize_rtn(w, None),
    "int3-g64": lambda w: Int3Weight.quantize_rtn(w, 64),
    "int2-g64": lambda w: Int2Weight.quantize_rtn(w, 64),
    "nf4-g64": lambda w: CodebookWeight.quantize_rtn(w, 64, "nf4"),
}
STREAM_GBS = 25.0  # ~what 2 threads can stream from DRAM on the reference machine


def timeit(fn, min_time=0.15, reps=5):
    """Best per-call wall time (seconds) over `reps` batches of >= min_time each."""
    fn()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.02:
        fn()
        n += 1
    per = max((time.perf_counter() - t0) / n, 1e-7)
    iters = max(1, int(min_time / per / reps * 5))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t) / iters)
    return best


def bench_gemv(formats, shapes, quick):
    rows = []
    for N, K in shapes:
        w = torch.randn(N, K) * 0.02
        x = torch.randn(1, K)
        t_torch = timeit(lambda: F.linear(x, w), 0.05 if quick else 0.15)
        t_nat = timeit(lambda: ops.linear(x, w), 0.05 if quick else 0.15)
        row = {"shape": f"{N}x{K}", "torch_fp32_us": t_torch * 1e6, "jisu_fp32_us": t_nat * 1e6,
               "fp32_gbs": N * K * 4 / t_nat / 1e9}
        for name in formats:
            p = pack(FORMATS[name](w))
            t = timeit(lambda: p(x), 0.05 if quick else 0.15)
            row[name] = {"us": t * 1e6, "gbs": p.nbytes / t / 1e9, "bytes": p.nbytes}
        rows.append(row)
        print_gemv_row(row, formats)
    return rows


def print_gemv_header(formats):
    head = f"{'N x K':>10} | {'torch f32':>9} | {'jisu f32':>15} |"
    for name in formats:
        head += f" {name:>19} |"
    print(head)
    print("-" * len(head))


def print_gemv_row(row, formats):
    line = (f"{row['shape']:>10} | {row['torch_fp32_us']:7.1f}us | {row['jisu_fp32_us']:7.1f}us "
            f"{row['fp32_gbs']:4.1f}GB/s |")
    for name in formats:
        r = row[name]
        line += f" {r['us']:7.1f}us {r['gbs']:4.1f}GB/s {100 * r['gbs'] / STREAM_GBS:3.0f}% |"
    print(line, flush=True)


def bench_gemm(formats, shapes, M, quick):
    rows = []
    head = f"{'N x K':>10} | {'torch f32':>16} | {'jisu f32':>16} |" + "".join(f" {n:>16} |" for n in formats)
    print(head)
    print("-" * len(head))
    for N, K in shapes:
        w = torch.randn(N, K) * 0.02
        x = torch.randn(M, K)
        macs = M * N * K
        t_torch = timeit(lambda: F.linear(x, w), 0.1 if quick else 0.3, 3)
        wp = pack(w)
        t_nat = timeit(lambda: wp(x), 0.1 if quick else 0.3, 3)
        row = {"shape": f"{N}x{K}", "M": M, "torch_fp32_us": t_torch * 1e6, "jisu_fp32_us": t_nat * 1e6}
        line = (f"{row['shape']:>10} | {t_torch * 1e3:6.2f}ms {macs / t_torch / 1e9:4.0f}GMAC/s | "
                f"{t_nat * 1e3:6.2f}ms {macs / t_nat / 1e9:4.0f}GMAC/s |")
        for name in formats:
            p = pack(FORMATS[name](w))
            t = timeit(lambda: p(x), 0.1 if quick else 0.3, 3)
            row[name] = {"us": t * 1e6, "gmacs": macs / t / 1e9}
            line += f" {t * 1e3:6.2f}ms {macs / t / 1e9:4.0f}GMAC/s |"
        print(line, flush=True)
        rows.append(row)
    return rows


def bench_overhead():
    """Per-call cost of ops.linear on a tiny weight (Python + binding + allocation)."""
    p = pack(Int4Weight.quantize_rtn(torch.randn(8, 32), 32))
    x = torch.randn(1, 1, 32)
    t_ops = timeit(lambda: ops.linear(x, p), 0.2)
    t_empty = timeit(lambda: x.new(1, 1, 8), 0.2)
    t_torch = timeit(lambda: F.linear(x, torch.zeros(8, 32)), 0.2)
    print(f"ops.linear per-call total on an 8x32 weight: {t_ops * 1e6:.2f} us "
          f"(of which output allocation ~{t_empty * 1e6:.2f} us); torch F.linear same shape: {t_torch * 1e6:.2f} us")
    return {"ops_linear_tiny_us": t_ops * 1e6, "alloc_us": t_empty * 1e6, "torch_tiny_us": t_torch * 1e6}


def bench_fused(quick):
    res = {}
    x = torch.randn(1, 576)
    w = torch.randn(576)
    res["rms_norm_us"] = timeit(lambda: ops.rms_norm(x, w, 1e-5)) * 1e6
    res["rms_norm_torch_us"] = timeit(lambda: ops.rms_norm_ref(x, w, 1e-5)) * 1e6
    q = torch.randn(1, 9, 64)
    c, s = torch.randn(1, 32), torch.randn(1, 32)
    res["rope_us"] = timeit(lambda: ops.rope(q, c, s)) * 1e6
    res["rope_torch_us"] = timeit(lambda: ops.rope_ref(q, c, s)) * 1e6
    for T in (256, 1024):
        q = torch.randn(9, 64)
        k = torch.randn(3, T, 64)
        v = torch.randn(3, T, 64)
        res[f"attn_T{T}_us"] = timeit(lambda: ops.attention_decode(q, k, v, T)) * 1e6
        res[f"attn_T{T}_torch_us"] = timeit(lambda: ops.attention_decode_ref(q, k, v, T)) * 1e6
    print("fused ops (us): " + ", ".join(f"{k}={v:.1f}" for k, v in res.items()))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (0: all CPUs)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--quick", action="store_true", help="shorter timings, fewer shapes")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not ops.native_available():
        raise SystemExit("jisu._kernels is not built: pip install -e .")
    ops.set_num_threads(args.threads)
    torch.set_num_threads(max(1, ops.get_num_threads()))
    formats = args.formats.split(",")
    print(f"jisu kernels: isa={ops.get_isa()} threads={ops.get_num_threads()} torch threads="
          f"{torch.get_num_threads()} loadavg={os.getloadavg()[0]:.1f} "
          f"(timings are wall-clock; a loaded machine inflates them)")
    out = {"isa": ops.get_isa(), "threads": ops.get_num_threads(), "loadavg": os.getloadavg()[0]}
    print("\nGEMV, M=1 (decode). GB/s = weight bytes / time; % of ~25 GB/s streaming limit")
    print_gemv_header(formats)
    out["gemv"] = bench_gemv(formats, GEMV_SHAPES[:3] + GEMV_SHAPES[4:] if args.quick else GEMV_SHAPES, args.quick)
    print("\nGEMM, M=256 (prefill)")
    out["gemm"] = bench_gemm(formats, GEMM_SHAPES[:1] if args.quick else GEMM_SHAPES, 256, args.quick)
    print()
    out["overhead"] = bench_overhead()
    out["fused"] = bench_fused(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
