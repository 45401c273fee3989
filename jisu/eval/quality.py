"""Pure math over log-probabilities: perplexity, KL divergence, top-1 agreement and summaries.
Inputs are [..., V] log-prob tensors (log_softmax of logits) and [...] target ids; no I/O here."""
from __future__ import annotations

import math

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last axis, in fp32 (the precision every engine's logits come in)."""
    return torch.log_softmax(logits.float(), dim=-1)


def token_nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token: [..., V], [...] -> [...] (float64)."""
    return -logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).double()


def perplexity_from_nll(nll: torch.Tensor | float, count: int | None = None) -> float:
    """exp(mean NLL): from per-token NLLs, or from a summed NLL and its token count."""
    if isinstance(nll, torch.Tensor):
        return math.exp(nll.double().mean().item())
    return math.exp(nll / count)


def perplexity(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """Perplexity of `targets` under `logprobs`: exp(-mean log p(target))."""
    return perplexity_from_nll(token_nll(logprobs, targets))


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(ref || model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v)): [..., V] -> [...].
    Accumulated in float64 so small divergences (8-bit formats) are not lost to rounding."""
    ref = ref_logprobs.double()
    diff = ref - logprobs.double()
    # 0 * log 0 = 0: tokens the reference gives zero probability contribute nothing (and avoid nan)
    return torch.where(torch.isneginf(ref), torch.zeros_like(diff), ref.exp() * diff).sum(-1)


def top1_agreement(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Fraction of positions where the model's most likely token equals the reference's."""
    return top1_matches(ref_logprobs, logprobs).double().mean().item()


def top1_matches(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position boolean: argmax of the model equals argmax of the reference."""
    return ref_logprobs.argmax(-1) == logprobs.argmax(-1)


def summarize(values: torch.Tensor) -> dict[str, float]:
    """mean, median, p99 and max of a 1-D tensor (e.g. per-token KLD)."""
    v = values.double().flatten()
    if v.numel() == 0:
        raise ValueError("no values to summarize")
    return {"mean": v.mean().item(), "median": torch.quantile(v, 0.5).item(),
            "p99": torch.quantile(v, 0.99).item(), "max": v.max().item()}
