"""KL divergence of llama.cpp quantization formats from the fp32 weights, measured on the same tokens
by jisu (`jisu eval` running the quantized GGUF) and from llama.cpp's own logits (through
llama-cpp-python); both use jisu.eval.quality's math. Target: the two agree within 10 %.
jisu is measured twice: as jisu.load runs the file (packed kernels where available) and on the
fp32 path (weights dequantized, plain PyTorch: the weight error alone).

    .venv/bin/python benchmarks/kld_vs_llamacpp.py [--types Q8_0,Q4_0] [--chunks 8] [--ctx 256] [--json FILE]

The "source" row runs the shipped file itself: its weights equal the reference's, so its KLD is
what each engine's quantized-weight kernels add (e.g. 8-bit activations in the dot products).
The fp32 reference is the default model (SmolLM2-135M-Instruct Q4_1) dequantized: jisu dequantizes it
on load; llama.cpp runs an F32 GGUF that llama_model_quantize writes from the same file. The formats
under test are requantized from that F32 GGUF with llama_model_quantize.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
import time

INSTALL = ('llama-cpp-python is not installed. Install it into the venv (builds llama.cpp, ~10 min on 2 cores):\n'
           '    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install llama-cpp-python\n'
           'then run this script again.')
TARGET = 0.10


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp's quantizer logs every tensor to fd 2; keep it out of the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quantize(llama_cpp, src: str, dst: str, ftype: str, threads: int) -> None:
    """llama.cpp's own quantizer (the code behind llama-quantize); ftype "F32" dequantizes."""
    if os.path.exists(dst):
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if ftype == "F32" else f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = threads
    tmp = dst + ".tmp"
    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {ftype}) failed with status {rc}")
    os.replace(tmp, dst)


def tensor_types(path: str) -> str:
    from collections import Counter

    from jisu.io.gguf import GGUFFile

    counts = Counter(t.qtype.name for t in GGUFFile(path).tensors.values())
    return ", ".join(f"{n} {name}" for name, n in counts.most_common())


class LlamaCppScorer:
    """Log-probs at every position of a chunk, from a llama.cpp context that keeps all logits."""

    def __init__(self, llama_cpp, path: str, ctx: int, threads: int):
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)

    def log_probs(self, chunk: list[int]):
        import torch

        from jisu.eval.quality import log_probs

        self.llm.reset()  # a fresh KV cache per chunk, as jisu eval does
        self.llm.eval(chunk)
        return log_probs(torch.from_numpy(self.llm.scores[:len(chunk) - 1].copy()))


