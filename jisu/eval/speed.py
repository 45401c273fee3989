"""Speed measurements for one engine: prefill and decode throughput, latency, peak memory and
weight bytes read per decoded token. Run by file path (`python .../jisu/eval/speed.py`) it measures
one engine in its own process, so peak RSS is that engine's alone, and writes the result as JSON."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Protocol, Sequence

# Decode throughput is the wall-clock difference between two greedy runs of these lengths, so the
# prompt and the first token (prefill, setup) cancel out.
DECODE_TOKENS = (16, 128)
PROMPT_LENGTHS = (32, 128, 256)
DECODE_PROMPT_TOKENS = 32


class Engine(Protocol):
    """What the measurements need from an engine (jisu, llama.cpp, transformers)."""
    name: str
    version: str
    load_s: float                                                    # seconds to load the model (imports excluded)

    def prefill(self, ids: Sequence[int]) -> None: ...              # run a prompt into a fresh cache
    def generate(self, ids: Sequence[int], n: int) -> list[float]: ...  # greedy, ignore EOS: n token timestamps
    def next_token_logits(self, ids: Sequence[int]): ...             # [len(ids), V] float32 (numpy or torch)
    def weight_bytes_per_token(self) -> int | None: ...
    def weight_format(self) -> str: ...                               # e.g. "float32", "Q4_1"


# ---- pure helpers -----------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation between order statistics."""
    v = sorted(values)
    if not v:
        raise ValueError("no values")
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def bytes_per_token(sizes: dict[str, int], embed: str, vocab_rows: int, head: str) -> int:
    """Weight bytes one decoded token reads: every tensor but the embedding, one embedding row, and
    the lm head (the whole embedding when the head is tied and not listed separately)."""
    total = sum(n for name, n in sizes.items() if name != embed)
    total += sizes[embed] // vocab_rows
    if head not in sizes:
        total += sizes[embed]
    return total


def storage_nbytes(t) -> int:
    """Bytes a weight occupies as stored: packed kernel weights report their own `nbytes`."""
    n = getattr(t, "nbytes", None)
    return int(n) if n is not None else t.numel() * t.element_size()


def weight_format(weights: dict) -> str:
    """Storage of the matrices, most bytes first: torch dtypes ("float32") or packed kernel classes
    ("PackedInt"); 1-D tensors (norms) are left out."""
    by_kind: dict[str, int] = {}
    for t in {id(t): t for t in weights.values()}.values():
        if hasattr(t, "ndim") and hasattr(t, "element_size"):  # a torch tensor
            if t.ndim != 2:
                continue
            kind = str(t.dtype).removeprefix("torch.")
        else:
            kind = type(t).__name__
        by_kind[kind] = by_kind.get(kind, 0) + storage_nbytes(t)
    return "+".join(sorted(by_kind, key=by_kind.get, reverse=True))


def path_bytes(path: str) -> int:
    """Size on disk of a model file, or of every file under a model folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (jisu.memory's, loaded so that a peer's
    measurement process does not import the jisu package, hence torch)."""
    return _sibling_module("memory.py", "_jisu_memory", "..memory").peak_rss_bytes()


# ---- the measurement --------------------------------------------------------------------------

