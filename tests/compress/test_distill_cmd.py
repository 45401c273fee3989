"""`jisu distill`: an LSTM student distilled from a tiny teacher (or trained with cross-entropy alone)
is written as an artifact jisu.load runs, its held-out perplexity falls, and every bad input is a
one-line error before any work, with nothing written."""
from __future__ import annotations

import json
import os

import pytest

import jisu
from jisu.cli import main
from jisu.compress.distill_cache import CACHE_ENV
from jisu.compress.distill_student import distill_student

from .conftest import CFG, write_tiny_hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(samples=8, seq_len=32, progress=False)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


@pytest.mark.parametrize("no_teacher", [False, True])
def test_student_is_trained_and_written(tiny_hf, tmp_path, no_teacher):
    out = tmp_path / "student"
    r = distill_student(tiny_hf, str(out), "lstm:layers=1,hidden=32", tokens=1500, lr=1e-2, no_teacher=no_teacher,
                        evaluate_every=0.0, **SMALL)
    assert r["mode"] == ("cross-entropy" if no_teacher else "distilled") and r["tokens"] >= 1500
    curve = r["curve"]
    assert curve[-1]["value"] < curve[0]["value"] and r["heldout_perplexity"] == curve[-1]["value"]
    with open(out / "manifest.json") as f:
        assert json.load(f)["distill"]["student"] == "lstm:layers=1,hidden=32,tied=1"
    llm = jisu.load(str(out))
    assert llm.model.cfg.arch == "lstm" and llm.model.cfg.vocab_size == CFG["vocab_size"]
    assert sorted(os.listdir(tmp_path)) == (["cache", "student"] if not no_teacher else ["student"])


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


@pytest.mark.parametrize("no_teacher", [False, True])
def test_teacher_text_joins_the_windows(tiny_hf, tmp_path, no_teacher):
    """--gen N: N windows the teacher writes itself join the training windows, in both modes (the
    cross-entropy baseline sees the same tokens)."""
    plain = distill_student(tiny_hf, str(tmp_path / "a"), "lstm:layers=1,hidden=32", tokens=200, no_teacher=no_teacher,
                            **SMALL)
    r = distill_student(tiny_hf, str(tmp_path / "b"), "lstm:layers=1,hidden=32", tokens=200, no_teacher=no_teacher,
                        gen=5, **SMALL)
    assert r["windows"] == plain["windows"] + 5 and r["teacher_text"]["windows"] == 5 and plain["teacher_text"] is None
    assert jisu.load(str(tmp_path / "b")).model.cfg.arch == "lstm"


def test_bad_input_is_one_line_and_writes_nothing(tiny_hf, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["distill", tiny_hf, "-o", out, "--student", "lstm:layers=1,hidden=32"]
    assert "a budget is required" in _err(capsys, base)
    assert "minutes must be a number > 0" in _err(capsys, base + ["--minutes", "0"])
    assert "tokens must be a whole number >= 1" in _err(capsys, base + ["--tokens", "0"])
    assert "no such text file" in _err(capsys, base + ["--tokens", "10", "--text", str(tmp_path / "missing.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "text file is empty" in _err(capsys, base + ["--tokens", "10", "--text", str(empty)])
    assert "expected lstm:layers=N" in _err(capsys, ["distill", tiny_hf, "-o", out, "--student", "gru:2", "--tokens", "9"])
    os.mkdir(out)
    assert "--gen must be a whole number >= 0" in _err(capsys, base + ["--tokens", "10", "--gen", "-2"])
    assert "already exists; use --force" in _err(capsys, base + ["--tokens", "10"])
    os.rmdir(out)
    assert sorted(os.listdir(tmp_path)) == ["empty.txt"]


def test_a_student_of_another_vocabulary_is_refused(tiny_hf, tmp_path, capsys):
    student = tmp_path / "s"
    distill_student(tiny_hf, str(student), "lstm:layers=1,hidden=32", tokens=64, no_teacher=True, **SMALL)
    other = write_tiny_hf(str(tmp_path / "other"), cfg={**CFG, "vocab_size": CFG["vocab_size"] + 20})
    err = _err(capsys, ["distill", other, "-o", str(tmp_path / "out"), "--student", str(student), "--tokens", "10"])
    assert "student vocabulary of 300 tokens differs from the teacher" in err
    assert not (tmp_path / "out").exists()
