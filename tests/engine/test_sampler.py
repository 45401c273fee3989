"""Sampling filters, penalties and seeds against hand-computed expectations; stop strings."""
from __future__ import annotations

import pytest
import torch

from jisu.config import SamplingParams
from jisu.engine.sampler import apply_penalties, filter_logits, make_generator, sample_token
from jisu.engine.text import StopMatcher
from jisu.errors import JisuError

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def kept(params: SamplingParams) -> list[int]:
    return torch.nonzero(torch.isfinite(filter_logits(LOGITS, params))).flatten().tolist()


def test_filters():
    assert kept(SamplingParams(temperature=1.0)) == [0, 1, 2, 3, 4]
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [0, 1]
    assert kept(SamplingParams(temperature=1.0, top_p=0.5)) == [0]
    assert kept(SamplingParams(temperature=1.0, top_p=0.8)) == [0, 1, 2]
    assert kept(SamplingParams(temperature=1.0, min_p=0.2)) == [0, 1, 2]   # 0.15 >= 0.2 * 0.5
    assert kept(SamplingParams(temperature=1.0, min_p=0.31)) == [0, 1]


def test_temperature_scales_logits():
    out = filter_logits(LOGITS, SamplingParams(temperature=0.5))
    assert torch.allclose(out, LOGITS / 0.5)


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    counts = torch.tensor([2.0, 1.0, 0.0, 0.0])
    prompt = torch.tensor([False, False, True, False])
    out = apply_penalties(logits, counts, prompt, SamplingParams(repetition_penalty=2.0))
    assert out.tolist() == [1.0, -4.0, 0.5, 0.5]
    out = apply_penalties(logits, counts, prompt, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    assert out.tolist() == [2.0 - 1.0 - 0.25, -2.0 - 0.5 - 0.25, 1.0, 0.5]


def test_greedy_and_seeded_sampling():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert sample_token(logits, SamplingParams(temperature=0), None) == int(logits.argmax())
    params = SamplingParams(temperature=1.0)
    draws = lambda seed: [sample_token(logits, params, g) for g in [make_generator(seed)] for _ in range(20)]
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_sampling_follows_distribution():
    params = SamplingParams(temperature=1.0)
    g = make_generator(0)
    counts = torch.bincount(torch.tensor([sample_token(LOGITS, params, g) for _ in range(4000)]), minlength=5)
    assert torch.allclose(counts / 4000, LOGITS.exp(), atol=0.03)


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(temperature=-1), dict(top_p=0),
                                 dict(top_p=1.5), dict(top_k=-1), dict(min_p=2), dict(max_tokens=0),
                                 dict(presence_penalty=float("inf")), dict(stop=("",)), dict(repetition_penalty=0)])
def test_bad_params_rejected(bad):
    name = next(iter(bad))
    with pytest.raises(JisuError, match=name):
        SamplingParams(**bad)


def test_build_rejects_unknown_names():
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams.build(None, temprature=0.5)
    assert SamplingParams.build(SamplingParams(seed=3), top_k=5) == SamplingParams(seed=3, top_k=5)


def feed(matcher: StopMatcher, pieces: list[str]) -> str:
    return "".join(matcher.push(p) for p in pieces) + matcher.flush()


def test_stop_strings():
    assert feed(StopMatcher(["END"]), ["hello ", "E", "N", "D", " more"]) == "hello "
    assert feed(StopMatcher(["END"]), ["hello E", "NOUGH"]) == "hello ENOUGH"
    assert feed(StopMatcher(["\n\n", "###"]), ["a\n", "b\n", "\nc"]) == "a\nb"
    assert feed(StopMatcher([]), ["x", "y"]) == "xy"
    m = StopMatcher(["abc"])
    assert m.push("xxab") == "xx" and m.push("d") == "abd"
