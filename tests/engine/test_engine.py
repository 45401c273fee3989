"""The serving engine on the tiny model: batched == one at a time (greedy and seeded), chunked
prefill, preemption by recompute, prefix caching, abort, stops, logprobs, per-request failures,
and every KV block back in the pool afterwards."""
from __future__ import annotations

import threading

import pytest
import torch

import jisu
from jisu.config import SamplingParams
from jisu.engine.engine import Engine, EngineError, QueueFull
from jisu.engine.native_runner import NativeRunner
from jisu.engine.runner import sequence_logits
from jisu.engine.sampling import Sampler
from jisu.kernels import ops
from tests.fixtures import write_hf_llama

invariant = pytest.mark.skipif(not ops.native_available(),
                               reason="batch invariance needs the native kernels (jisu._kernels)")


@pytest.fixture(scope="module", params=["native-step", "reference"])
def llm(request, tmp_path_factory):
    """The native forward step (jisu.load's default), and the reference model, whose paged
    attention runs through the torch runner's PagedAttention."""
    path = write_hf_llama(str(tmp_path_factory.mktemp("engine")))
    return jisu.load(path, native=request.param == "native-step")


def prompts(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 290, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def alone(llm, prompt, params, **kw):
    return Engine.from_llm(llm, num_blocks=128, block_size=4).generate([prompt], params, **kw)[0]


def assert_pool_empty(engine):
    s = engine.stats()
    assert s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0, s


def test_native_linear_rows_do_not_depend_on_batch_size():
    """What batch invariance rests on: the native linear gives each row the same bits for any M
    up to F32_NATIVE_MAX_M; torch's F.linear does not (documented in jisu/engine/engine.py)."""
    if not ops.native_available():
        pytest.skip("native kernels not built")
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(96, 64, generator=g), torch.randn(ops.F32_NATIVE_MAX_M, 64, generator=g)
    one = ops.linear(x[:1], w)
    for m in (2, 3, 17, ops.F32_NATIVE_MAX_M):
        assert torch.equal(ops.linear(x[:m], w)[:1], one)


@invariant
@pytest.mark.parametrize("budget,blocks", [(64, 128), (8, 128), (16, 22)])
def test_batched_greedy_equals_alone(llm, budget, blocks):
    """Small budgets chunk the prompts; 22 blocks of 4 force preemptions (recompute)."""
    ps = prompts(5, 19, 33, 1, 47, 9)
    ref = [alone(llm, p, GREEDY)["token_ids"] for p in ps]
    engine = Engine.from_llm(llm, num_blocks=blocks, block_size=4, max_step_tokens=budget)
    out = engine.generate(ps, GREEDY)
    assert [o["token_ids"] for o in out] == ref
    assert all(o["finish_reason"] == "length" and len(o["token_ids"]) == 12 for o in out)
    if blocks == 22:
        assert engine.stats()["preemptions"] > 0
    assert_pool_empty(engine)


@invariant
def test_engine_matches_single_sequence_generate(llm):
    ps = prompts(7, 30)
    out = Engine.from_llm(llm, num_blocks=64, block_size=4).generate(ps, GREEDY)
    for p, o in zip(ps, out):
        assert o["token_ids"] == llm.generate(p, GREEDY).token_ids


def test_seeded_sampling_same_alone_or_batched(llm):
    ps = prompts(6, 21, 14, 3)
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=100 + i, ignore_eos=True)
              for i in range(len(ps))]
    engine = Engine.from_llm(llm, num_blocks=128, block_size=4, max_step_tokens=16)
    batched = engine.generate(ps, params)
    for p, pp, b in zip(ps, params, batched):
        assert alone(llm, p, pp)["token_ids"] == b["token_ids"]
    again = engine.generate(ps[:1], params[:1])[0]
    assert again["token_ids"] == batched[0]["token_ids"]
    assert_pool_empty(engine)


def test_prefix_cache_reuses_blocks(llm):
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4)
    p = prompts(23)[0]
    first = engine.generate([p], GREEDY)[0]
    assert engine.stats()["prefix_hit_tokens"] == 0
    second = engine.generate([p], GREEDY)[0]
    assert engine.stats()["prefix_hit_tokens"] == 20        # 5 full blocks; the last token is recomputed
    assert second["token_ids"] == first["token_ids"]
    assert_pool_empty(engine)


def test_finish_reasons_stop_strings_and_eos(llm):
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4)
    p = prompts(10)[0]
    free = engine.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    text = free["text"]
    assert len(text) > 4
    stop = text[2:4]
    out = engine.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=(stop,)))[0]
    assert out["finish_reason"] == "stop" and out["text"] == text[:text.index(stop)]
    # an EOS / stop token id: the token that ends the sequence is not part of the output
    tok = free["token_ids"][3]
    out = engine.generate([p], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=(tok,)))[0]
    assert out["finish_reason"] == "stop" and out["token_ids"] == free["token_ids"][:free["token_ids"].index(tok)]
    assert_pool_empty(engine)


