"""Text the teacher writes itself, for distillation: windows sampled from the teacher (temperature 1,
no truncation, from a random first token) through the native engine, so a student learns the
teacher's distribution on the teacher's own kind of text rather than only on the calibration text's
(training only on one kind of text, e.g. Python docs, fits that kind and barely moves others).
Generated once per (teacher, count, length, seed) and cached on disk beside the teacher targets;
a killed run resumes from the windows already written (each window's tokens depend only on its
seed: the engine's batch invariance and seeded draws)."""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch

from .distill_cache import _save, cache_root

CHUNK = 32          # windows generated at once (the engine's running sequences)


def first_tokens(tokenizer, vocab: int, n: int, seed: int) -> list[int]:
    """n random token ids that decode to visible text (no control tokens), reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < n:
        for t in torch.randint(0, vocab, (4 * (n - len(out)),), generator=g).tolist():
            if len(out) < n and tokenizer.decode([t]).strip():
                out.append(t)
    return out


def teacher_windows(cfg, weights: dict, tokenizer, fingerprint: str, n: int, seq_len: int, *, seed: int = 0,
                    progress: bool = False, root: Optional[str] = None) -> tuple[torch.Tensor, dict]:
    """[n, seq_len] token ids the teacher (cfg + float weights, `fingerprint` its weights_fingerprint)
    generated; returns (ids, info: file, cached, generated_seconds)."""
    import time

    from tqdm import tqdm

    from ..config import SamplingParams
    from ..engine.config import EngineConfig
    from ..engine.engine import Engine
    from ..engine.runner import make_runner
    from ..models import build_model

    key = hashlib.sha256(f"{fingerprint}\n{n} {seq_len} {seed} gen-v1".encode()).hexdigest()[:32]
    folder = root or cache_root()
    path = os.path.join(folder, f"text-{key}.pt")
    info = {"file": path, "cached": os.path.exists(path), "windows": n, "seq_len": seq_len}
    if info["cached"]:
        return torch.load(path), info
    os.makedirs(folder, exist_ok=True)
    part = path + ".part"
    done = torch.load(part) if os.path.exists(part) else torch.empty(0, seq_len, dtype=torch.long)
    firsts = first_tokens(tokenizer, cfg.vocab_size, n, seed)
    runner = make_runner(build_model(cfg, dict(weights)))
    bs = 16  # every window of a chunk fits at once
    engine = Engine(runner, tokenizer, EngineConfig(eos_ids=(), speculative="off", max_num_seqs=CHUNK, block_size=bs,
                                                    num_blocks=CHUNK * -(-seq_len // bs)))
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=done.shape[0], desc="distill: teacher text", unit="window", disable=not progress)
    while done.shape[0] < n:
        i0 = done.shape[0]
        idx = range(i0, min(n, i0 + CHUNK))
        params = [SamplingParams(temperature=1.0, max_tokens=seq_len - 1, seed=seed * 1_000_003 + i,
                                 ignore_eos=True) for i in idx]
        outs = engine.generate([[firsts[i]] for i in idx], params)
        rows = torch.tensor([[firsts[i]] + o["token_ids"] for i, o in zip(idx, outs)], dtype=torch.long)
        done = torch.cat([done, rows])
        _save(done, part)
        bar.update(len(idx))
    bar.close()
    _save(done, path)
    os.remove(part)
    info["generated_seconds"] = time.perf_counter() - t0
    return done, info
