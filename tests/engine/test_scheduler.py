"""Scheduling decisions without running a model: the token budget, chunked prefill, decodes
first, admission limits, preemption by recompute, and block accounting."""
from __future__ import annotations

from jisu.config import ModelConfig, SamplingParams
from jisu.engine.kv_cache import PagedKVCache
from jisu.engine.request import Request, Status
from jisu.engine.scheduler import SampleResult, Scheduler

CFG = ModelConfig(arch="llama", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=4, max_position=512)


def make(num_blocks=32, block_size=4, **kw):
    return Scheduler(PagedKVCache(CFG, num_blocks, block_size), **kw)


def req(name, n_prompt, max_tokens=50):
    return Request(name, list(range(1, n_prompt + 1)), SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                        ignore_eos=True))


def run_step(s: Scheduler, token=7):
    batch = s.schedule()
    results = [SampleResult(token_id=token if c.sample else None) for c in batch.chunks]
    s.update(batch, results)
    return batch


def shape(batch):
    return [(c.req.id, c.num_tokens) for c in batch.chunks]


def test_long_prompt_is_chunked_and_decodes_go_first():
    s = make(max_step_tokens=8)
    a = req("a", 3)
    s.add(a)
    assert shape(run_step(s)) == [("a", 3)]                 # a's prompt, then a decodes
    s.add(req("long", 20))
    assert shape(run_step(s)) == [("a", 1), ("long", 7)]
    assert shape(run_step(s)) == [("a", 1), ("long", 7)]
    batch = run_step(s)
    assert shape(batch) == [("a", 1), ("long", 6)]          # the last chunk samples the first token
    assert batch.chunks[1].sample
    assert shape(run_step(s)) == [("a", 1), ("long", 1)]
    assert all(b.num_tokens <= 8 for b in [batch])


def test_max_num_seqs_limits_admission():
    s = make(max_step_tokens=64, max_num_seqs=2)
    for name in "abc":
        s.add(req(name, 2))
    assert [c.req.id for c in run_step(s).chunks] == ["a", "b"]
    assert [r.id for r in s.waiting] == ["c"]


def test_preemption_frees_the_newest_and_recomputes_its_tokens():
    s = make(num_blocks=4, block_size=4, max_step_tokens=64)
    a, b = req("a", 4), req("b", 4)
    s.add(a)
    s.add(b)
    run_step(s)                                             # both prompts: 2 blocks, a and b have 1 token each
    assert s.num_blocks_used == 2 and len(a.output_ids) == 1
    run_step(s)                                             # each needs a second block: 4 used
    assert s.num_blocks_used == 4
    for _ in range(3):
        run_step(s)                                         # fills both second blocks (8 positions each)
    assert len(a.tokens) == 9 and a.num_computed == 8
    batch = run_step(s)                                     # a needs a 3rd block: b (newest) is preempted
    assert b.status is Status.WAITING and b.num_preemptions == 1 and s.waiting[0] is b
    assert b.num_computed == 0 and b.seq.block_table == []
    assert shape(batch) == [("a", 1)]
    generated = list(b.output_ids)
    assert b.tokens == b.prompt_ids + generated             # recomputed with its generated tokens
    while s.running:
        run_step(s)
        if len(a.output_ids) >= 50:
            break
    assert s.num_preemptions >= 1


def test_everything_returns_to_the_pool():
    s = make(num_blocks=12, block_size=4, max_step_tokens=6)
    reqs = [req(f"r{i}", 3 + 2 * i, max_tokens=5 + i) for i in range(5)]
    for r in reqs:
        s.add(r)
    s.abort(reqs[4])
    for _ in range(200):
        if not s.has_work():
            break
        run_step(s)
    assert not s.has_work()
    assert all(r.finished for r in reqs)
    assert [r.finish_reason for r in reqs] == ["length"] * 4 + ["abort"]
    assert [len(r.output_ids) for r in reqs[:4]] == [5, 6, 7, 8]
    assert s.num_blocks_used == 0


def test_abort_running_request_frees_at_once():
    s = make()
    a = req("a", 9)
    s.add(a)
    run_step(s)
    assert s.num_blocks_used == 3
    out = s.abort(a)
    assert out.finished and out.finish_reason == "abort" and s.num_blocks_used == 0
    assert s.abort(a) is None


def test_sampler_error_fails_only_that_request():
    s = make()
    a, b = req("a", 3), req("b", 3)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    outs = s.update(batch, [SampleResult(token_id=5), SampleResult(error="boom")])
    assert [o.finish_reason for o in outs] == [None, "error"]
    assert b.finished and not a.finished and s.running == [a]
    assert s.num_blocks_used == 1


def test_prompts_that_fill_the_pool_cannot_deadlock():
    """Two prompts admitted together and each half prefilled, with the pool exhausted: the newest
    is preempted so the oldest can go on; both finish and every block comes back."""
    s = make(num_blocks=6, block_size=4, max_step_tokens=64)
    a, b = req("a", 14, max_tokens=4), req("b", 9, max_tokens=4)
    s.add(a)
    s.add(b)
    batch = s.schedule()            # a: 14 tokens (4 blocks); b's 9 do not fit in the 2 left: waits
    assert shape(batch) == [("a", 14)] and list(s.waiting) == [b]
    s.update(batch, [SampleResult(token_id=7)])
    # force the situation a careless scheduler deadlocks in: both running, both mid-prompt, no
    # free block (3 full blocks each)
    s2 = make(num_blocks=6, block_size=4, max_step_tokens=8)
    a2, b2 = req("a", 14, max_tokens=4), req("b", 14, max_tokens=4)
    for r in (a2, b2):
        s2.kv.reserve(r.seq, 12)
        r.num_computed = 12
        r.status = Status.RUNNING
        s2.running.append(r)
    assert s2.kv.num_free_blocks == 0
    batch = run_step(s2)
    assert shape(batch) == [("a", 2)] and b2.status is Status.WAITING and b2.num_preemptions == 1
    for _ in range(100):
        if not s2.has_work():
            break
        run_step(s2)
    assert a2.finish_reason == b2.finish_reason == "length"
    assert len(a2.output_ids) == len(b2.output_ids) == 4
    assert s2.num_blocks_used == 0
