"""The LSTM student (jisu.models.lstm): spec parsing, initialisation from a teacher, the trainable
forward against the inference path, and saving as an artifact that jisu.load runs."""
from __future__ import annotations

import os

import pytest
import torch

import jisu
from jisu.errors import JisuError
from jisu.io.sources import resolve
from jisu.io.student import save_student, source_config
from jisu.models.lstm import EMBED, HEAD, LSTMModel, LSTMSpec, parse_student, student_from_teacher
from tests.compress.conftest import write_tiny_hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return write_tiny_hf(str(tmp_path_factory.mktemp("lstm") / "teacher"))


@pytest.fixture(scope="module")
def teacher_cfg(teacher):
    return source_config(resolve(teacher))


def teacher_embed(teacher: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(os.path.join(teacher, "model.safetensors"))[EMBED]


def make_student(teacher, teacher_cfg, text="lstm:layers=2,hidden=96", seed=0) -> LSTMModel:
    torch.manual_seed(seed)
    return student_from_teacher(parse_student(text), teacher_cfg, teacher_embed(teacher))


def test_parse_student():
    assert parse_student("lstm:layers=2,hidden=768") == LSTMSpec(2, 768, True)
    assert parse_student(" LSTM: hidden=256 , layers=1, tied=0") == LSTMSpec(1, 256, False)
    assert parse_student("lstm:layers=3,hidden=64,tied=1").text == "lstm:layers=3,hidden=64,tied=1"


@pytest.mark.parametrize("text", ["", "lstm", "gru:layers=2,hidden=768", "lstm:layers=2", "lstm:hidden=768",
                                  "lstm:layers=2,hidden=768,tied=2", "lstm:layers=2,hidden=768,layers=3",
                                  "lstm:layers=two,hidden=768", "lstm:layers=2,hidden=-768", "lstm:layers=0,hidden=768",
                                  "lstm:layers=2,hidden=100", "lstm:layers=2,hidden=768,depth=1", "lstm:layers=2,,hidden=8"])
def test_bad_student_specs_are_one_line_errors(text):
    with pytest.raises(JisuError) as e:
        parse_student(text)
    msg = str(e.value)
    assert "\n" not in msg and "lstm:layers=" in msg


def test_student_starts_from_the_teachers_embedding(teacher, teacher_cfg):
    m = make_student(teacher, teacher_cfg, "lstm:layers=1,hidden=64,tied=0")
    emb = teacher_embed(teacher)
    assert m.cfg.vocab_size == teacher_cfg.vocab_size and m.cfg.hidden_size == teacher_cfg.hidden_size
    assert torch.equal(m.model.embed_tokens.weight.detach(), emb)
    assert torch.equal(m.lm_head.weight.detach(), emb)
    assert m.model.proj is None  # hidden == the embedding's width: no projection
    assert make_student(teacher, teacher_cfg).model.proj.weight.shape == (64, 96)


def test_student_of_another_vocabulary_is_refused(teacher, teacher_cfg):
    with pytest.raises(JisuError, match="vocabulary"):
        student_from_teacher(LSTMSpec(1, 64), teacher_cfg, torch.randn(teacher_cfg.vocab_size - 1, 64))


def test_forward_is_differentiable_and_trains(teacher, teacher_cfg):
    m = make_student(teacher, teacher_cfg)
    ids = torch.randint(0, m.cfg.vocab_size, (4, 12))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        logits, _ = m(ids[:, :-1])
        assert logits.dtype == torch.float32 and logits.shape == (4, 11, m.cfg.vocab_size)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_forward_equals_step_by_step(teacher, teacher_cfg):
    """The whole-sequence forward (torch.nn.LSTM) = the inference path one token at a time, and a
    forward continued from a returned state = the forward of the whole sequence."""
    m = make_student(teacher, teacher_cfg)
    ids = torch.randint(0, m.cfg.vocab_size, (3, 10))
    with torch.no_grad():
        full, (h, c) = m(ids)
        first, state = m(ids[:, :6])
        rest, (h2, c2) = m(ids[:, 6:], state)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)
    assert torch.allclose(h2, h, atol=1e-6) and torch.allclose(c2, c, atol=1e-6)
    rt, state, steps = m.runtime(), None, []
    for t in range(ids.shape[1]):
        logits, state = m.run_runtime(rt, ids[:, t:t + 1], state)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)
    assert torch.allclose(state[0], h, atol=1e-5)


@pytest.mark.parametrize("text", ["lstm:layers=2,hidden=96", "lstm:layers=1,hidden=64,tied=0"])
def test_save_load_same_logits(teacher, teacher_cfg, tmp_path, text):
    m = make_student(teacher, teacher_cfg, text)
    out = tmp_path / "student"
    save_student(m, out, tokenizer_from=teacher, meta={"minutes": 0.5, "loss": [3.0, 2.5]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temp folder left
    llm = jisu.load(str(out))
    assert type(llm.model) is LSTMModel and llm.config == m.cfg
    assert (HEAD in llm.model.w) == (not m.cfg.tie_embeddings)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(llm.model(ids)[0], m(ids)[0])
    from jisu.engine.runner import sequence_logits

    assert torch.allclose(sequence_logits(llm.runner, ids[0].tolist()), m(ids[:1])[0][0], atol=1e-4)
    assert llm.tokenizer.encode("the cat") == jisu.load(teacher).tokenizer.encode("the cat")
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["distill"] == {"minutes": 0.5, "loss": [3.0, 2.5]}
    save_student(m, out, tokenizer_from=teacher, meta={})  # an artifact is replaced
    assert json.loads((out / "manifest.json").read_text())["distill"] == {}


def test_save_refuses_a_vocabulary_other_than_the_teachers(teacher, teacher_cfg, tmp_path):
    from dataclasses import replace

    small = replace(teacher_cfg, vocab_size=teacher_cfg.vocab_size - 4)
    torch.manual_seed(0)
    m = student_from_teacher(LSTMSpec(1, 64), small, torch.randn(small.vocab_size, small.hidden_size))
    with pytest.raises(JisuError, match="differs from the teacher") as e:
        save_student(m, tmp_path / "s", tokenizer_from=teacher, meta={})
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_save_does_not_replace_a_foreign_folder(teacher, teacher_cfg, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(JisuError, match="not a jisu artifact"):
        save_student(make_student(teacher, teacher_cfg), tmp_path / "s", tokenizer_from=teacher, meta={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"
