"""Search over candidate sequences: best-of-n ranking by cumulative log-probability (the
completions API's `best_of`)."""
from __future__ import annotations

from typing import Iterable, Sequence

from .request import TokenLogprob


def cumulative_logprob(logprobs: Iterable[TokenLogprob]) -> float:
    """The log-probability of a whole generated sequence: the sum over its tokens."""
    return sum(lp.logprob for lp in logprobs)


def best_of_n(scores: Sequence[float], n: int) -> list[int]:
    """The indices of the `n` candidates with the highest scores, in candidate order; of equal
    scores the earlier candidate wins."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    return sorted(ranked[:n])
