"""Speculative decoding: greedy output with each proposer equals greedy without, alone and batched
with 15 others (tiny random model and the default quantized model); a target drafting for itself
accepts every draft; seeded sampling gives the same text with and without speculation; rejection
sampling keeps the next-token distribution (chi-square); the verify step's rows are the single-token
steps' bits; a draft model with another vocabulary is refused."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import jisu
from jisu.config import SamplingParams
from jisu.engine.batch import StepBatch
from jisu.engine.engine import Engine, EngineError
from jisu.engine.kv_cache import PagedKVCache
from jisu.engine.speculative import DraftModelProposer, NgramIndex, inverse_cdf, keyed_uniform, rejection_sample
from jisu.engine.speculator import CostModel
from jisu.errors import JisuError
from jisu.kernels import ops
from tests.fixtures import save_tokenizer, write_hf_llama

invariant = pytest.mark.skipif(not ops.native_available(),
                               reason="token-identical speculation needs the batch-invariant native kernels")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return jisu.load(write_hf_llama(str(tmp_path_factory.mktemp("spec"))))


def prompts(n, seed=0, repeat=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, 290, (3 + 5 * i % 40,), generator=g).tolist()
        out.append(p * 3 if repeat or i % 2 else p)   # repeats give the n-gram lookup something to find
    return out


def run(llm, ps, params, mode, draft=None, **kw):
    engine = Engine.from_llm(llm, num_blocks=512, block_size=4, speculative=mode, draft=draft, **kw)
    out = engine.generate(ps, params)
    s = engine.stats()
    assert s["kv_blocks_used"] == 0, s
    return [o["token_ids"] for o in out], s


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


# --- the math --------------------------------------------------------------------------------------
def chi2_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    keep = expected > 0
    x = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    k = int(keep.sum()) - 1
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))  # Wilson-Hilferty
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("one_hot", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(one_hot):
    rng = np.random.default_rng(0)
    V, N = 20, 20000
    p = rng.dirichlet(np.ones(V) * 0.7)
    q = rng.dirichlet(np.ones(V) * 0.7)
    counts = np.zeros(V)
    accepted = 0
    for _ in range(N):
        if one_hot:
            x = int(rng.integers(V))           # any deterministic proposal: q is a point mass
            ok, t = rejection_sample(p, None, x, rng.random(), rng.random())
        else:
            x = int(rng.choice(V, p=q))
            ok, t = rejection_sample(p, q, x, rng.random(), rng.random())
        counts[t] += 1
        accepted += ok
    assert chi2_pvalue(counts, p * N) > 0.01
    if not one_hot:  # acceptance rate of speculative sampling: sum_x min(p, q)
        assert abs(accepted / N - np.minimum(p, q).sum()) < 0.02


def test_one_hot_verification_draws_what_plain_sampling_draws():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(50))
    for pos in range(200):
        u = keyed_uniform(7, pos)
        plain = inverse_cdf(p, u)
        for x in (plain, (plain + 1) % 50):
            ok, t = rejection_sample(p, None, x, keyed_uniform(7, pos, 1), u)
            assert t == plain and ok == (x == plain)


def test_keyed_uniform_is_uniform_and_keyed():
    u = np.array([keyed_uniform(3, t) for t in range(20000)])
    assert chi2_pvalue(np.histogram(u, 20, (0, 1))[0].astype(float), np.full(20, 1000.0)) > 0.01
    assert keyed_uniform(3, 5) == keyed_uniform(3, 5) != keyed_uniform(4, 5) != keyed_uniform(3, 6)


def test_ngram_index_proposes_what_followed_the_latest_match():
    idx = NgramIndex(2, 3)
    toks = [1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 1, 2, 3]
    assert idx.propose(toks, 3) == [4, 5, 9]          # the longest suffix "1 2 3" occurred at 0..2
    # "8 2 3" never occurred: the 2-gram "2 3" at its latest occurrence (6..7)
    assert NgramIndex(2, 3).propose([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 2, 3], 3) == [4, 7, 8]
    toks2 = [5, 6, 7, 8, 5, 6]
    assert NgramIndex(2, 3).propose(toks2, 4) == [7, 8, 5, 6]
    assert NgramIndex(2, 3).propose([1, 2, 3], 4) == []


def test_cost_model_interpolates():
    cm = CostModel({1: 1.0, 2: 1.5, 4: 2.5})
    assert cm.t(3) == 2.0 and cm.t(6) == 3.5


# --- the engine, tiny model ------------------------------------------------------------------------
@invariant
def test_greedy_ngram_equals_plain_alone_and_batched(tiny):
    ps = prompts(16)
    ref, _ = run(tiny, ps, GREEDY, "off")
    for mode in ("ngram", "auto"):
        out, s = run(tiny, ps, GREEDY, mode)
        assert out == ref
        # auto with 16 requests sharing each step and none waiting drafts only where even fully accepted
        # drafts would pay, which the cost model may rule out; ngram always drafts
        assert s["spec_accepted_tokens"] > 0 or mode == "auto"
        alone, _ = run(tiny, ps[1:2], GREEDY, mode)
        assert alone == ref[1:2]


@invariant
def test_auto_turns_itself_off_and_probes_again(tiny):
    """Drafts that never match, each extra row costing 0.3 of a step: auto stops drafting after a
    verify step or two and only probes, at growing intervals; `ngram` (forced on) keeps drafting.
    The output is unchanged either way. (The tiny model's own rows are nearly free: there even
    drafts that rarely match would pay.)"""
    ps = prompts(1)
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    ref, _ = run(tiny, ps, params, "off")
    steps = {}
    for mode in ("auto", "ngram"):
        engine = Engine.from_llm(tiny, num_blocks=512, block_size=4, speculative=mode)
        wrong = lambda wants: [([(r.tokens[-1] * 7 + 1) % 300] * k, None) for r, k in wants]  # noqa: E731
        engine.speculator.ngram.propose = wrong
        engine.speculator._cost = CostModel({n: 1.0 + 0.3 * (n - 1) for n in CostModel.POINTS})
        out = engine.generate(ps, params)
        assert out[0]["token_ids"] == ref[0]
        steps[mode] = engine.stats()["spec_verify_steps"]
    assert steps["auto"] <= 6 and steps["ngram"] > 40


@invariant
def test_auto_does_not_probe_where_even_accepted_drafts_cannot_pay(tiny):
    """16 requests decoding together and none waiting, each extra row costing 0.3 of a step: a draft's
    tokens, even all accepted, cannot make up the rows it adds to every request's step, so auto neither
    drafts nor probes (probes used to add ~40 rejected-or-useless draft rows a run at 16 streams); a
    request alone under the same costs and the same always-right drafts still drafts. Output unchanged."""
    ps = prompts(16)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref, _ = run(tiny, ps, params, "off")
    drafted = {}
    for name, batch in (("16", ps), ("1", ps[:1])):
        engine = Engine.from_llm(tiny, num_blocks=512, block_size=4, speculative="auto")
        right = {tuple(p): r for p, r in zip(ps, ref)}

        def propose(wants, right=right):  # the reference's own next tokens: every draft would be accepted
            out = []
            for req, k in wants:
                full = right[tuple(req.prompt_ids)]
                n = len(req.output_ids)
                out.append((full[n + 1:n + 1 + k], None))
            return out
        engine.speculator.ngram.propose = propose
        engine.speculator._cost = CostModel({n: 1.0 + 0.3 * (n - 1) for n in CostModel.POINTS})
        out = engine.generate(batch, params)
        assert [o["token_ids"] for o in out] == ref[:len(batch)]
        drafted[name] = engine.stats()["spec_drafted_tokens"]
    assert drafted["16"] == 0 and drafted["1"] > 0, drafted


@invariant
def test_self_draft_accepts_everything_and_equals_plain(tiny):
    ps = prompts(16)
    ref, _ = run(tiny, ps, GREEDY, "off")
    draft = DraftModelProposer(tiny.step_runner, kv_memory_mb=4, block_size=4)
    out, s = run(tiny, ps, GREEDY, "draft", draft=draft)
    assert out == ref
    assert s["spec_drafted_tokens"] > 0 and s["spec_accepted_tokens"] == s["spec_drafted_tokens"]
    assert draft.kv.num_free_blocks == draft.kv.pool.num_blocks   # every draft sequence released


@invariant
def test_sampled_drafts_from_a_self_draft_are_always_accepted(tiny):
    """Drafts drawn from the draft model's own distribution q (rejection sampling with q != one-hot):
    a target drafting for itself has q == p, so every draft passes u * q(x) < p(x)."""
    ps = prompts(6)
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=30, ignore_eos=True, seed=40 + i)
              for i in range(len(ps))]
    draft = DraftModelProposer(tiny.step_runner, kv_memory_mb=4, block_size=4, sample=True)
    out, s = run(tiny, ps, params, "draft", draft=draft)
    assert s["spec_drafted_tokens"] > 0 and s["spec_accepted_tokens"] == s["spec_drafted_tokens"]
    assert all(len(o) == 30 for o in out)


@invariant
def test_other_draft_model_equals_plain(tiny, tmp_path):
    other = jisu.load(write_hf_llama(str(tmp_path / "other"), seed=5))   # same tokenizer, other weights
    ps = prompts(6)
    ref, _ = run(tiny, ps, GREEDY, "off")
    draft = DraftModelProposer.from_llm(other, tiny.tokenizer, tiny.config, kv_memory_mb=4, block_size=4)
    out, s = run(tiny, ps, GREEDY, "draft", draft=draft)
    assert out == ref and s["spec_drafted_tokens"] > 0


@invariant
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.3, max_tokens=40, ignore_eos=True, seed=11),
    SamplingParams(temperature=0.5, top_p=0.9, top_k=20, repetition_penalty=1.1, max_tokens=40, ignore_eos=True,
                   seed=12)])
def test_seeded_sampling_same_with_and_without_speculation(tiny, params):
    ps = prompts(16, repeat=True)
    params_list = [SamplingParams.build(params, seed=params.seed + i) for i in range(len(ps))]
    on, s = run(tiny, ps, params_list, "ngram")
    assert s["spec_drafted_tokens"] > 0
    if params.top_k == 0:   # (at the flatter settings the random model accepts a draft only by chance)
        assert s["spec_accepted_tokens"] > 0
    # the same keyed draws without any draft: the engine with drafting disabled
    engine = Engine.from_llm(tiny, num_blocks=512, block_size=4, speculative="ngram")
    engine.speculator.ngram.propose = lambda wants: [([], None) for _ in wants]
    off = [o["token_ids"] for o in engine.generate(ps, params_list)]
    assert on == off
    assert engine.stats()["spec_drafted_tokens"] == 0
    # and batched == alone
    alone, _ = run(tiny, ps[3:4], params_list[3:4], "ngram")
    assert alone == on[3:4]


@invariant
def test_logprobs_and_stops_with_drafts(tiny):
    ps = prompts(4, repeat=True)
    ref = Engine.from_llm(tiny, num_blocks=512, block_size=4, speculative="off").generate(ps, GREEDY, logprobs=2)
    out = Engine.from_llm(tiny, num_blocks=512, block_size=4, speculative="ngram").generate(ps, GREEDY, logprobs=2)
    for a, b in zip(ref, out):
        assert a["token_ids"] == b["token_ids"]
        # a verified token's log-probs come from the fp32 log-softmax, a plainly sampled one's from the
        # native sampler (float64 sums): equal to rounding
        assert [(x.token_id, [t for t, _ in x.top]) for x in a["logprobs"]] == \
            [(x.token_id, [t for t, _ in x.top]) for x in b["logprobs"]]
        for x, y in zip(a["logprobs"], b["logprobs"]):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert [v for _, v in x.top] == pytest.approx([v for _, v in y.top], abs=1e-5)
    # a stop token inside an accepted run ends the request there
    stop = ref[0]["token_ids"][len(ref[0]["token_ids"]) // 2]
    p = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=(stop,))
    a, _ = run(tiny, ps[:1], p, "off")
    b, _ = run(tiny, ps[:1], p, "ngram")
    assert a == b


def test_draft_model_with_another_vocabulary_is_refused(tiny, tmp_path, default_gguf, capsys):
    from jisu.cli import main

    with pytest.raises(JisuError, match="vocabulary"):
        DraftModelProposer.from_llm(jisu.load(default_gguf), tiny.tokenizer, tiny.config)
    folder = write_hf_llama(str(tmp_path / "plain-tok"))
    save_tokenizer(folder, chat=False)   # same vocab_size in the model, another tokenizer
    with pytest.raises(JisuError, match="tokenizer"):
        DraftModelProposer.from_llm(jisu.load(folder), tiny.tokenizer, tiny.config)
    # the command line: one line, exit status 2
    target = write_hf_llama(str(tmp_path / "target"))
    assert main(["run", target, "--raw", "-p", "a b", "-n", "2", "--speculative", f"draft:{default_gguf}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jisu: ") and "vocabulary" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(EngineError, match="draft model"):
        Engine.from_llm(tiny, num_blocks=8).add_request([5, 6], SamplingParams(max_tokens=4, speculative="draft"))
    with pytest.raises(JisuError, match="speculative"):
        SamplingParams(speculative="medusa")


# --- the default model, as users run it (quantized weights, fp16 KV) -----------------------------------
@pytest.fixture(scope="module")
def default_q(default_gguf):
    return jisu.load(default_gguf)


CODE = '''def moving_average(values, window):
    """Average of each run of `window` values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''