def summary(kls: list, matches: int, nll: float, ref_nll: float, count: int) -> dict:
    import torch

    from jisu.eval.quality import perplexity_from_nll, summarize

    ppl, ref_ppl = perplexity_from_nll(nll, count), perplexity_from_nll(ref_nll, count)
    return {"kld": summarize(torch.cat(kls)), "top1_agreement": matches / count, "perplexity": ppl,
            "reference_perplexity": ref_ppl, "delta_perplexity": ppl - ref_ppl}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default="Q8_0,Q4_0", help="llama.cpp ftypes to test (LLAMA_FTYPE_MOSTLY_<T>)")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--workdir", default=None, help="where the GGUFs are written (default: ~/.cache/jisu/kld_vs_llamacpp)")
    p.add_argument("--json", default=None, help="write the results as JSON")
    a = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print(INSTALL)
        return 0

    import torch

    from jisu.eval import quality
    from jisu.io.text import builtin_text
    from jisu.eval.refcache import default_cache_dir
    from jisu.eval.runner import evaluate, reference_logprobs
    from jisu.io.sources import resolve

    torch.set_num_threads(a.threads)
    src = resolve(None).path
    work = a.workdir or os.path.join(default_cache_dir(), "kld_vs_llamacpp")
    os.makedirs(work, exist_ok=True)
    stem = os.path.splitext(os.path.basename(src))[0]
    f32 = os.path.join(work, f"{stem}.F32.gguf")
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    t0 = time.perf_counter()
    quantize(llama_cpp, src, f32, "F32", a.threads)
    paths = {}
    for t in types:
        paths[t] = os.path.join(work, f"{stem}.{t}.gguf")
        quantize(llama_cpp, f32, paths[t], t, a.threads)
    # the shipped file itself: its weights are the reference's, so any KLD is the engine's numerics
    types.append("source")
    paths["source"] = src
    print(f"llama.cpp {llama_cpp.__version__}; source {src}; GGUFs in {work} ({time.perf_counter() - t0:.0f} s)")
    for t in ["F32"] + types:
        path = f32 if t == "F32" else paths[t]
        print(f"  {t}: {os.path.getsize(path) / 1e6:.1f} MB — tensors: {tensor_types(path)}")

    text = builtin_text()
    results = {"source": src, "llama_cpp_version": llama_cpp.__version__, "text": text.name,
               "chunks": a.chunks, "ctx": a.ctx, "threads": a.threads, "formats": {}}
    # jisu: each format against the dequantized source (reference log-probs computed once, then cached)
    jisu_results = {t: evaluate(paths[t], src, text=text, chunks=a.chunks, ctx=a.ctx, threads=a.threads,
                                progress=sys.stderr.isatty()) for t in types}
    jisu_fp32 = {t: evaluate(paths[t], src, text=text, chunks=a.chunks, ctx=a.ctx, threads=a.threads,
                             progress=sys.stderr.isatty(), fp32=True) for t in types}

    # llama.cpp: the same tokens through its F32 reference and each format
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_logprobs(src, text, a.chunks, a.ctx, workdir=tmp, threads=a.threads)
        tokens = ref.store.tokens
        ref_scorer = LlamaCppScorer(llama_cpp, f32, a.ctx, a.threads)
        scorers = {t: LlamaCppScorer(llama_cpp, paths[t], a.ctx, a.threads) for t in types}
        acc = {t: ([], 0, 0.0, 0.0) for t in types + ["engines"]}
        count = 0
        for i, chunk in enumerate(tokens):
            targets = torch.tensor(chunk[1:])
            ref_lp = ref_scorer.log_probs(chunk)
            ref_nll = quality.token_nll(ref_lp, targets).sum().item()
            count += len(targets)
            pairs = [(t, ref_lp, scorers[t].log_probs(chunk), ref_nll) for t in types]
            # the two engines on the same fp32 weights: jisu's reference vs llama.cpp's F32 run
            jisu_ref = ref.store.chunk(i)
            pairs.append(("engines", jisu_ref, ref_lp, quality.token_nll(jisu_ref, targets).sum().item()))
            for t, base, lp, base_nll in pairs:
                kls, matches, nll, bnll = acc[t]
                kls.append(quality.kl_divergence(base, lp))
                acc[t] = (kls, matches + int(quality.top1_matches(base, lp).sum()),
                          nll + quality.token_nll(lp, targets).sum().item(), bnll + base_nll)
        ref.store.close()
    llama = {t: summary(kls, m, nll, bnll, count) for t, (kls, m, nll, bnll) in acc.items()}

    rows = ["| format | size MB | jisu format | jisu KLD mean | jisu fp32-path KLD | llama.cpp KLD mean | "
            "rel. diff jisu / fp32-path | within 10 % | jisu top-1 | llama.cpp top-1 | jisu Δppl | llama.cpp Δppl |",
            "|" + "---|" * 12]
    for t in types:
        j, f, l = jisu_results[t], jisu_fp32[t], llama[t]
        ref_kld = l["kld"]["mean"]
        rel = abs(j.kld["mean"] - ref_kld) / ref_kld if ref_kld else float("nan")
        rel_f = abs(f.kld["mean"] - ref_kld) / ref_kld if ref_kld else float("nan")
        results["formats"][t] = {"file_bytes": os.path.getsize(paths[t]), "tensor_types": tensor_types(paths[t]),
                                 "jisu": j.to_dict(), "jisu_fp32_path": f.to_dict(), "llama_cpp": l,
                                 "kld_mean_relative_difference": rel, "kld_mean_relative_difference_fp32_path": rel_f,
                                 "within_target": rel <= TARGET}
        rows.append(f"| {t} | {os.path.getsize(paths[t]) / 1e6:.1f} | {j.model_format} | {j.kld['mean']:.5f} | "
                    f"{f.kld['mean']:.5f} | {ref_kld:.5f} | {100 * rel:.1f} % / {100 * rel_f:.1f} % | "
                    f"{'yes' if rel <= TARGET else 'NO'} | {100 * j.top1_agreement:.2f} % | "
                    f"{100 * l['top1_agreement']:.2f} % | {j.delta_perplexity:+.4f} | {l['delta_perplexity']:+.4f} |")
    e = llama["engines"]
    results["engines_fp32"] = e
    print(f"\n{count} tokens scored ({a.chunks} chunks x {a.ctx}) of {text.name}; fp32 reference perplexity: "
          f"jisu {jisu_results[types[0]].reference_perplexity:.4f}, llama.cpp F32 {e['perplexity']:.4f}\n")
    print("\n".join(rows))
    print(f"\njisu fp32 vs llama.cpp F32 on the same weights (engine numerics): KLD mean {e['kld']['mean']:.2e}, "
          f"max {e['kld']['max']:.2e}, top-1 agreement {100 * e['top1_agreement']:.2f} %")
    print("KLD is KL(reference || format) per token in nats, scored on every next-token prediction of each chunk.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
