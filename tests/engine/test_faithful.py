"""Faithful by default (engine/faithful.py): each generation step runs under precise activations
and restores the process's setting; explicit settings pass through; the KV dtype stays the fast
mode's; batched greedy equals one at a time; and on the default model the France prompt gets the
fp32 reference's tokens."""
from __future__ import annotations

import threading

import pytest
import torch

import jisu
from jisu.config import SamplingParams
from jisu.engine.batch import StepBatch
from jisu.engine.engine import Engine
from jisu.engine.faithful import FaithfulRunner
from jisu.engine.kv_cache import PagedKVCache
from jisu.engine.native_runner import NativeRunner
from jisu.errors import JisuError
from jisu.kernels import ops
from tests.fixtures import write_gguf_llama

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="needs the native kernels (jisu._kernels)")

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture
def refine():
    """The kernels' activation setting, restored after the test."""
    before = ops.get_act_refine()
    yield ops.set_act_refine
    ops.set_act_refine(before)


class Recorder:
    """A runner that records the activation setting each step ran under."""
    cfg = object()
    kv_dtype = torch.float16
    max_step_tokens = 7
    prefill_chunk = 3

    def __init__(self):
        self.seen = []

    def run(self, step, kv):
        self.seen.append(ops.get_act_refine())
        return torch.zeros(len(step.logit_rows), 5)


def test_steps_run_precise_and_restore(refine):
    refine(0.0)
    inner = Recorder()
    f = FaithfulRunner(inner)
    step = StepBatch.single([1, 2, 3], 0, [0], [2])
    assert f.run(step, None).shape == (1, 5)
    assert inner.seen == [pytest.approx(ops.PRECISE)] and ops.get_act_refine() == 0.0
    # the Runner protocol's attributes are the inner runner's
    assert (f.cfg, f.kv_dtype, f.max_step_tokens, f.prefill_chunk) == (inner.cfg, torch.float16, 7, 3)


@pytest.mark.parametrize("explicit", [ops.PRECISE, 1.5])
def test_explicit_setting_passes_through(refine, explicit):
    refine(explicit)
    inner = Recorder()
    FaithfulRunner(inner).run(StepBatch.single([1], 0, [0], [0]), None)
    assert inner.seen == [pytest.approx(explicit)] and ops.get_act_refine() == pytest.approx(explicit)


def test_setting_restored_when_the_step_fails(refine):
    refine(0.0)

    class Failing(Recorder):
        def run(self, step, kv):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        FaithfulRunner(Failing()).run(StepBatch.single([1], 0, [0], [0]), None)
    assert ops.get_act_refine() == 0.0


def test_faithful_steps_on_two_threads(refine):
    """The setting goes back to plain int8 only when the last concurrent faithful step ends."""
    refine(0.0)
    both = threading.Barrier(2)
    first_done = threading.Event()

    class Slow(Recorder):
        def run(self, step, kv):
            both.wait(timeout=10)
            if step.token_ids == [1]:
                first_done.set()
            else:
                first_done.wait(timeout=10)
            return super().run(step, kv)

    inner = Slow()
    f = FaithfulRunner(inner)
    ts = [threading.Thread(target=f.run, args=(StepBatch.single([t], 0, [0], [0]), None)) for t in (1, 2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=20)
    assert inner.seen == [pytest.approx(ops.PRECISE)] * 2 and ops.get_act_refine() == 0.0


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    return write_gguf_llama(str(tmp_path_factory.mktemp("faithful") / "q.gguf"),
                            tensor_type=gguf.GGMLQuantizationType.Q4_0)


def test_load_is_faithful_by_default(q4, refine):
    refine(0.0)
    llm, fast = jisu.load(q4), jisu.load(q4, fast=True)
    assert isinstance(llm.runner, NativeRunner) and isinstance(llm.step_runner, FaithfulRunner)
    assert fast.step_runner is fast.runner
    assert llm.step_runner.kv_dtype == torch.float16  # the fast mode's cache for quantized weights
    assert Engine.from_llm(llm, num_blocks=16).runner is llm.step_runner
    with pytest.raises(JisuError):
        jisu.load(q4, fast=True, precise=True)
    # a faithful step is the inner runner's step under ops.PRECISE, bit for bit
    ids = [5, 17, 33, 2, 9, 41, 7]
    out = {}
    for name, runner, setting in (("faithful", llm.step_runner, 0.0), ("precise", llm.runner, ops.PRECISE),
                                  ("fast", llm.runner, 0.0)):
        refine(setting)
        kv = PagedKVCache(llm.config, 1, 16, dtype=torch.float16, resident=False)
        out[name] = runner.run(StepBatch.single(ids, 0, [0], list(range(len(ids)))), kv)
    # a faithful step is the inner runner's step under ops.PRECISE, except the LM head's rows that
    # cannot be the argmax, which keep plain int8 values (kernels/test_head_rescore.py): the same
    # greedy token in each row, its logit bit for bit
    top = out["precise"].argmax(-1)
    rows = torch.arange(len(ids))
    assert torch.equal(out["faithful"].argmax(-1), top)
    assert torch.equal(out["faithful"][rows, top], out["precise"][rows, top])
    assert (out["faithful"] - out["precise"]).abs().max() < 0.5
    assert not torch.equal(out["faithful"], out["fast"])
    assert not ops.get_head_rescore()  # the head's setting went back with the activations' one


@pytest.mark.parametrize("budget,blocks", [(64, 128), (8, 128), (16, 22)])
def test_batched_greedy_equals_alone(q4, refine, budget, blocks):
    """Small budgets chunk the prompts and mix them with decode tokens; 22 blocks of 4 force
    preemptions. Each sequence's tokens are those it gets alone."""
    refine(0.0)
    llm = jisu.load(q4)
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (5, 19, 33, 1, 47, 9)]
    ref = [Engine.from_llm(llm, num_blocks=128, block_size=4).generate([p], GREEDY)[0]["token_ids"] for p in ps]
    engine = Engine.from_llm(llm, num_blocks=blocks, block_size=4, max_step_tokens=budget)
    assert [o["token_ids"] for o in engine.generate(ps, GREEDY)] == ref
    assert all(len(r) == 12 for r in ref) and ops.get_act_refine() == 0.0


@pytest.mark.e2e
def test_default_model_answers_as_the_fp32_reference(default_gguf, refine):
    """The case that made faithful the default: with plain int8 activations the default model
    answered "What is the capital of France?" with "L'Étoile, la Marseillaise, ..."."""
    refine(0.0)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ref = jisu.load(default_gguf, packed=False).chat(msgs, temperature=0, max_tokens=32)
    got = jisu.load(default_gguf).chat(msgs, temperature=0, max_tokens=32)
    assert "Paris" in ref.text
    assert got.token_ids == ref.token_ids
