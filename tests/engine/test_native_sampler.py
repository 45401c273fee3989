"""The native batched sampler against the Python reference: the same keyed uniforms, the same
tokens on random logits for every option and their combinations, the same sparse distributions
and rejection steps; seeded draws alone == batched, following the filtered distribution (chi-square);
greedy is the argmax; and the same text end to end on the default model."""
from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest
import torch

from jisu.config import SamplingParams
from jisu.engine import sampler as ref
from jisu.engine import sampling
from jisu.engine.sampling import RowSpec, sample_rows

needs_native = pytest.mark.skipif(not sampling.native_sampler_available(), reason="jisu._kernels not built")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.95),
    dict(temperature=0.5, top_k=20),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=0.8, top_k=100, top_p=0.9, min_p=0.01),
    dict(temperature=1.0, top_p=0.5, min_p=0.2),
    dict(temperature=2.0, top_k=3),
    dict(temperature=0.9, top_k=5000, top_p=0.99),
    dict(temperature=0.7, top_p=0.95, repetition_penalty=1.3),
    dict(temperature=1.1, presence_penalty=0.8, frequency_penalty=0.4),
    dict(temperature=0.6, top_k=50, repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.5),
    dict(temperature=0),
    dict(temperature=0, repetition_penalty=1.5, frequency_penalty=0.7),
]


def penalty_state(V: int, g: torch.Generator):
    counts = torch.zeros(V)
    counts[torch.randint(0, V, (40,), generator=g)] += torch.randint(1, 4, (40,), generator=g).float()
    seen = torch.zeros(V, dtype=torch.bool)
    seen[torch.randint(0, V, (30,), generator=g)] = True
    return counts, seen


def specs_for(params, rows, V, g, logprobs=None):
    out = []
    for r in range(rows):
        counts, seen = penalty_state(V, g)
        out.append(RowSpec(params, seed=(r * 0x9E3779B97F4A7C15) & ((1 << 64) - 1), position=r * 7 + 3,
                           counts=counts, prompt_seen=seen, logprobs=logprobs))
    return out


def reference_tokens(logits, specs):
    return [sampling._ref_row(logits[r], s).token for r, s in enumerate(specs)]


def test_keyed_uniform_is_a_uniform():
    u = torch.tensor([ref.keyed_uniform(11, p) for p in range(20000)], dtype=torch.float64)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003
    assert ref.keyed_uniform(11, 5) != ref.keyed_uniform(12, 5) != ref.keyed_uniform(11, 5, 1)


@needs_native
def test_keyed_uniform_native_equals_reference():
    K = sampling._native.get()
    for seed in (0, 1, 7, 2**63 - 1, 2**64 - 1, 0xDEADBEEFCAFEBABE):
        for pos in (0, 1, 99, 123456):
            for stream in (0, 1, 2):
                assert K.keyed_uniform(seed, pos, stream) == ref.keyed_uniform(seed, pos, stream)