def measure(engine: Engine, ids: Sequence[int], *, prompt_lengths: Sequence[int] = PROMPT_LENGTHS,
            decode_tokens: Sequence[int] = DECODE_TOKENS, decode_prompt: int = DECODE_PROMPT_TOKENS,
            reps: int = 3) -> dict:
    """Warm up, then `reps` repetitions of each measurement; every figure is a median."""
    lo, hi = decode_tokens
    if not 0 < lo < hi:
        raise ValueError(f"decode token counts must be 0 < lo < hi, got {decode_tokens}")
    need = max(max(prompt_lengths), decode_prompt)
    if len(ids) < need:
        raise ValueError(f"need {need} prompt tokens, got {len(ids)}")
    prompt = list(ids[:decode_prompt])
    for n in prompt_lengths:  # warm-up: allocations, thread pools, shape-specific kernel choices
        engine.prefill(list(ids[:n]))
    engine.generate(prompt, min(lo, 4))

    prefill = {}
    for n in prompt_lengths:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            engine.prefill(list(ids[:n]))
            times.append(time.perf_counter() - t0)
        prefill[str(n)] = n / statistics.median(times)

    totals = {lo: [], hi: []}
    ttft, gaps = [], []
    for _ in range(reps):
        for n in (lo, hi):
            t0 = time.perf_counter()
            stamps = engine.generate(prompt, n)
            totals[n].append(time.perf_counter() - t0)
            if len(stamps) != n:
                raise RuntimeError(f"{engine.name}: generated {len(stamps)} tokens, asked for {n}")
            ttft.append(stamps[0] - t0)
            if n == hi:
                gaps += [b - a for a, b in zip(stamps, stamps[1:])]
    spread = statistics.median(totals[hi]) - statistics.median(totals[lo])
    return {
        "prefill_tok_s": prefill,
        "decode_tok_s": (hi - lo) / spread if spread > 0 else None,
        "decode_prompt_tokens": decode_prompt,
        "decode_tokens": [lo, hi],
        "ttft_ms": 1000 * statistics.median(ttft),
        "tpot_ms": {"p50": 1000 * percentile(gaps, 50), "p99": 1000 * percentile(gaps, 99)},
        "reps": reps,
    }


def chunk_perplexity(engine: Engine, chunks: Sequence[Sequence[int]]) -> float:
    """Perplexity of the engine on the chunks (each scored from a fresh cache), via jisu.eval.quality."""
    import torch

    from jisu.eval.quality import log_probs, perplexity_from_nll, token_nll

    total, count = 0.0, 0
    for chunk in chunks:
        logits = torch.as_tensor(engine.next_token_logits(list(chunk)))[:-1]
        targets = torch.tensor(list(chunk[1:]))
        total += token_nll(log_probs(logits), targets).sum().item()
        count += len(targets)
    return perplexity_from_nll(total, count)


# ---- jisu itself ------------------------------------------------------------------------------

class JisuEngine:
    name = "jisu"

    def __init__(self, model: str, threads: int | None = None):
        import jisu

        self.version = jisu.__version__
        t0 = time.perf_counter()
        self.llm = jisu.load(model, threads=threads)
        self.load_s = time.perf_counter() - t0

    def prefill(self, ids):
        from jisu.engine.runner import sequence_logits

        sequence_logits(self.llm.step_runner, list(ids))

    def generate(self, ids, n):
        from jisu.config import SamplingParams

        # plain decode (the peers' kind); speculative() measures jisu's default speculation apart
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, speculative="off")
        engine = self.llm.engine_for(len(ids) + n)
        return [time.perf_counter() for _ in engine.stream(list(ids), params)]

    def speculative(self, ids, n: int, mode: str = "auto") -> dict:
        """Greedy decode of n tokens with speculation `mode`: tok/s after the first token, tokens
        per step, acceptance and the engine's estimate of the time saved."""
        from jisu.config import SamplingParams

        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, speculative=mode)
        engine = self.llm.engine_for(len(ids) + n)
        before = engine.stats()
        stamps, got = [], 0
        for out in engine.stream(list(ids), params):
            stamps.append(time.perf_counter())
            got += len(out.token_ids)
        s = {k: engine.stats()[k] - before[k] for k in ("spec_drafted_tokens", "spec_accepted_tokens",
                                                        "spec_time_saved_s")}
        spread = stamps[-1] - stamps[0]
        return {"mode": mode, "decode_tok_s": (got - 1) / spread if spread > 0 else None,
                "tokens_per_step": (got - 1) / max(1, len(stamps) - 1), "drafted_tokens": s["spec_drafted_tokens"],
                "accepted_tokens": s["spec_accepted_tokens"],
                "acceptance": s["spec_accepted_tokens"] / s["spec_drafted_tokens"] if s["spec_drafted_tokens"] else 0.0,
                "time_saved_s": s["spec_time_saved_s"]}

    def next_token_logits(self, ids):
        from jisu.engine.runner import sequence_logits

        return sequence_logits(self.llm.step_runner, list(ids))

    def weight_bytes_per_token(self):
        w = self.llm.model.w
        sizes = {name: storage_nbytes(t) for name, t in w.items()}
        return bytes_per_token(sizes, "model.embed_tokens.weight", self.llm.config.vocab_size, "lm_head.weight")

    def weight_format(self) -> str:
        return weight_format(self.llm.model.w)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode(text)

    @property
    def max_context(self) -> int:
        return self.llm.config.max_position


