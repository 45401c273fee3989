"""Beam search (engine/beam.py) against transformers' generate(num_beams=..., do_sample=False): the
returned beams token for token and their scores within 1e-4, on the tiny random model and on the
default model (its fp32 path; precise=True within 1e-3); beams batched with greedy requests (and preempted) change
nobody's tokens; copy-on-write forks keep the KV blocks shared; best-of-n forks prefill once."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

import jisu
from jisu.config import SamplingParams
from jisu.engine.beam import beam_blocks_needed
from jisu.engine.engine import Engine, EngineError
from jisu.engine.kv_cache import PagedKVCache
from jisu.errors import JisuError
from jisu.kernels import ops
from tests.fixtures import write_hf_llama

transformers = pytest.importorskip("transformers", reason="the beam search reference is transformers' generate")
invariant = pytest.mark.skipif(not ops.native_available(),
                               reason="batch invariance needs the native kernels (jisu._kernels)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(jisu LLM, transformers model) on the same tiny random Llama."""
    path = write_hf_llama(str(tmp_path_factory.mktemp("beam")))
    from transformers import AutoModelForCausalLM

    return jisu.load(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def beam_params(nb, lp=1.0, es=False, max_new=10, stop=(), **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_new, num_beams=nb, length_penalty=lp, early_stopping=es,
                          num_return_sequences=nb, stop_token_ids=tuple(stop), **kw)


@torch.inference_mode()
def hf_beams(model, prompt: list[int], nb, lp, es, max_new, eos: list[int]) -> list[tuple[list[int], str, float]]:
    """transformers' beam search: (generated ids without the stop token, finish reason, score) per beam."""
    from transformers import GenerationConfig

    config = GenerationConfig(num_beams=nb, num_return_sequences=nb, do_sample=False, length_penalty=lp,
                              early_stopping=es, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos[0],
                              output_scores=True, return_dict_in_generate=True)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         generation_config=config)
    beams = []
    for seq, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        gen = seq[len(prompt):]
        cut = next((i for i, t in enumerate(gen) if t in eos), None)
        beams.append((gen if cut is None else gen[:cut], "length" if cut is None else "stop", score))
    return beams


def assert_same_beams(got, want, what="", tol=1e-4, per_token=0.0):
    """Same beams, token for token, and scores within tol (+ per_token for each generated token: two
    fp32 implementations' log-probs differ by ~1e-6 each, and a score sums them)."""
    assert [(b.token_ids, b.finish_reason) for b in got] == [(ids, r) for ids, r, _ in want], what
    for b, (_, _, score) in zip(got, want):
        scale = abs(b.score / b.cumulative_logprob) if b.cumulative_logprob else 1.0   # the length penalty's factor
        assert abs(b.score - score) < tol + per_token * len(b.token_ids) * scale, (what, b.score, score)