@needs_native
# (151936, 0.5): a flat distribution over a large vocabulary, where top-p and min-p keep most
# tokens (the native sampler bins the weights instead of partitioning them)
@pytest.mark.parametrize("V,rows,scale", [(50, 120, 1.0), (1000, 120, 3.0), (49152, 12, 3.0), (151936, 5, 0.5)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_native_equals_reference_on_random_logits(cfg, V, rows, scale):
    g = torch.Generator().manual_seed(V * 31 + len(cfg))
    logits = torch.randn(rows, V, generator=g) * scale
    logits[::5, : V // 3] = logits[::5, : V // 3].round()      # some rows with many ties
    specs = specs_for(SamplingParams(**cfg), rows, V, g)
    assert [d.token for d in sample_rows(logits, specs)] == reference_tokens(logits, specs)


@needs_native
def test_native_dist_equals_reference():
    g = torch.Generator().manual_seed(5)
    for cfg in CONFIGS:
        params = SamplingParams(**cfg)
        for V, scale in ((64, 2.0), (5000, 2.0), (30000, 0.3)):
            row = torch.randn(V, generator=g) * scale
            row[: V // 4] = row[: V // 4].mul(8).round().div(8)   # ties
            counts, seen = penalty_state(V, g)
            a = sampling.filtered_dist(row, params, counts, seen)
            b = ref.filtered_dist(row, params, counts if ref.needs_counts(params) else None, seen)
            assert torch.equal(a.ids, b.ids), cfg
            assert torch.allclose(a.probs, b.probs, rtol=1e-5, atol=1e-9), cfg
            assert abs(float(a.probs.sum()) - 1) < 1e-9


@needs_native
def test_logprobs_are_the_raw_log_softmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 3000, generator=g) * 4
    specs = specs_for(SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2), 6, 3000, g, logprobs=5)
    lsm = torch.log_softmax(logits.double(), -1)
    for r, d in enumerate(sample_rows(logits, specs)):
        assert d.logprob.token_id == d.token
        assert d.logprob.logprob == pytest.approx(float(lsm[r, d.token]), abs=1e-5)
        top = torch.topk(lsm[r], 5)
        assert [t for t, _ in d.logprob.top] == top.indices.tolist()
        assert [v for _, v in d.logprob.top] == pytest.approx(top.values.tolist(), abs=1e-5)


@needs_native
def test_seeded_draws_same_alone_or_batched():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 2000, generator=g) * 3
    params = [SamplingParams(temperature=0.7, top_p=0.95, seed=i) for i in range(8)] + \
             [SamplingParams(temperature=1.0, top_k=40, min_p=0.02, seed=i) for i in range(8)]
    specs = [RowSpec(p, seed=p.seed, position=10 + i) for i, p in enumerate(params)]
    batched = [d.token for d in sample_rows(logits, specs)]
    alone = [sample_rows(logits[i:i + 1], [s])[0].token for i, s in enumerate(specs)]
    reordered = sample_rows(logits.flip(0).contiguous(), specs[::-1])[::-1]
    assert batched == alone == [d.token for d in reordered]
    again = [d.token for d in sample_rows(logits, specs)]
    assert again == batched
    # draws from chosen rows in place equal draws from a copy of those rows (both paths)
    rows = [13, 2, 7, 7, 0]
    picked = [specs[i] for i in (1, 3, 5, 8, 11)]
    want = [d.token for d in sample_rows(logits[rows].contiguous(), picked)]
    assert [d.token for d in sample_rows(logits, picked, rows)] == want
    with pytest.raises(ValueError):
        sample_rows(logits, picked[:1], [16])


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor, n: int) -> bool:
    """Pearson's statistic against the 99.9% quantile of chi-square (Wilson-Hilferty)."""
    exp = probs * n
    stat = float(((counts - exp) ** 2 / exp).sum())
    k = len(probs) - 1
    z = 3.09
    q = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return stat < q


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("cfg", [dict(temperature=0.8), dict(temperature=1.0, top_p=0.9),
                                 dict(temperature=1.5, top_k=6, min_p=0.05)])
def test_seeded_draws_follow_the_filtered_distribution(cfg, native):
    if native and not sampling.native_sampler_available():
        pytest.skip("jisu._kernels not built")
    g = torch.Generator().manual_seed(4)
    V, n = 12, 6000
    row = torch.randn(V, generator=g) * 1.5
    params = SamplingParams(**cfg)
    dist = ref.filtered_dist(row, params)
    specs = [RowSpec(params, seed=99, position=p) for p in range(n)]
    logits = row.expand(n, V).contiguous()
    toks = [d.token for d in sample_rows(logits, specs)] if native else reference_tokens(logits, specs)
    counts = torch.bincount(torch.tensor(toks), minlength=V).double()
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(dist.ids.tolist())
    assert chi_square_ok(counts[dist.ids], dist.probs, n)


@needs_native
def test_greedy_is_the_argmax():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(10, 49152, generator=g)
    logits[3, [5, 900, 40000]] = 50.0                  # ties: the first one
    specs = [RowSpec(SamplingParams(temperature=0)) for _ in range(10)]
    assert [d.token for d in sample_rows(logits, specs)] == [int(r.numpy().argmax()) for r in logits]
    assert sample_rows(logits, specs)[3].token == 5


def rand_dist(V, g, k):
    ids = torch.randperm(V, generator=g)[:k].sort().values
    p = torch.rand(k, generator=g, dtype=torch.float64) ** 3
    return ref.Dist(ids, p / p.sum())


