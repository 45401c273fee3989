"""Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, seeded draws.
The reference the native batched sampler (jisu/kernels/cpu/sampler.cpp) is tested against: pure
functions over one sequence's logits [V]; the order follows vLLM (penalties, temperature, then the
filters on the tempered distribution).

A draw is an inverse-CDF sample: the kept tokens in ascending id order, the first whose cumulative
weight exceeds u times the kept mass. u is a counter-based uniform keyed by (seed, position of the
token in the sequence, stream), so a seeded request draws the same tokens alone or batched, after a
preemption, and with or without speculative decoding; an unseeded request gets a random seed."""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from ..config import SamplingParams

_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finalizer (a bijection of 64-bit integers)."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def keyed_uniform(seed: int, position: int, stream: int = 0) -> float:
    """A uniform in [0, 1) that depends only on (seed, position, stream), 53 random bits. Stream 0
    draws the token at `position`; the speculative verifier's acceptance test uses stream 1 and its
    resampling stream 2 (any other stream is as independent)."""
    z = _mix64(_mix64(seed & _M64) ^ ((position * 8 + stream) & _M64))
    return (z >> 11) * (1.0 / (1 << 53))


class KeyedGenerator:
    """A request's random source: its seed (a random one when the request gave none) and, for
    callers that do not pass positions, a counter that advances by one per draw."""

    def __init__(self, seed: int | None = None):
        self.seed = secrets.randbits(64) if seed is None else seed & _M64
        self.counter = 0

    def uniform(self, position: int | None = None, stream: int = 0) -> float:
        if position is None:
            position, self.counter = self.counter, self.counter + 1
        return keyed_uniform(self.seed, position, stream)


def make_generator(seed: int | None) -> KeyedGenerator:
    return KeyedGenerator(seed)


def needs_counts(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty) or bool(params.presence_penalty)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, prompt_seen: torch.Tensor | None,
                    params: SamplingParams) -> torch.Tensor:
    """counts: [V] occurrences of each token in the generated text; prompt_seen: [V] bool, tokens of
    the prompt. OpenAI presence/frequency penalties are additive over generated tokens; the
    repetition penalty (HF/llama.cpp) divides positive logits and multiplies negative ones of every
    token seen in the prompt or the output. fp32, in this order (the native sampler's order)."""
    if params.repetition_penalty != 1.0:
        seen = counts > 0 if prompt_seen is None else (counts > 0) | prompt_seen
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if params.frequency_penalty or params.presence_penalty:
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return logits


