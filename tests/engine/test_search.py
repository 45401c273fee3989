"""best-of-n ranking of candidate sequences by cumulative log-probability."""
from __future__ import annotations

import math

from jisu.engine.request import TokenLogprob
from jisu.engine.search import best_of_n, cumulative_logprob


def test_cumulative_logprob_sums_the_tokens():
    lps = [TokenLogprob(3, -0.5), TokenLogprob(7, -1.25), TokenLogprob(1, -0.25)]
    assert cumulative_logprob(lps) == -2.0
    assert cumulative_logprob([]) == 0


def test_best_of_n_keeps_the_highest_in_candidate_order():
    scores = [-3.0, -0.5, -2.0, -0.1, -5.0]
    assert best_of_n(scores, 1) == [3]
    assert best_of_n(scores, 2) == [1, 3]
    assert best_of_n(scores, 3) == [1, 2, 3]
    assert best_of_n(scores, 5) == [0, 1, 2, 3, 4]


def test_best_of_n_ties_prefer_the_earlier_candidate():
    assert best_of_n([-1.0, -2.0, -1.0, -1.0], 2) == [0, 2]
    assert best_of_n([-math.inf, -math.inf, -4.0], 2) == [0, 2]