@pytest.mark.parametrize("native", [True, False])
def test_rejection_sampling_keeps_the_target_distribution(native):
    if native and not sampling.native_sampler_available():
        pytest.skip("jisu._kernels not built")
    fn = sampling.rejection_sample if native else ref.rejection_sample
    g = torch.Generator().manual_seed(8)
    V, n = 10, 8000
    p, q = rand_dist(V, g, 7), rand_dist(V, g, 6)
    counts, accepted = torch.zeros(V, dtype=torch.float64), 0
    for i in range(n):
        t = ref.draw(q.ids, q.probs, ref.keyed_uniform(1, i, 0))
        tok, ok = fn(p, q, t, ref.keyed_uniform(1, i, 1), ref.keyed_uniform(1, i, 2))
        counts[tok] += 1
        accepted += ok
    assert chi_square_ok(counts[p.ids], p.probs, n)
    assert int(counts.sum()) == n and counts[[i for i in range(V) if i not in p.ids.tolist()]].sum() == 0
    overlap = float(sum(min(p.prob(i), q.prob(i)) for i in range(V)))
    assert abs(accepted / n - overlap) < 0.03


@needs_native
def test_rejection_native_equals_reference():
    g = torch.Generator().manual_seed(9)
    for i in range(300):
        p, q = rand_dist(50, g, 20), rand_dist(50, g, 15)
        t = int(q.ids[i % len(q.ids)])
        u1, u2 = ref.keyed_uniform(3, i, 1), ref.keyed_uniform(3, i, 2)
        assert sampling.rejection_sample(p, q, t, u1, u2) == ref.rejection_sample(p, q, t, u1, u2)
    one_hot = ref.Dist(torch.tensor([4]), torch.ones(1, dtype=torch.float64))
    p = rand_dist(50, g, 20)
    assert sampling.rejection_sample(p, one_hot, 4, 0.5, 0.5) == ref.rejection_sample(p, one_hot, 4, 0.5, 0.5)


@needs_native
def test_sampler_fallback_gives_the_same_tokens(monkeypatch):
    """The engine's Sampler with the native module and with the reference only: same tokens."""
    import jisu
    from jisu.engine.engine import Engine
    from tests.fixtures import write_hf_llama

    llm = jisu.load(write_hf_llama(str(__import__("tempfile").mkdtemp())))
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    params = [SamplingParams(temperature=t, top_p=tp, top_k=k, min_p=mp, seed=s, max_tokens=12, ignore_eos=True,
                             repetition_penalty=rp)
              for t, tp, k, mp, s, rp in [(0.7, 0.95, 0, 0.0, 1, 1.0), (1.0, 1.0, 20, 0.0, 2, 1.2),
                                          (1.2, 0.8, 0, 0.05, 3, 1.0), (0.0, 1.0, 0, 0.0, None, 1.3)]]
    native = Engine.from_llm(llm, num_blocks=64, block_size=4).generate(ps, params, logprobs=2)
    monkeypatch.setattr(sampling, "native_sampler_available", lambda: False)
    reference = Engine.from_llm(llm, num_blocks=64, block_size=4).generate(ps, params, logprobs=2)
    for a, b in zip(native, reference):
        assert a["token_ids"] == b["token_ids"]
        assert [x.logprob for x in a["logprobs"]] == pytest.approx([x.logprob for x in b["logprobs"]], abs=1e-4)


@needs_native
def test_default_model_seeded_text_native_equals_reference(default_llm, monkeypatch):
    from jisu.engine.engine import Engine

    tok = default_llm.tokenizer
    prompts = [tok.encode(t) for t in ("Once upon a time", "The capital of France is", "def fib(n):")]
    params = [SamplingParams(temperature=0.7, top_p=0.95, seed=s, max_tokens=24, ignore_eos=True) for s in (1, 2, 3)]
    native = Engine.from_llm(default_llm).generate(prompts, params)
    alone = [Engine.from_llm(default_llm).generate([p], [pp])[0] for p, pp in zip(prompts[:1], params[:1])]
    monkeypatch.setattr(sampling, "native_sampler_available", lambda: False)
    reference = Engine.from_llm(default_llm).generate(prompts, params)
    assert [o["token_ids"] for o in native] == [o["token_ids"] for o in reference]
    assert alone[0]["token_ids"] == native[0]["token_ids"]


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-g++"), reason="needs aarch64-linux-gnu-g++")
def test_sampler_source_compiles_for_aarch64(tmp_path):
    import pybind11
    import sysconfig

    src = os.path.join(os.path.dirname(__file__), "..", "..", "jisu", "kernels", "cpu")
    r = subprocess.run(["aarch64-linux-gnu-g++", "-fsyntax-only", "-std=c++20", "-ffp-contract=off", "-I", src,
                        "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"],
                        os.path.join(src, "sampler.cpp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