@invariant
def test_verify_rows_are_the_single_token_steps_bits(default_q):
    runner = default_q.step_runner
    ids = default_q.tokenizer.encode(CODE)[:50]
    kv = PagedKVCache(default_q.config, 1, 64, dtype=runner.kv_dtype, resident=False)
    runner.run(StepBatch.single(ids[:30], 0, [0], [29]), kv)
    single = [runner.run(StepBatch.single([t], 30 + i, [0], [0]), kv)[0] for i, t in enumerate(ids[30:47])]
    for rows in (2, 5, 8, 17):
        many = runner.run(StepBatch.single(ids[30:30 + rows], 30, [0], list(range(rows))), kv)
        for i in range(rows):
            assert torch.equal(many[i], single[i]), (rows, i)


@invariant
def test_default_model_greedy_ngram_equals_plain_batched(default_q):
    tok = default_q.tokenizer
    task = tok.encode_chat([{"role": "user", "content": "Rename `values` to `xs` in this function:\n\n" + CODE}])
    others = [tok.encode_chat([{"role": "user", "content": q}]) for q in
              ["What is a prime number?", "Write a haiku about rain.", "List three fruits.", "Say hello.",
               "Explain recursion briefly.", "What is 2+2?", "Name a color.", "Translate 'cat' to French.",
               "Give me a word that rhymes with tree.", "Why is the sky blue?", "Count to five.",
               "What is Python?", "Describe a dog.", "What day comes after Monday?", "Spell 'house'."]]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ref, _ = run(default_q, [task] + others, params, "off")
    out, s = run(default_q, [task] + others, params, "auto")
    assert out == ref
    alone, s1 = run(default_q, [task], params, "ngram")
    assert alone == ref[:1] and s1["spec_accepted_tokens"] > 0


