"""Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, seeded draws.
Pure functions over one sequence's logits [V]; the order follows vLLM (penalties, temperature,
then the filters on the tempered distribution)."""
from __future__ import annotations

import torch

from ..config import SamplingParams


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, prompt_seen: torch.Tensor | None,
                    params: SamplingParams) -> torch.Tensor:
    """counts: [V] occurrences of each token in the generated text; prompt_seen: [V] bool, tokens of
    the prompt. OpenAI presence/frequency penalties are additive over generated tokens; the
    repetition penalty (HF/llama.cpp) divides positive logits and multiplies negative ones of every
    token seen in the prompt or the output."""
    if params.repetition_penalty != 1.0:
        seen = counts > 0 if prompt_seen is None else (counts > 0) | prompt_seen
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if params.frequency_penalty or params.presence_penalty:
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; removed tokens get -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 counts: torch.Tensor | None = None, prompt_seen: torch.Tensor | None = None) -> int:
    """logits: [V] fp32 for the last position -> the chosen token id."""
    if counts is not None:
        logits = apply_penalties(logits, counts, prompt_seen, params)
    if params.is_greedy:
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            return int(logits.detach().numpy().argmax())  # ~6x faster than torch.argmax on CPU (same ties)
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def needs_counts(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty) or bool(params.presence_penalty)