def tiny_prompt(n=9, seed=0):
    return torch.randint(3, 290, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_log_softmax_and_top_k_helpers():
    import numpy as np

    from jisu.engine.beam import log_softmax, top_k

    x = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 5
    assert np.allclose(log_softmax(x.numpy()), torch.log_softmax(x, -1).numpy(), atol=1e-5)
    vals, idx = torch.topk(x, 7)
    assert top_k(x.numpy(), 7).tolist() == idx.tolist()
    assert top_k(np.array([1.0, 3.0, 3.0, 2.0], np.float32), 3).tolist() == [1, 2, 3]   # ties: lower index first
    assert top_k(np.array([1.0, 2.0], np.float32), 2).tolist() == [1, 0]


# --- the tiny random model ---------------------------------------------------------------------------

CASES = [(2, 1.0, False), (2, 0.0, True), (4, 1.0, False), (4, 2.0, "never"), (4, -1.0, True),
         (4, 0.5, "never"), (8, 1.0, False), (8, 1.5, True), (8, -0.5, "never")]


@pytest.mark.parametrize("nb,lp,es", CASES)
def test_tiny_beams_equal_transformers(tiny, nb, lp, es):
    """Two stop tokens the random model likes, so beams end at different lengths."""
    llm, hf = tiny
    prompt = tiny_prompt()
    stop = [297, 87]
    eos = sorted(set(llm.eos_ids) | set(stop))
    for max_new in (1, 12):
        got = llm.generate(prompt, beam_params(nb, lp, es, max_new, stop)).beams
        assert_same_beams(got, hf_beams(hf, prompt, nb, lp, es, max_new, eos), (nb, lp, es, max_new))


def test_num_return_sequences_and_the_best_as_the_text(tiny):
    llm, hf = tiny
    prompt = tiny_prompt(seed=3)
    full = llm.generate(prompt, beam_params(4, max_new=8)).beams
    c = llm.generate(prompt, SamplingParams.build(beam_params(4, max_new=8), num_return_sequences=2))
    assert [b.token_ids for b in c.beams] == [b.token_ids for b in full[:2]]
    assert c.token_ids == full[0].token_ids and c.text == c.beams[0].text
    assert llm.tokenizer.decode(full[0].token_ids).startswith(c.text)   # (a partial UTF-8 tail held back)
    assert c.beams[0].score >= c.beams[1].score
    assert c.beams[0].cumulative_logprob == pytest.approx(c.beams[0].score * 8, abs=1e-4)  # length_penalty 1


@invariant
@pytest.mark.parametrize("blocks", [256, 26])
def test_beams_batched_with_greedy_requests(tiny, blocks):
    """Greedy requests keep their tokens beside two beam groups; beam results equal their runs alone.
    26 blocks of 4 force preemptions (beams and greedy requests recompute)."""
    llm, _ = tiny
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ps = [tiny_prompt(n, seed=n) for n in (5, 19, 33, 7)]
    bp = [beam_params(4, 1.0, False, 12, [297]), beam_params(3, 0.5, "never", 10)]
    bprompts = [tiny_prompt(11, seed=5), tiny_prompt(6, seed=6)]

    def engine(n):
        return Engine.from_llm(llm, num_blocks=n, block_size=4, max_step_tokens=16)
    alone = [engine(256).generate([p], greedy)[0]["token_ids"] for p in ps]
    beams_alone = [engine(256).generate([p], q)[0]["sequences"] for p, q in zip(bprompts, bp)]
    e = engine(blocks)
    out = e.generate([ps[0], bprompts[0], ps[1], ps[2], bprompts[1], ps[3]],
                     [greedy, bp[0], greedy, greedy, bp[1], greedy])
    assert [out[i]["token_ids"] for i in (0, 2, 3, 5)] == alone
    for o, want in zip((out[1], out[4]), beams_alone):
        assert o["error"] is None
        assert [(b.token_ids, b.score) for b in o["sequences"]] == [(b.token_ids, b.score) for b in want]
    if blocks == 26:
        assert e.stats()["preemptions"] > 0
    s = e.stats()
    assert s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0, s


def test_fork_shares_blocks_and_copies_the_tail_once(tiny):
    llm, _ = tiny
    kv = PagedKVCache(llm.config, num_blocks=8, block_size=4)
    from jisu.engine.kv_cache import SeqBlocks

    a = SeqBlocks()
    kv.reserve(a, 6)                               # 2 blocks, the second half full
    b = kv.fork(a)
    assert b.block_table == a.block_table and kv.num_free_blocks == 6
    assert kv.room(b) == 2 + 5 * 4                 # the shared tail is copied before a write
    kv.reserve(b, 1)
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    assert kv.num_free_blocks == 5
    kv.reserve(a, 1)                               # now a's tail is its own again: no copy
    assert kv.num_free_blocks == 5
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 8


def test_abort_frees_every_beam(tiny):
    llm, _ = tiny
    e = Engine.from_llm(llm, num_blocks=128, block_size=4)
    seen = []
    rid = e.add_request(tiny_prompt(), beam_params(4, max_new=20), callback=seen.append)
    for _ in range(4):
        e.step()
    assert e.stats()["running"] == 4
    e.abort(rid)
    e.step()
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    s = e.stats()
    assert s["kv_blocks_used"] == 0 and s["running"] == 0, s


def test_rejects_what_beam_search_cannot_take(tiny):
    llm, _ = tiny
    e = Engine.from_llm(llm, num_blocks=16, block_size=4)
    p = tiny_prompt()
    with pytest.raises(EngineError, match="logprobs"):
        e.add_request(p, beam_params(2), logprobs=1)
    with pytest.raises(EngineError, match="stop strings"):
        e.add_request(p, SamplingParams.build(beam_params(2), stop=("x",)))
    with pytest.raises(EngineError, match="KV blocks"):
        e.add_request(p, beam_params(8, max_new=40))
    with pytest.raises(JisuError, match="temperature"):
        SamplingParams(num_beams=2)
    with pytest.raises(JisuError, match="num_return_sequences"):
        SamplingParams(temperature=0, num_beams=2, num_return_sequences=3)
    with pytest.raises(JisuError, match="early_stopping"):
        SamplingParams(temperature=0, num_beams=2, early_stopping="sometimes")
    assert e.stats()["waiting"] == 0


def test_best_of_forks_prefill_once(tiny):
    """n seeded candidates forked from one prefill sample what n separate requests sample."""
    llm, _ = tiny
    p = tiny_prompt(23)
    params = [SamplingParams(temperature=1.0, max_tokens=6, seed=7 + j, ignore_eos=True) for j in range(4)]
    e = Engine.from_llm(llm, num_blocks=64, block_size=4, prefix_caching=False)
    separate = e.generate([p] * 4, params)
    tokens = []
    run = e.runner.run
    e.runner.run = lambda batch, kv: (tokens.append(batch.num_tokens), run(batch, kv))[1]
    try:
        results = {}
        ids = e.add_forks(p, params, callback=lambda out: results.setdefault(out.request_id, []).extend(
            out.token_ids))
        while e.has_work():
            e.step()
    finally:
        del e.runner.run
    assert [results[i] for i in ids] == [s["token_ids"] for s in separate]
    assert sum(tokens) == len(p) + 4 * 5                       # the prompt once, then 4 x 5 decodes
    assert e.stats()["kv_blocks_used"] == 0


# --- the default model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def precise_llm(default_gguf):
    before = ops.get_act_refine()
    llm = jisu.load(default_gguf, precise=True)
    yield llm
    ops.set_act_refine(before)
    del llm
    gc.collect()  # its weights go before the next module's fixtures load


@pytest.fixture(scope="module")
def default_hf(default_gguf, request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.test_default_model import _reference_dir

    folder = _reference_dir(default_gguf, request, tmp_path_factory)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    yield model
    del model
    gc.collect()


QUESTIONS = {"capital": "What is the capital of France?", "poem": "Write a two-line poem about the sea."}
DEFAULT_CASES = [("capital", 2, 1.0, False), ("poem", 2, 0.5, "never"), ("capital", 4, 2.0, "never"),
                 ("poem", 4, 0.0, True), ("poem", 8, 1.0, False), ("capital", 8, -0.5, True)]


def chat_ids(llm, name):
    return llm.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[name]}])


