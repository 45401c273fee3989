"""The jisu commands on an LSTM student artifact and its int8 compression: run, chat, eval against the
teacher, bench, and the OpenAI server with concurrent requests."""
from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys

import httpx
import pytest

import jisu
import jisu.compress
from tests.compress.conftest import FAST, write_tiny_hf
from tests.engine.test_recurrent import lively_student


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from jisu.io.student import save_student

    root = tmp_path_factory.mktemp("lstm_cli")
    teacher = write_tiny_hf(str(root / "teacher"))
    save_student(lively_student(teacher), root / "student", tokenizer_from=teacher, meta={})
    jisu.compress.compress(str(root / "student"), str(root / "q8"), "rtn:w8g32", **FAST)
    return {"teacher": teacher, "student": str(root / "student"), "q8": str(root / "q8")}


def run_jisu(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jisu.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("which", ["student", "q8"])
def test_run_and_chat(models, which):
    r = run_jisu("run", models[which], "-p", "hello", "-n", "6", "--temp", "0", "--ignore-eos", "--json",
                 "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 6 and out["finish_reason"] == "length"
    assert out["token_ids"] == jisu.load(models[which]).chat([{"role": "user", "content": "hello"}], temperature=0,
                                                             max_tokens=6, ignore_eos=True).token_ids
    r = run_jisu("chat", models[which], "-n", "3", "--temp", "0", "--ignore-eos", stdin="hello\nagain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") >= 2   # one answer per turn (a random model's text may hold newlines too)


def test_eval_against_the_teacher(models, tmp_path):
    out = tmp_path / "eval.json"
    r = run_jisu("eval", models["q8"], "--reference", models["student"], "--chunks", "1", "--ctx", "48",
                 "--no-cache", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert 0 < res["kld"]["mean"] < 0.05 and res["perplexity"] > 1
    r = run_jisu("eval", models["student"], "--reference", models["teacher"], "--chunks", "1", "--ctx", "48",
                 "--no-cache")
    assert r.returncode == 0 and "KLD" in r.stdout, r.stderr


def test_bench(models, tmp_path):
    out = tmp_path / "bench.json"
    r = run_jisu("bench", models["q8"], "--reps", "1", "--prompt-lengths", "16", "--decode-tokens", "4,12",
                 "--ppl-chunks", "0", "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "decode tok/s" in r.stdout and out.exists()


def test_serve_concurrent_requests(models):
    from jisu.serve.app import create_app
    from tests.serve.conftest import running

    llm = jisu.load(models["q8"])
    prompts = ["the cat", "in the hat", "he then", "the the the"]
    alone = [llm.generate(p, temperature=0, max_tokens=8, ignore_eos=True).text for p in prompts]
    with running(create_app(llm, kv_memory_mb=2, max_concurrency=8)) as (url, _):
        def ask(p):
            body = {"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            r = httpx.post(url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        with cf.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, prompts))
    assert all(c["finish_reason"] == "length" for c in got)
    assert [c["text"] for c in got] == alone
