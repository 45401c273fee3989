"""jisu's GGUF exports against llama.cpp's own quantizations of the same model, measured through
llama.cpp (llama-cpp-python) at equal file size: KLD against the fp32 model on held-out text of
another kind than the calibration text (default: the GPL-3 licence text; calibration: the built-in
pydoc corpus's first half).

    LLAMA_CPP_LIB_PATH=~/.cache/jisu/llama.cpp-build-native/bin PYTHONPATH=.:/work/peers/llama_cpp_python-0.3.36 \\
        .venv/bin/python benchmarks/bench_export.py [--samples 64] [--chunks 8] [--ctx 256]

Rows: llama.cpp Q4_0 / Q4_K_M (llama_model_quantize from the F16 file, no importance matrix),
llama.cpp Q4_K_M with an importance matrix from the same calibration text (when llama-imatrix is
built), jisu RTN and GPTQ-onto-the-grid exports of Q4_0 and Q4_K_M. Targets: jisu GPTQ Q4_0 KLD
<= 0.5x llama.cpp Q4_0; jisu GPTQ Q4_K_M <= 0.7x llama.cpp Q4_K_M and <= 0.85x with imatrix.
Writes benchmarks/results/export.json and export.png.

With --onnx METHOD:TYPE,...: ONNX exports instead, each checked in onnxruntime (KLD against jisu on
the same weights, target <= 0.01, and against the fp32 source; sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

BIN = os.path.expanduser("~/.cache/jisu/llama.cpp-build-native/bin")
SRC = os.path.expanduser("~/.cache/jisu/bench-models/SmolLM2-135M-Instruct.F16.gguf")
TARGETS = {"Q4_0": ("llama.cpp Q4_0", 0.5), "Q4_K_M": ("llama.cpp Q4_K_M", 0.7),
           "Q4_K_M+imatrix": ("llama.cpp Q4_K_M imatrix", 0.85)}


def llama_quantize(src: str, dst: str, ftype: str, imatrix: str | None = None) -> None:
    if os.path.exists(dst):
        return
    cmd = [os.path.join(BIN, "llama-quantize")] + (["--imatrix", imatrix] if imatrix else []) + [src, dst + ".tmp", ftype]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.replace(dst + ".tmp", dst)


def build_imatrix(src: str, calib_path: str, out: str, chunks: int, ctx: int) -> str | None:
    """llama-imatrix over the first `chunks` x `ctx` tokens of the calibration text (chunks 0: all of it)."""
    exe = os.path.join(BIN, "llama-imatrix")
    if not os.path.exists(exe):
        return None
    if not os.path.exists(out):
        cmd = [exe, "-m", src, "-f", calib_path, "-o", out + ".tmp.gguf", "-c", str(ctx)]
        subprocess.run(cmd + (["--chunks", str(chunks)] if chunks else []), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.replace(out + ".tmp.gguf", out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=SRC)
    p.add_argument("--heldout", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--workdir", default=os.path.expanduser("~/.cache/jisu/bench_export"))
    p.add_argument("--exports", default="rtn:Q4_0,gptq:Q4_0,gptq:Q4_K_M,rtn:Q4_K_M",
                   help="jisu exports to make, METHOD:TYPE (in this order)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    p.add_argument("--llama-types", default="Q4_0,Q4_K_M", help="llama.cpp's own quantizations to compare")
    p.add_argument("--no-imatrix", action="store_true", help="skip llama.cpp's Q4_K_M with an importance matrix")
    p.add_argument("--imatrix-chunks", type=int, default=0,
                   help="llama-imatrix chunks of --seq-len tokens (default 0: all of the calibration text, a superset "
                        "of the --samples windows jisu's GPTQ sees)")
    p.add_argument("--onnx", default=None, help="instead: ONNX exports METHOD:TYPE (e.g. rtn:fp32,rtn:int4,gptq:int4) "
                                                "checked in onnxruntime against jisu and the source")
    p.add_argument("--json", default="benchmarks/results/export.json")
    a = p.parse_args()
    if a.onnx:
        return onnx_main(a)
    from jisu.export import ExportOptions, export_gguf
    from jisu.export.check import LlamaCpp, _score, import_llama_cpp
    from jisu.io.text import chunk_ids, encode_prefix, read_calibration, read_text
    from jisu.io.artifact import gguf_tokenizer_meta
    from jisu.io.tokenizer import gguf_tokenizer

    llama_cpp = import_llama_cpp()
    if llama_cpp is None:
        print("llama-cpp-python is not installed")
        return 1
    os.makedirs(a.workdir, exist_ok=True)
    w = lambda name: os.path.join(a.workdir, name)  # noqa: E731
    t0 = time.perf_counter()
    files = {}
    llama_quantize(a.source, w("F32.gguf"), "F32")
    for t in a.llama_types.split(","):
        llama_quantize(a.source, w(f"llama.{t}.gguf"), t)
        files[f"llama.cpp {t}"] = w(f"llama.{t}.gguf")
    calib = read_calibration(None)
    calib_path = w("calibration.txt")
    with open(calib_path, "w", encoding="utf-8") as f:
        f.write(calib.text)
    seconds = {}
    for item in a.exports.split(","):
        method, t = item.strip().split(":")
        out = w(f"jisu.{method}.{t}.gguf")
        if not os.path.exists(out):
            s = time.perf_counter()
            export_gguf(a.source, out, ExportOptions(qtype=t, recipe=method, samples=a.samples, seq_len=a.seq_len,
                                                     check=False, chunks=1, ctx=64, progress=sys.stderr.isatty()))
            seconds[f"jisu {method} {t}"] = time.perf_counter() - s
        files[f"jisu {method} {t}"] = out
    tag = f"c{a.imatrix_chunks}"
    imatrix = None if a.no_imatrix else build_imatrix(a.source, calib_path, w(f"imatrix.{tag}.gguf"),
                                                      a.imatrix_chunks, a.seq_len)
    if imatrix:
        llama_quantize(a.source, w(f"llama.Q4_K_M.imatrix.{tag}.gguf"), "Q4_K_M", imatrix)
        files["llama.cpp Q4_K_M imatrix"] = w(f"llama.Q4_K_M.imatrix.{tag}.gguf")
    tok = gguf_tokenizer(gguf_tokenizer_meta(a.source), a.source)
    held = read_text(a.heldout, "held-out")
    chunks, note = chunk_ids(encode_prefix(tok.encode, held.text, a.chunks * a.ctx), a.chunks, a.ctx, held.name)
    ref = LlamaCpp(llama_cpp, w("F32.gguf"), a.ctx, a.threads)
    ref_lp = [ref.log_probs(c) for c in chunks]
    ref.close()
    rows = {}
    for name, path in files.items():
        r = LlamaCpp(llama_cpp, path, a.ctx, a.threads)
        lps = [r.log_probs(c) for c in chunks]
        r.close()
        rows[name] = {"path": path, "file_bytes": os.path.getsize(path), "load_warnings": len(r.warnings),
                      **_score(ref_lp, lps)}
        print(f"{name:28s} {rows[name]['file_bytes'] / 1e6:7.2f} MB  KLD {rows[name]['kld']['mean']:.5f}  "
              f"top-1 {100 * rows[name]['top1_agreement']:.2f} %", flush=True)
    checks = {}
    for t, (base, target) in TARGETS.items():
        mine = rows.get(f"jisu gptq {t.split('+')[0]}")
        theirs = rows.get(base)
        if mine is None or theirs is None:
            checks[t] = {"skipped": f"{base} or jisu gptq {t.split('+')[0]} not measured in this run"}
            continue
        ratio = mine["kld"]["mean"] / theirs["kld"]["mean"]
        size = mine["file_bytes"] / theirs["file_bytes"]
        checks[t] = {"against": base, "kld_ratio": ratio, "target": target, "met": ratio <= target,
                     "size_ratio": size, "equal_size": abs(size - 1) <= 0.01}
        print(f"jisu gptq {t.split('+')[0]} vs {base}: KLD x{ratio:.3f} (target <= {target}) at size x{size:.4f}")
    result = {"source": a.source, "heldout": held.name, "calibration": calib.name, "samples": a.samples,
              "seq_len": a.seq_len, "imatrix_chunks": a.imatrix_chunks or "all of the calibration text",
              "chunks": len(chunks), "ctx": a.ctx, "llama_cpp_version": llama_cpp.__version__,
              "note": note, "rows": rows, "checks": checks, "export_seconds": seconds,
              "total_seconds": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    _plot(rows, os.path.splitext(a.json)[0] + ".png")
    return 0


def onnx_main(a) -> int:
    """ONNX exports of the source, each checked by onnxruntime on the held-out text: KLD against
    jisu on the same weights (target <= 0.01) and against the fp32 source, and file sizes."""
    from jisu.export import OnnxOptions, export_onnx

    os.makedirs(a.workdir, exist_ok=True)
    rows = {}
    for item in a.onnx.split(","):
        method, t = item.strip().split(":")
        out = os.path.join(a.workdir, f"onnx.{method}.{t}")
        s = time.perf_counter()
        card = export_onnx(a.source, out, OnnxOptions(qtype=t, recipe=method, samples=a.samples, seq_len=a.seq_len,
                                                      eval_text=a.heldout, chunks=a.chunks, ctx=a.ctx, force=True,
                                                      threads=a.threads, progress=sys.stderr.isatty())).card
        rt = card["onnxruntime"]
        rows[f"onnx {method} {t}"] = {"file_bytes": card["file_bytes"], "seconds": time.perf_counter() - s,
                                      "vs_jisu": rt["vs_jisu_export_weights"], "vs_source": rt["vs_source"],
                                      "kv_cache_max_abs_diff": rt["kv_cache_max_abs_diff"],
                                      "target_vs_jisu": 0.01, "met": rt["vs_jisu_export_weights"]["kld"]["mean"] <= 0.01}
        r = rows[f"onnx {method} {t}"]
        print(f"onnx {method} {t}: {r['file_bytes'] / 1e6:.1f} MB  KLD vs jisu {r['vs_jisu']['kld']['mean']:.2e}  "
              f"vs source {r['vs_source']['kld']['mean']:.5f}  top-1 vs source {r['vs_source']['top1_agreement']:.3f}",
              flush=True)
        shutil.rmtree(out)
    import onnxruntime

    result = {"source": a.source, "heldout": a.heldout, "chunks": a.chunks, "ctx": a.ctx, "samples": a.samples,
              "onnxruntime_version": onnxruntime.__version__, "rows": rows}
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


def _plot(rows: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        ax.scatter(r["file_bytes"] / 1e6, r["kld"]["mean"], marker="o" if name.startswith("jisu") else "s",
                   color="tab:blue" if name.startswith("jisu") else "tab:red")
        ax.annotate(name, (r["file_bytes"] / 1e6, r["kld"]["mean"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("KLD vs fp32 through llama.cpp (nats/token)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: jisu GGUF exports vs llama.cpp quantizations")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