@pytest.mark.e2e
@pytest.mark.parametrize("name,nb,lp,es", DEFAULT_CASES)
def test_default_model_beams_equal_transformers(default_llm_fp32, default_hf, name, nb, lp, es):
    """The fp32 path (every tensor dequantized: what --precise computes up to its ~15-bit activations)
    against transformers on the same weights: every returned beam, scores within 1e-4 + 1e-5 per token."""
    prompt = chat_ids(default_llm_fp32, name)
    got = default_llm_fp32.generate(prompt, beam_params(nb, lp, es, 24)).beams
    want = hf_beams(default_hf, prompt, nb, lp, es, 24, sorted(default_llm_fp32.eos_ids))
    assert_same_beams(got, want, (name, nb, lp, es), per_token=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("name,nb,lp,es", [("capital", 4, 1.0, False)])
def test_default_model_precise_beams_equal_transformers(precise_llm, default_hf, name, nb, lp, es):
    """precise=True (the packed Q4_1 kernels with refined activations, fp32 KV): the same beams; its
    activations carry ~15 bits, so the scores agree within 1e-3."""
    prompt = chat_ids(precise_llm, name)
    got = precise_llm.generate(prompt, beam_params(nb, lp, es, 24)).beams
    want = hf_beams(default_hf, prompt, nb, lp, es, 24, sorted(precise_llm.eos_ids))
    assert_same_beams(got, want, (name, nb, lp, es), tol=1e-3)


@pytest.mark.e2e
def test_default_model_beam4_kv_blocks(precise_llm):
    """beam-4 on a 512-token prompt + 128 new tokens holds <= 1.35x one sequence's KV blocks."""
    e = Engine.from_llm(precise_llm, block_size=16, prefix_caching=False)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    prompt = (precise_llm.tokenizer.encode(readme) * 4)[:512]     # (as benchmarks/bench_beam.py)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True, num_beams=4)
    peak, schedule = 0, e.scheduler.schedule

    def watched():  # the most blocks held: right after scheduling, copy-on-write copies made
        nonlocal peak
        batch = schedule()
        peak = max(peak, e.scheduler.num_blocks_used)
        return batch
    e.scheduler.schedule = watched
    out = e.generate([prompt], params)[0]
    one = -(-(512 + 128) // 16)
    assert len(out["sequences"][0].token_ids) == 128
    assert peak <= 1.35 * one, (peak, one)
    assert peak <= beam_blocks_needed(512, 128, 4, 16)
    assert e.stats()["kv_blocks_used"] == 0


# --- the server's extras -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny):
    from jisu.serve.app import create_app
    from tests.serve.conftest import running

    app = create_app(tiny[0], kv_memory_mb=1, max_concurrency=8)
    with running(app) as (url, _):
        yield url


def post(url, path, body):
    import httpx

    return httpx.post(url + path, json=body, timeout=60)


def test_server_beam_search_completions_and_chat(server, tiny):
    llm, _ = tiny
    prompt = tiny_prompt(seed=4)
    want = llm.generate(prompt, SamplingParams.build(beam_params(4, 0.5, "never", 8), num_return_sequences=2)).beams
    body = {"prompt": prompt, "max_tokens": 8, "n": 2, "best_of": 4, "use_beam_search": True, "length_penalty": 0.5,
            "early_stopping": "never"}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert [(c["text"], c["finish_reason"]) for c in r.json()["choices"]] == [(b.text, b.finish_reason) for b in want]
    msgs = [{"role": "user", "content": "hello"}]
    want = llm.generate(llm.tokenizer.encode_chat(msgs), beam_params(3, max_new=6)).beams
    r = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 6, "n": 3, "use_beam_search": True})
    assert r.status_code == 200, r.text
    assert [c["message"]["content"] for c in r.json()["choices"]] == [b.text for b in want]


