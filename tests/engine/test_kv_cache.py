"""Paged KV cache: a batch of sequences in blocks gives the same logits as each sequence alone in
a static cache; blocks are accounted for (prefix reuse, rollback, copy-on-write, free)."""
from __future__ import annotations

import pytest
import torch

import jisu
from jisu.engine.batch import StepBatch
from jisu.engine.kv_cache import OutOfBlocks, PagedKVCache, SeqBlocks
from jisu.engine.runner import sequence_logits
from tests.fixtures import write_hf_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The runner jisu.load picks (the native step when built)."""
    return jisu.load(write_hf_llama(str(tmp_path_factory.mktemp("kv")))).runner


def static_logits(runner, tokens: list[int]) -> torch.Tensor:
    return sequence_logits(runner, tokens)


def step(runner, kv, seqs, chunks):
    """Run one paged step: chunks[i] are sequence i's new tokens."""
    starts = [s.num_tokens for s in seqs]
    for s, c in zip(seqs, chunks):
        kv.reserve(s, len(c))
    flat = [t for c in chunks for t in c]
    batch = StepBatch(flat, [len(c) for c in chunks], starts, [s.block_table for s in seqs],
                      list(range(len(flat))), [0] * len(seqs))
    return runner.run(batch, kv)


def test_paged_batch_matches_static(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (5, 19, 33)]
    kv = PagedKVCache(model.cfg, num_blocks=32, block_size=4)
    seqs = [SeqBlocks() for _ in prompts]
    # chunked prefill: the long prompt arrives in two pieces while the others finish
    out1 = step(model, kv, seqs, [prompts[0], prompts[1], prompts[2][:20]])
    out2 = step(model, kv, seqs, [[7], [8], prompts[2][20:]])
    full = [prompts[0] + [7], prompts[1] + [8], prompts[2]]
    ref = [static_logits(model, f) for f in full]
    torch.testing.assert_close(out1[:5], ref[0][:5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1[5:24], ref[1][:19], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1[24:], ref[2][:20], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2[0], ref[0][5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2[1], ref[1][19], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2[2:], ref[2][20:], rtol=1e-5, atol=1e-5)
    for s in seqs:
        kv.free(s)
    assert kv.num_free_blocks == 32


def test_prefix_reuse_and_rollback(model):
    kv = PagedKVCache(model.cfg, num_blocks=16, block_size=4)
    prompt = list(range(10, 23))                     # 13 tokens: 3 full blocks
    a = SeqBlocks()
    step(model, kv, [a], [prompt])
    kv.commit_prefix(a, prompt)
    assert a.num_hashed == 3
    b = SeqBlocks()
    reused = kv.match_prefix(b, prompt[:12] + [99, 98])
    assert reused == 12 and b.block_table == a.block_table[:3]
    out = step(model, kv, [b], [[99, 98]])
    ref = static_logits(model, prompt[:12] + [99, 98])
    torch.testing.assert_close(out, ref[12:], rtol=1e-5, atol=1e-5)
    # roll b back into a shared block: it gets a private copy, a's blocks are untouched
    kv.truncate(b, 10)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    out = step(model, kv, [b], [[5, 6]])
    torch.testing.assert_close(out, static_logits(model, prompt[:10] + [5, 6])[10:], rtol=1e-5, atol=1e-5)
    out = step(model, kv, [a], [[1]])
    torch.testing.assert_close(out[0], static_logits(model, prompt + [1])[-1], rtol=1e-5, atol=1e-5)
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 16
    # the freed prefix is still findable until its blocks are needed
    c = SeqBlocks()
    assert kv.match_prefix(c, prompt) == 12
    kv.free(c)


def test_out_of_blocks_is_all_or_nothing(model):
    kv = PagedKVCache(model.cfg, num_blocks=2, block_size=4)
    s = SeqBlocks()
    kv.reserve(s, 6)
    with pytest.raises(OutOfBlocks):
        kv.reserve(s, 5)
    assert s.num_tokens == 6 and len(s.block_table) == 2
    kv.free(s)
    assert kv.num_free_blocks == 2