def make_engine(name: str, model: str, threads: int | None, n_ctx: int) -> Engine:
    """A peer gets a resolved path (the parent resolves names, so a peer's process needn't import
    jisu); n_ctx is the longest sequence the measurements run."""
    if name == "jisu":
        return JisuEngine(model, threads)
    return _peers_module().make_peer(name, model, threads, n_ctx)


def _peers_module():
    return _sibling_module("eval/peers.py", "_jisu_eval_peers", ".peers")


def _sibling_module(path: str, name: str, relative: str):
    """A jisu module by its path under jisu/. Run by file path, this file loads such a module on its
    own, because importing the jisu package imports torch, which would add ~200 MB to a peer's
    peak RSS."""
    if __package__:
        return importlib.import_module(relative, __package__)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module


# ---- one engine in its own process ------------------------------------------------------------

def child_main(argv: list[str] | None = None) -> int:
    """Measure one engine; write {"result": {...}, "ids": [...]} or {"error": "..."} to --out."""
    if not __package__ and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # run as a script: don't let this folder's modules shadow top-level ones
    p = argparse.ArgumentParser(prog="python jisu/eval/speed.py")
    p.add_argument("--engine", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt-lengths", default=",".join(map(str, PROMPT_LENGTHS)))
    p.add_argument("--decode-tokens", default=",".join(map(str, DECODE_TOKENS)))
    p.add_argument("--decode-prompt", type=int, default=DECODE_PROMPT_TOKENS)
    p.add_argument("--ids", default=None, help="JSON file with the token ids to use (else: tokenize the corpus)")
    p.add_argument("--ppl-chunks", type=int, default=2)
    p.add_argument("--ppl-ctx", type=int, default=256)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    lengths = [int(x) for x in a.prompt_lengths.split(",")]
    decode = [int(x) for x in a.decode_tokens.split(",")]
    try:
        n_ctx = max(max(lengths), a.decode_prompt + max(decode), a.ppl_ctx)
        engine = make_engine(a.engine, a.model, a.threads, n_ctx)
        if a.ids:
            with open(a.ids) as f:
                ids = json.load(f)
        else:  # the jisu engine tokenizes the built-in corpus; peers get the same ids
            from jisu.io.text import builtin_text, encode_prefix

            need = max(max(lengths), a.decode_prompt, a.ppl_chunks * a.ppl_ctx)
            ids = encode_prefix(engine.tokenize, builtin_text().text, need)[:need]
        result = {"engine": engine.name, "engine_version": engine.version, "threads": a.threads,
                  "load_s": engine.load_s}
        result |= measure(engine, ids, prompt_lengths=lengths, decode_tokens=decode,
                          decode_prompt=a.decode_prompt, reps=a.reps)
        if hasattr(engine, "speculative"):
            result["speculative"] = engine.speculative(ids[:a.decode_prompt], max(decode))
        result["peak_rss_bytes"] = peak_rss_bytes()  # before the perplexity pass, which may allocate more
        result["weight_bytes_per_token"] = engine.weight_bytes_per_token()
        result["weight_format"] = engine.weight_format()
        chunks = [ids[i * a.ppl_ctx:(i + 1) * a.ppl_ctx] for i in range(a.ppl_chunks)]
        chunks = [c for c in chunks if len(c) == a.ppl_ctx]
        result["perplexity"] = chunk_perplexity(engine, chunks) if chunks else None
        result["perplexity_tokens"] = sum(len(c) - 1 for c in chunks)
        out = {"result": result, "ids": ids if not a.ids else None}
    except Exception as e:  # reported by the parent as this engine's error, next to the others' results
        out = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    with open(a.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
