"""Single-sequence generation: prefill the prompt, then decode token by token, yielding each token
with its timing. Text-level concerns (detokenizing, stop strings) live in jisu.engine.text."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..config import SamplingParams
from ..errors import JisuError
from .sampler import make_generator, needs_counts, sample_token


@dataclass
class TokenEvent:
    token_id: int
    is_eos: bool           # the model ended the sequence (EOS or a stop token id)
    prefill_s: float       # time spent on the prompt (same value on every event)
    elapsed_s: float       # time since decoding began, after this token


def check_context(num_prompt: int, max_tokens: int, max_context: int) -> None:
    if num_prompt == 0:
        raise JisuError("the prompt is empty")
    if num_prompt + max_tokens > max_context:
        raise JisuError(f"prompt of {num_prompt} tokens + max_tokens {max_tokens} exceeds the model's context "
                        f"of {max_context} tokens")


_LAST = torch.tensor([-1])


def prefill(model, prompt_ids: list[int], cache) -> torch.Tensor:
    """Run the prompt through the model; returns the last position's logits [V]. A model with a
    `prefill_chunk` (the native step, whose rows do not depend on how many are computed together)
    takes a long prompt that many tokens at a time, so its scratch memory stays bounded."""
    chunk = getattr(model, "prefill_chunk", None) or len(prompt_ids)
    for p0 in range(0, len(prompt_ids), chunk):
        part = prompt_ids[p0:p0 + chunk]
        last = p0 + chunk >= len(prompt_ids)
        out = model.forward(torch.tensor([part]), cache, logits_index=_LAST if last else _NONE)
    return out[0, -1]


_NONE = torch.tensor([], dtype=torch.long)


@torch.inference_mode()
def generate_tokens(model, prompt_ids: Sequence[int], params: SamplingParams, eos_ids: Sequence[int],
                    max_context: int) -> Iterator[TokenEvent]:
    """Yield generated tokens one at a time until EOS (unless ignore_eos) or max_tokens."""
    vocab = model.cfg.vocab_size
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise JisuError(f"prompt token ids must lie in [0, {vocab})")
    check_context(len(prompt_ids), params.max_tokens, max_context)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    cache = model.new_cache(1, len(prompt_ids) + params.max_tokens)
    generator = None if params.is_greedy else make_generator(params.seed)
    counts = prompt_seen = None
    if needs_counts(params):
        counts = torch.zeros(vocab)
        prompt_seen = torch.zeros(vocab, dtype=torch.bool)
        prompt_seen[torch.tensor(list(prompt_ids))] = True

    t0 = time.perf_counter()
    logits = prefill(model, list(prompt_ids), cache)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(params.max_tokens):
        token = sample_token(logits, params, generator, counts, prompt_seen)
        is_eos = token in stop_ids
        yield TokenEvent(token, is_eos, prefill_s, time.perf_counter() - t0)
        if is_eos or i + 1 == params.max_tokens:
            return
        if counts is not None:
            counts[token] += 1
        logits = model.forward(torch.tensor([[token]]), cache)[0, -1]