@invariant
def test_default_model_self_draft_accepts_everything(default_q):
    ids = default_q.tokenizer.encode_chat([{"role": "user", "content": "Write a haiku about rain."}])
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref, _ = run(default_q, [ids], params, "off")
    draft = DraftModelProposer(default_q.step_runner, kv_memory_mb=8, block_size=4)
    out, s = run(default_q, [ids], params, "draft", draft=draft)
    assert out == ref and s["spec_accepted_tokens"] == s["spec_drafted_tokens"] > 0


# --- the server and the CLI ---------------------------------------------------------------------------
@invariant
def test_server_speculative_field_and_metrics(tiny):
    import httpx

    from jisu.serve.app import create_app
    from tests.serve.conftest import running

    app = create_app(tiny, kv_memory_mb=1, max_concurrency=4)
    body = {"prompt": list(range(40, 60)) * 3, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    with running(app) as (url, _):
        outs = {m: httpx.post(url + "/v1/completions", json={**body, "speculative": m}, timeout=60) for m in
                ("off", "ngram", "auto")}
        assert all(r.status_code == 200 for r in outs.values())
        texts = {m: r.json()["choices"][0]["text"] for m, r in outs.items()}
        assert texts["off"] == texts["ngram"] == texts["auto"]
        r = httpx.post(url + "/v1/completions", json={**body, "speculative": "draft"}, timeout=60)
        assert r.status_code == 400 and "draft model" in r.text
        r = httpx.post(url + "/v1/completions", json={**body, "speculative": "eagle"}, timeout=60)
        assert r.status_code == 400
        metrics = httpx.get(url + "/metrics").text
    drafted = float(re.search(r"^jisu_spec_drafted_tokens (\S+)", metrics, re.M).group(1))
    assert drafted > 0 and "jisu_spec_acceptance" in metrics


def test_cli_run_json_reports_speculation(tiny, tmp_path):
    import contextlib
    import io
    import json

    from jisu.cli import main

    path = write_hf_llama(str(tmp_path / "m"))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["run", path, "--raw", "-p", "a b c d a b c d a b c d", "-n", "12", "--temp", "0",
                     "--ignore-eos", "--json", "--speculative", "ngram"]) == 0
    out = json.loads(buf.getvalue())
    assert out["speculative"]["mode"] == "ngram" and "acceptance" in out["speculative"]
    assert len(out["token_ids"]) == 12


def test_bench_engine_reports_speculation(tmp_path):
    from jisu.eval.speed import JisuEngine

    eng = JisuEngine(write_hf_llama(str(tmp_path / "b")))
    ids = list(range(40, 60)) * 3
    assert len(eng.generate(ids, 12)) == 12           # plain decode: one output per token
    s = eng.speculative(ids, 12, "ngram")
    assert s["drafted_tokens"] > 0 and 0 <= s["acceptance"] <= 1 and s["tokens_per_step"] > 1


@invariant
def test_draft_pool_too_small_drafts_less_not_fails(tiny):
    """A draft KV pool that cannot hold every drafting request: those without room draft nothing
    that step; every request still finishes with the plain output."""
    ps = prompts(8)
    ref, _ = run(tiny, ps, GREEDY, "off")
    draft = DraftModelProposer(tiny.step_runner, kv_memory_mb=0.02, block_size=4)
    out, s = run(tiny, ps, GREEDY, "draft", draft=draft)
    assert out == ref and s["errors"] == 0 and s["spec_drafted_tokens"] > 0