def filtered_weights(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The unnormalized sampling weights [V] (float64) after temperature, top-k, top-p and min-p:
    exp(x - max x) for the kept tokens (x = logit / temperature), 0 for the removed ones.
      top-k: keep the tokens whose tempered logit is >= the k-th largest (ties at the k-th stay);
      top-p: in descending weight order (ties by ascending id), keep a token while the mass before
             it is < top_p times the mass of what top-k kept (the token that crosses top_p stays);
      min-p: keep the tokens whose weight is >= min_p times the largest (the top token's)."""
    x = logits.double() / params.temperature
    keep = torch.ones_like(x, dtype=torch.bool)
    if params.top_k and params.top_k < x.shape[-1]:
        keep = x >= torch.topk(x, params.top_k).values[-1]
    w = torch.exp(x - x.max()) * keep
    if params.top_p < 1.0:
        # Only the tokens weighing >= (1 - top_p) Z / V can be kept (those below weigh less than
        # what top-p drops) and they precede all others in the order: sort just them.
        z = float(w.sum())
        cand = torch.nonzero(w >= (1.0 - params.top_p) * z / w.shape[-1] * 0.5).flatten()
        sw, order = torch.sort(w[cand], descending=True, stable=True)
        before = sw.cumsum(-1) - sw
        drop = torch.ones_like(w, dtype=torch.bool)
        drop[cand[order]] = before >= params.top_p * z
        w = w.masked_fill(drop, 0.0)
    if params.min_p > 0.0:
        w = w.masked_fill(w < params.min_p, 0.0)   # the top token's weight is exp(0) = 1
    return w


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; removed tokens get -inf."""
    kept = filtered_weights(logits, params) > 0
    return (logits / params.temperature).masked_fill(~kept, float("-inf"))


@dataclass
class Dist:
    """A sparse next-token distribution: the kept token ids in ascending order, their probabilities."""
    ids: torch.Tensor      # int64 [n]
    probs: torch.Tensor    # float64 [n], sums to 1

    def prob(self, token: int) -> float:
        i = int(torch.searchsorted(self.ids, token))
        return float(self.probs[i]) if i < len(self.ids) and int(self.ids[i]) == token else 0.0


def filtered_dist(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None = None,
                  prompt_seen: torch.Tensor | None = None) -> Dist:
    """The distribution a non-greedy token is drawn from (penalties applied when `counts` is given);
    a greedy request's is its argmax with probability 1."""
    if counts is not None:
        logits = apply_penalties(logits, counts, prompt_seen, params)
    if params.is_greedy:
        return Dist(torch.tensor([argmax(logits)]), torch.ones(1, dtype=torch.float64))
    w = filtered_weights(logits, params)
    ids = torch.nonzero(w).flatten()
    kept = w[ids]
    return Dist(ids, kept / kept.sum())


def draw(ids: torch.Tensor, weights: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw: the first of `ids` (ascending) whose cumulative weight exceeds u times the
    total (the last one when rounding leaves nothing above)."""
    cum = weights.double().cumsum(-1)
    i = int(torch.searchsorted(cum, u * float(cum[-1]), right=True))
    return int(ids[min(i, len(ids) - 1)])


def argmax(logits: torch.Tensor) -> int:
    """The largest logit's id (the first of equal ones)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return int(logits.detach().numpy().argmax())  # ~6x faster than torch.argmax on CPU (same ties)
    return int(torch.argmax(logits))


def _uniform(generator, position: int | None) -> float:
    if isinstance(generator, torch.Generator):  # a caller's own torch generator: not keyed
        return float(torch.rand((), dtype=torch.float64, generator=generator))
    if generator is None:
        generator = KeyedGenerator()
    return generator.uniform(position)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: KeyedGenerator | None,
                 counts: torch.Tensor | None = None, prompt_seen: torch.Tensor | None = None,
                 position: int | None = None) -> int:
    """logits: [V] fp32 for the last position -> the chosen token id. `position`: the index in the
    sequence of the token drawn (None: the generator's counter)."""
    if counts is not None:
        logits = apply_penalties(logits, counts, prompt_seen, params)
    if params.is_greedy:
        return argmax(logits)
    w = filtered_weights(logits, params)
    ids = torch.nonzero(w).flatten()
    return draw(ids, w[ids], _uniform(generator, position))


def rejection_sample(p: Dist, q: Dist, token: int, u_accept: float, u_resample: float) -> tuple[int, bool]:
    """Speculative sampling's step for a draft token drawn from q, verified against the target's p:
    accept it when u_accept < p(token) / q(token); otherwise draw from normalize(max(p - q, 0)) with
    u_resample (inverse CDF in id order). Returns (token, accepted); the token follows p exactly.

    With a seed, a draft that is one token for sure (q one-hot: n-gram proposals, greedy drafts)
    gives the same text as no speculation when the verifier instead draws the position's own token,
    `draw(p.ids, p.probs, u)` with u = keyed_uniform(seed, position), and accepts when it equals the
    draft (the same law: accepted with probability p(token), else p without the token)."""
    pt, qt = p.prob(token), q.prob(token)
    if pt > 0 and (qt <= 0 or u_accept * qt < pt):
        return token, True
    ids = torch.cat([p.ids, q.ids]).unique()        # sorted
    pv = torch.zeros(len(ids), dtype=torch.float64)
    qv = torch.zeros(len(ids), dtype=torch.float64)
    pv[torch.searchsorted(ids, p.ids)] = p.probs
    qv[torch.searchsorted(ids, q.ids)] = q.probs
    r = (pv - qv).clamp_min(0.0)
    if not float(r.sum()) > 0:                       # p == q up to rounding: p itself
        return draw(p.ids, p.probs, u_resample), False
    return draw(ids, r, u_resample), False