@pytest.mark.parametrize("body,param,needle", [
    ({"stream": True}, "stream", "streamed"),
    ({"temperature": 0.7}, "temperature", "temperature"),
    ({"n": 3, "best_of": 2}, "best_of", "best_of"),
    ({"logprobs": 2}, None, "logprobs"),
    ({"stop": "x"}, None, "stop strings"),
    ({"presence_penalty": 0.5}, None, "penalty"),
    ({"best_of": 9}, "best_of", ""),
    ({"early_stopping": "sometimes"}, "early_stopping", ""),
])
def test_server_refuses_what_beam_search_cannot_do(server, body, param, needle):
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "use_beam_search": True, "best_of": 2,
                                         **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and (param is None or err["param"] == param), err
    ok = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200


def test_server_best_of_forks(server):
    """best_of candidates fork one prefill; seeded, they repeat."""
    body = {"prompt": "the cat", "max_tokens": 5, "n": 2, "best_of": 3, "seed": 11, "temperature": 1.0}
    a, b = post(server, "/v1/completions", body), post(server, "/v1/completions", body)
    assert a.status_code == 200 and len(a.json()["choices"]) == 2
    assert [c["text"] for c in a.json()["choices"]] == [c["text"] for c in b.json()["choices"]]
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "best_of": 3,
                                               "max_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
