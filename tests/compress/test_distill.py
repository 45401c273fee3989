"""The distillation loop (jisu.compress.distill): its binned KL, the teacher-target cache, that a few
steps lower the KL of a tiny student, that a run stopped by a crash and rerun ends with the weights of
an uninterrupted run, block-local reconstruction, and the one-line errors of a bad budget."""
from __future__ import annotations

import os

import pytest
import torch

from jisu.compress.distill import (DistillConfig, as_student, bin_divergence, distill, heldout_divergence,
                                   heldout_perplexity)
from jisu.compress.distill_cache import CACHE_ENV, Targets, module_teacher, teacher_targets
from jisu.compress.tune import coarse_kl
from jisu.errors import JisuError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 40


class TinyLM(torch.nn.Module):
    """embedding -> LSTM -> linear: forward returns (logits, state) like jisu's LSTM model."""

    def __init__(self, seed: int, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.e = torch.nn.Embedding(V, 16)
        self.rnn = torch.nn.LSTM(16, 24, batch_first=True)
        self.out = torch.nn.Linear(24, V)
        self.scale = scale

    def forward(self, ids):
        y, state = self.rnn(self.e(ids))
        return self.out(y) * self.scale, state


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _data(n=12, t=20, seed=0):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def test_bin_divergence_forward_is_tunes_kl_and_zero_on_itself():
    torch.manual_seed(2)
    a, b = torch.randn(5, 100) * 3, torch.randn(5, 100) * 3
    lp = torch.log_softmax(a, -1)
    v, ix = lp.topk(8, -1)
    t = Targets(v, ix, 1 - v.exp().sum(-1))
    assert torch.allclose(bin_divergence(b, t).mean(), coarse_kl(b, v, ix), atol=1e-5)
    for kind in ("forward", "reverse"):
        assert float(bin_divergence(a, t, kind).abs().max()) < 1e-5
        assert float(bin_divergence(b, t, kind).min()) > 0
        assert float(bin_divergence(b, t, kind, temperature=2.0).min()) > 0


def test_targets_are_cached_once_per_teacher_ids_and_k(cache):
    teacher, ids = TinyLM(0, 3.0), _data()
    calls = []

    def compute(x, k, hidden):
        calls.append(x.shape[0])
        return module_teacher(teacher)(x, k, hidden)

    t1, i1 = teacher_targets("teacher-a", ids, compute, k=8)
    t2, i2 = teacher_targets("teacher-a", ids, compute, k=8)
    assert not i1["cached"] and i2["cached"] and i1["folder"] == i2["folder"] and sum(calls) == ids.shape[0]
    assert torch.equal(t1.lp, t2.lp) and torch.equal(t1.ix, t2.ix) and t1.lp.dtype == torch.float16
    assert t1.lp.shape == (12, 20, 8) and float(t1.rest.min()) >= 0
    assert teacher_targets("teacher-a", ids, compute, k=4)[1]["folder"] != i1["folder"]
    assert teacher_targets("teacher-b", ids, compute, k=8)[1]["folder"] != i1["folder"]
    assert not [f for f in os.listdir(i1["folder"]) if ".tmp" in f]


def test_a_few_steps_lower_the_kl_of_a_tiny_student():
    teacher, ids = TinyLM(0, 3.0), _data()
    targets, _ = teacher_targets("t", ids, module_teacher(teacher), k=8)
    student = TinyLM(1)
    before = heldout_divergence(student, ids, targets)
    info = distill(student, ids, targets, DistillConfig(tokens=8 * 4 * 20, lr=1e-2, eval_every=0),
                   evaluate=lambda: heldout_divergence(student, ids, targets))
    assert info["steps"] == 8 and info["tokens"] == 640 and info["curve"][0]["value"] == pytest.approx(before)
    assert info["curve"][-1]["value"] < 0.8 * before
    assert [c["tokens"] for c in info["curve"]] == sorted(c["tokens"] for c in info["curve"])


@pytest.mark.parametrize("kw", [dict(kl="reverse"), dict(ce=0.5), dict(kl_weight=0.0, ce=1.0)])
def test_other_losses_train(kw):
    teacher, ids = TinyLM(0, 3.0), _data()
    targets, _ = teacher_targets("t", ids, module_teacher(teacher), k=8)
    student = TinyLM(1)
    c = DistillConfig(tokens=6 * 4 * 20, lr=1e-2, **kw)
    ppl = heldout_perplexity(student, ids)
    info = distill(student, ids, None if c.kl_weight == 0 else targets, c)
    assert info["loss_last"] < info["loss_first"]
    if c.ce > 0:
        assert heldout_perplexity(student, ids) < ppl


def test_resume_after_a_crash_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    teacher, ids = TinyLM(0, 3.0), _data()
    targets, _ = teacher_targets("t", ids, module_teacher(teacher), k=8)
    c = DistillConfig(tokens=7 * 4 * 20, lr=1e-2, checkpoint_every=0)   # 7 steps, 3 windows per epoch

    whole = TinyLM(1)
    distill(whole, ids, targets, c)

    path = str(tmp_path / "ckpt.pt")

    def crash(step):
        if step == 4:
            raise KeyboardInterrupt

    first = TinyLM(1)
    with pytest.raises(KeyboardInterrupt):
        distill(first, ids, targets, c, checkpoint_path=path, signature="s", on_step=crash)
    again = TinyLM(1)  # a new process: fresh weights, everything else from the checkpoint
    info = distill(again, ids, targets, c, checkpoint_path=path, signature="s")
    assert info["resumed"] and info["steps"] == 7
    for a, b in zip(whole.parameters(), again.parameters()):
        assert torch.equal(a, b)
    # a finished run's checkpoint: the rerun trains nothing and gives the same weights
    third = TinyLM(1)
    assert distill(third, ids, targets, c, checkpoint_path=path, signature="s")["steps"] == 7
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), third.parameters()))
    # another signature (other data or settings) starts over
    assert not distill(TinyLM(1), ids, targets, c, checkpoint_path=path, signature="other")["resumed"]


@pytest.mark.parametrize("kw,msg", [
    (dict(), "a budget is required"),
    (dict(minutes=0), "minutes must be a number > 0"),
    (dict(tokens=0), "tokens must be a whole number >= 1"),
    (dict(minutes=float("nan")), "minutes must be"),
    (dict(tokens=10, kl="sideways"), "kl must be one of forward, reverse"),
    (dict(tokens=10, kl_weight=0.0), "every loss weight is 0"),
    (dict(tokens=10, lr=-1.0), "lr must be > 0"),
])
def test_bad_config_is_one_line(kw, msg):
    with pytest.raises(JisuError, match=msg):
        DistillConfig(**kw)


def test_hidden_matching_needs_the_teachers_width():
    ids = _data()
    t = Targets(torch.zeros(12, 20, 8), torch.zeros(12, 20, 8, dtype=torch.long), torch.ones(12, 20),
                torch.zeros(12, 20, 32))
    with pytest.raises(JisuError, match="hidden=W needs a student of the teacher's width 32"):
        distill(TinyLM(1), ids, t, DistillConfig(tokens=10, hidden=1.0))
    assert as_student(TinyLM(1)).width is None