def test_logprobs_and_prompt_logprobs_match_the_model(llm):
    # prompt in 3 chunks; an fp32 cache like the model's own (test_kv_half covers fp16)
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4, max_step_tokens=8, kv_dtype="f32")
    p = prompts(19)[0]
    out = engine.generate([p], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), logprobs=3,
                          prompt_logprobs=2)[0]
    full = p + out["token_ids"]
    ref = torch.log_softmax(sequence_logits(llm.runner, full, kv_dtype=torch.float32), dim=-1)
    plp = out["prompt_logprobs"]
    assert len(plp) == len(p) and plp[0] is None
    for j in range(1, len(p)):
        assert plp[j].token_id == p[j]
        assert plp[j].logprob == pytest.approx(float(ref[j - 1, p[j]]), abs=1e-4)
        assert [t for t, _ in plp[j].top] == torch.topk(ref[j - 1], 2).indices.tolist()
    for i, lp in enumerate(out["logprobs"]):
        pos = len(p) - 1 + i
        assert lp.token_id == out["token_ids"][i] == int(ref[pos].argmax())
        assert lp.logprob == pytest.approx(float(ref[pos].max()), abs=1e-4)
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id


def test_scoring_only_request(llm):
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4)
    p = prompts(9)[0]
    out = engine.generate([p], SamplingParams(temperature=0), max_new_tokens=0, prompt_logprobs=0)[0]
    assert out["token_ids"] == [] and out["finish_reason"] == "length"
    assert len(out["prompt_logprobs"]) == 9 and out["prompt_logprobs"][0] is None
    with pytest.raises(EngineError):
        engine.add_request(p, SamplingParams(), max_new_tokens=0)
    assert_pool_empty(engine)


def test_rejects_what_cannot_run(llm):
    engine = Engine.from_llm(llm, num_blocks=8, block_size=4, max_queue=2)
    with pytest.raises(EngineError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(EngineError, match="vocabulary"):
        engine.add_request([1, 300], GREEDY)
    with pytest.raises(EngineError, match="256"):
        engine.add_request([5] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(EngineError, match="KV blocks"):
        engine.add_request([5] * 30, SamplingParams(max_tokens=10))
    engine.add_request([5], GREEDY)
    engine.add_request([5], GREEDY)
    with pytest.raises(QueueFull):
        engine.add_request([5], GREEDY)


def test_abort_frees_blocks_and_others_finish(llm):
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4)
    seen: dict[str, list] = {}

    def cb(out):
        seen.setdefault(out.request_id, []).append(out)

    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    a = engine.add_request(prompts(30)[0], params, callback=cb)
    b = engine.add_request(prompts(12, seed=1)[0], params, callback=cb)
    for _ in range(5):
        engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    engine.abort(a)
    engine.step()
    assert seen[a][-1].finished and seen[a][-1].finish_reason == "abort"
    while engine.has_work():
        engine.step()
    assert seen[b][-1].finish_reason == "length" and seen[b][-1].num_generated_tokens == 40
    engine.abort(b)          # finished: ignored
    engine.abort("nope")     # unknown: ignored
    engine.step()
    assert_pool_empty(engine)


def test_failure_in_one_request_only_fails_that_one(llm, monkeypatch):
    real = Sampler.sample_one

    def flaky(self, chunk, rows):
        if chunk.req.params.seed == 13 and chunk.sample:
            raise RuntimeError("boom")
        return real(self, chunk, rows)

    monkeypatch.setattr(Sampler, "sample_one", flaky)
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4)
    ps = prompts(5, 8, 11)
    params = [SamplingParams(temperature=0.5, max_tokens=6, seed=s, ignore_eos=True) for s in (1, 13, 2)]
    out = engine.generate(ps, params)
    assert out[1]["finish_reason"] == "error" and "boom" in out[1]["error"]
    assert [out[0]["finish_reason"], out[2]["finish_reason"]] == ["length", "length"]
    assert out[0]["token_ids"] == alone(llm, ps[0], params[0])["token_ids"]
    assert_pool_empty(engine)


def test_model_failure_fails_the_step_not_the_engine(llm, monkeypatch):
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4)
    real = engine.runner.run
    calls = {"n": 0}

    def broken(step, kv):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("kernel exploded")
        return real(step, kv)

    monkeypatch.setattr(engine.runner, "run", broken)
    out = engine.generate(prompts(6, 7), GREEDY)
    assert {o["finish_reason"] for o in out} == {"error"}
    assert_pool_empty(engine)
    monkeypatch.setattr(engine.runner, "run", real)
    assert engine.generate(prompts(6), GREEDY)[0]["finish_reason"] == "length"


def test_background_thread_streams_outputs(llm):
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4).start()
    try:
        done = threading.Event()
        pieces = []

        def cb(out):
            pieces.append(out)
            if out.finished:
                done.set()

        engine.add_request(prompts(8)[0], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), callback=cb)
        assert done.wait(30)
        assert sum(len(p.token_ids) for p in pieces) == 7 and len(pieces) == 7
        assert pieces[0].first_token_time is not None and pieces[-1].finish_time >= pieces[0].first_token_time
    finally:
        engine.shutdown()
    assert not engine.running
    assert_pool_empty(engine)


