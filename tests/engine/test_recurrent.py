"""The engine on an LSTM (jisu.engine.recurrent): the state per position in the paged cache gives the
same tokens alone or batched, chunked or not, preempted, prefix-cached, speculated or forked; an
abort returns the sequence's blocks; float32 and int8 (packed) weights."""
from __future__ import annotations

import pytest
import torch

import jisu
from jisu.api import LLM
from jisu.config import SamplingParams
from jisu.engine.batch import StepBatch
from jisu.engine.engine import Engine
from jisu.engine.kv_cache import PagedKVCache
from jisu.engine.recurrent import RecurrentRunner
from jisu.engine.runner import make_runner, sequence_logits
from jisu.io.sources import resolve
from jisu.io.student import save_student, source_config
from jisu.kernels import ops
from jisu.kernels.formats import Int8Weight
from jisu.kernels.packed import pack
from jisu.models.lstm import LSTMModel, linear_names, parse_student, student_from_teacher
from tests.compress.conftest import write_tiny_hf

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not ops.native_available(), reason="batch invariance needs the native kernels")]

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def lively_student(teacher: str, seed: int = 0):
    """A random student whose recurrent weights are large enough that its tokens keep changing."""
    torch.manual_seed(seed)
    from safetensors.torch import load_file

    embed = load_file(f"{teacher}/model.safetensors")["model.embed_tokens.weight"]
    m = student_from_teacher(parse_student("lstm:layers=2,hidden=96"), source_config(resolve(teacher)), embed)
    with torch.no_grad():
        for name, p in m.model.lstm.named_parameters():
            p.mul_(4.0)
    return m


@pytest.fixture(scope="module", params=["f32", "int8"])
def llm(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("recurrent")
    teacher = write_tiny_hf(str(root / "teacher"))
    save_student(lively_student(teacher), root / "student", tokenizer_from=teacher, meta={})
    llm = jisu.load(str(root / "student"))
    if request.param == "f32":
        return llm
    names = set(linear_names(llm.config))
    w = {n: pack(Int8Weight.quantize_rtn(t, 32)) if n in names else t for n, t in llm.model.weights().items()}
    model = LSTMModel(llm.config, w)
    assert not model.trainable
    return LLM(model, llm.tokenizer, llm.source, make_runner(model))


def prompts(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 290, (n,), generator=g).tolist() for n in lengths]


def alone(llm, prompt, params, **kw):
    return Engine.from_llm(llm, num_blocks=128, block_size=4, speculative="off").generate([prompt], params, **kw)[0]


def assert_pool_empty(engine):
    s = engine.stats()
    assert s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0, s


def test_runner_is_recurrent(llm):
    assert isinstance(llm.runner, RecurrentRunner)
    assert llm.runner.kv_dtype == torch.float32


def test_logit_rows_do_not_depend_on_batch_or_chunks(llm):
    """The logits of a sequence scored alone one token per step, in chunks of 5, or all at once,
    and batched with another sequence, are the same bits."""
    runner = llm.runner
    a, b = prompts(13, 7)
    ref = sequence_logits(runner, a, chunk=1)
    assert not torch.equal(ref[0], ref[1])
    for chunk in (5, 13):
        assert torch.equal(sequence_logits(runner, a, chunk=chunk), ref)
    kv = PagedKVCache(runner.cfg, 8, 4)
    step = StepBatch(b + a, [len(b), len(a)], [0, 0], [[0, 1], [2, 3, 4, 5]],
                     list(range(len(b) + len(a))), [0, 0])
    both = runner.run(step, kv)
    assert torch.equal(both[len(b):], ref)
    assert torch.equal(both[:len(b)], sequence_logits(runner, b, chunk=1))
    with torch.no_grad():
        model = llm.model(torch.tensor([a]))[0][0]
    assert torch.allclose(ref, model, atol=1e-4)   # the engine = the model's own forward