@pytest.mark.e2e
@invariant
def test_default_model_batched_greedy_equals_alone(default_llm):
    tok = default_llm.tokenizer
    msgs = ["Name three fruits.", "What is the capital of France?"]
    ps = [tok.encode_chat([{"role": "user", "content": m}]) for m in msgs]
    params = SamplingParams(temperature=0, max_tokens=5)
    engine = Engine.from_llm(default_llm, kv_memory_mb=16)
    batched = engine.generate(ps, params)
    for p, b in zip(ps, batched):
        assert Engine.from_llm(default_llm, kv_memory_mb=16).generate([p], params)[0]["token_ids"] == b["token_ids"]
    assert_pool_empty(engine)


@invariant
def test_generate_prefill_chunk_does_not_change_tokens(llm, monkeypatch):
    """generate() feeds a long prompt prefill_chunk tokens per native step; any chunk size gives the
    tokens of one whole-prompt step."""
    if not isinstance(llm.runner, NativeRunner):
        pytest.skip("the reference model's steps are bounded by ops.F32_NATIVE_MAX_M")
    prompt = prompts(45, seed=3)[0]
    out = {}
    for chunk in (None, 7, 16):
        monkeypatch.setattr(NativeRunner, "prefill_chunk", chunk)
        out[chunk] = llm.generate(prompt, temperature=0, max_tokens=10, ignore_eos=True).token_ids
    assert out[None] == out[7] == out[16] and len(out[None]) == 10


PENALIZED = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, repetition_penalty=1.6),
             SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, frequency_penalty=1.2,
                            presence_penalty=0.7),
             SamplingParams(temperature=0.8, max_tokens=14, ignore_eos=True, seed=9, presence_penalty=1.5,
                            repetition_penalty=1.2)]


def _penalized_reference(llm, prompt, params):
    """One token at a time over the whole sequence (no cache), the penalties applied by the
    reference sampler from counts kept here: the engine's bookkeeping checked against its definition."""
    from jisu.engine import sampler as ref

    vocab = llm.config.vocab_size
    seq, counts = list(prompt), torch.zeros(vocab)
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[torch.tensor(prompt)] = True
    gen = ref.make_generator(params.seed)
    for _ in range(params.max_tokens):
        logits = sequence_logits(llm.runner, seq)[-1].float()
        d = ref.filtered_dist(logits, params, counts, seen)
        tok = int(d.ids[0]) if params.is_greedy else ref.draw(d.ids, d.probs, gen.uniform(len(seq)))
        seq.append(tok)
        counts[tok] += 1
    return seq[len(prompt):]


@invariant
@pytest.mark.parametrize("which", range(len(PENALIZED)))
def test_penalties_end_to_end_through_preemption(llm, which):
    """Penalty counts are kept per request through chunked prefill, batching and recompute after a
    preemption: the engine's tokens are the reference loop's, and the penalty changes them."""
    params = PENALIZED[which]
    ps = prompts(5, 19, 33, 9, seed=4)
    ref = [_penalized_reference(llm, p, params) for p in ps[:2]]
    engine = Engine.from_llm(llm, num_blocks=24, block_size=4, max_step_tokens=16)
    out = engine.generate(ps, params)
    assert engine.stats()["preemptions"] > 0
    assert [o["token_ids"] for o in out[:2]] == ref
    for p, o in zip(ps, out):
        assert alone(llm, p, params)["token_ids"] == o["token_ids"]
    plain = SamplingParams(temperature=params.temperature, max_tokens=14, ignore_eos=True, seed=params.seed)
    assert any(alone(llm, p, plain)["token_ids"] != o["token_ids"] for p, o in zip(ps, out))
    assert_pool_empty(engine)


@invariant
def test_default_step_budget_keeps_batches_invariant(llm):
    """Without an explicit max_step_tokens the engine takes the runner's own budget (the reference
    model's is ops.F32_NATIVE_MAX_M rows, where its linears stop being batch invariant): prompts
    longer than that, batched, give each one's tokens alone."""
    ps = prompts(70, 95, 6, seed=5)
    engine = Engine.from_llm(llm, num_blocks=128, block_size=4)
    runner = engine.runner
    assert engine.scheduler.max_step_tokens == runner.max_step_tokens
    if isinstance(runner, NativeRunner) or isinstance(getattr(runner, "inner", None), NativeRunner):
        assert runner.max_step_tokens >= ops.F32_NATIVE_MAX_M
    else:
        assert runner.max_step_tokens == ops.F32_NATIVE_MAX_M
    out = engine.generate(ps, GREEDY)
    assert [o["token_ids"] for o in out] == [alone(llm, p, GREEDY)["token_ids"] for p in ps]
    assert_pool_empty(engine)