@pytest.mark.parametrize("budget,blocks", [(64, 128), (8, 128), (16, 22)])
def test_batched_greedy_equals_alone(llm, budget, blocks):
    """Small budgets chunk the prompts; 22 blocks of 4 force preemptions (recompute)."""
    ps = prompts(5, 19, 33, 1, 47, 9)
    ref = [alone(llm, p, GREEDY)["token_ids"] for p in ps]
    assert len({tuple(r) for r in ref}) == len(ref) and sum(len(set(r)) > 2 for r in ref) > len(ref) // 2
    engine = Engine.from_llm(llm, num_blocks=blocks, block_size=4, max_step_tokens=budget, speculative="off")
    out = engine.generate(ps, GREEDY)
    assert [o["token_ids"] for o in out] == ref
    if blocks == 22:
        assert engine.stats()["preemptions"] > 0
    assert_pool_empty(engine)


def test_engine_matches_generate_and_model(llm):
    p = prompts(11)[0]
    out = Engine.from_llm(llm, num_blocks=64, block_size=4).generate([p], GREEDY)[0]
    assert out["token_ids"] == llm.generate(p, GREEDY).token_ids
    old = ops.get_act_refine()
    ops.set_act_refine(ops.PRECISE)   # the activations of generation's (faithful) steps
    try:
        with torch.no_grad():
            logits = llm.model(torch.tensor([p + out["token_ids"]]))[0][0]
    finally:
        ops.set_act_refine(old)
    assert logits[len(p) - 1:-1].argmax(-1).tolist() == out["token_ids"]


def test_seeded_sampling_same_alone_or_batched(llm):
    ps = prompts(6, 21, 14, 3)
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=100 + i, ignore_eos=True)
              for i in range(len(ps))]
    engine = Engine.from_llm(llm, num_blocks=128, block_size=4, max_step_tokens=16)
    batched = engine.generate(ps, params)
    for p, pp, got in zip(ps, params, batched):
        assert alone(llm, p, pp)["token_ids"] == got["token_ids"]
    assert_pool_empty(engine)


def test_prefix_cache_resumes_from_the_cached_state(llm):
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4)
    p = prompts(23)[0]
    first = engine.generate([p], GREEDY)[0]
    second = engine.generate([p], GREEDY)[0]
    assert engine.stats()["prefix_hit_tokens"] == 20
    assert second["token_ids"] == first["token_ids"]
    assert_pool_empty(engine)


def test_speculation_rolls_the_state_back(llm):
    """n-gram drafts verified in one chunk, rejected ones truncated: the tokens of plain decoding."""
    p = prompts(9)[0] * 4   # repeats: the n-gram proposer finds drafts
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, speculative="ngram")
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4)
    out = engine.generate([p], params)[0]
    assert engine.stats()["spec_drafted_tokens"] > 0
    assert out["token_ids"] == alone(llm, p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))["token_ids"]
    assert_pool_empty(engine)


def test_forks_and_beams_run(llm):
    p = prompts(10)[0]
    params = [SamplingParams(temperature=1.0, max_tokens=6, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4)
    ids = engine.add_forks(p, params)
    while engine.has_work():
        engine.step()
    assert len(ids) == 3
    assert_pool_empty(engine)
    beams = llm.generate(p, temperature=0, max_tokens=6, num_beams=3, num_return_sequences=2, ignore_eos=True)
    assert len(beams.beams) == 2 and beams.token_ids == beams.beams[0].token_ids


def test_abort_frees_the_state(llm):
    engine = Engine.from_llm(llm, num_blocks=64, block_size=4)
    seen: dict[str, list] = {}
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    a = engine.add_request(prompts(30)[0], params, callback=lambda o: seen.setdefault(o.request_id, []).append(o))
    b = engine.add_request(prompts(12, seed=1)[0], params,
                           callback=lambda o: seen.setdefault(o.request_id, []).append(o))
    for _ in range(5):
        engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    engine.abort(a)
    engine.step()
    assert seen[a][-1].finish_reason == "abort"
    while engine.has_work():
        engine.step()
    assert seen[b][-1].num_generated_tokens == 40
    assert_pool_empty(engine)


def test_f16_state_cache_keeps_batch_invariance(llm):
    ps = prompts(5, 19, 33)
    kw = dict(num_blocks=128, block_size=4, kv_dtype="f16", speculative="off")
    ref = [Engine.from_llm(llm, **kw).generate([p], GREEDY)[0]["token_ids"] for p in ps]
    out = Engine.from_llm(llm, max_step_tokens=8, **kw).generate(ps, GREEDY)
    assert [o["token_ids"] for o in out] == ref
