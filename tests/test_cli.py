"""The `jisu` command on a tiny model: run (text and --json), chat over stdin, models."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures import write_gguf_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_gguf_llama(str(tmp_path_factory.mktemp("cli") / "tiny.gguf"))


def jisu(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jisu.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_run_json(model):
    r = jisu("run", model, "-p", "hello", "-n", "6", "--temp", "0", "--ignore-eos", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 6 and out["finish_reason"] == "length"
    assert out["prompt_token_ids"][:1] == [1]  # the chat template's <|im_start|>
    assert set(out["timings"]) >= {"prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s"}
    raw = json.loads(jisu("run", model, "-p", "hello", "-n", "6", "--temp", "0", "--ignore-eos", "--json",
                          "--raw").stdout)
    assert raw["prompt_token_ids"] != out["prompt_token_ids"]


def test_run_seed_reproducible(model):
    args = ("run", model, "-p", "hi", "-n", "8", "--temp", "1.0", "--seed", "5", "--ignore-eos", "--json")
    a, b = json.loads(jisu(*args).stdout), json.loads(jisu(*args).stdout)
    assert a["token_ids"] == b["token_ids"]


def test_run_text_output(model):
    r = jisu("run", model, "-p", "hello", "-n", "4", "--temp", "0", "--ignore-eos")
    assert r.returncode == 0 and "generated 4 tok" in r.stderr


def test_chat_keeps_conversation(model):
    """Each reply is the model's answer to the whole conversation so far; /reset starts over."""
    import jisu as api

    llm = api.load(model)
    opts = dict(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.chat([{"role": "user", "content": "hello"}], **opts).text
    second = llm.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "again"}], **opts).text
    fresh = llm.chat([{"role": "user", "content": "again"}], **opts).text
    assert second != fresh  # the history changes the answer on this model, so the test can see it
    r = jisu("chat", model, "-n", "6", "--temp", "0", "--ignore-eos", stdin="hello\nagain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{first}\n{second}\n"
    r = jisu("chat", model, "-n", "6", "--temp", "0", "--ignore-eos", stdin="hello\n/reset\nagain\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{first}\n{fresh}\n"


@pytest.mark.parametrize("args,needle", [
    (("-n", "0"), "max_tokens"), (("--temp", "nan"), "temperature"), (("--top-p", "2"), "top_p"),
    (("--threads", "0"), "threads"),
])
def test_bad_options_one_line(model, args, needle):
    r = jisu("run", model, "-p", "x", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and needle in r.stderr


def test_context_overflow_names_both_numbers(model):
    r = jisu("run", model, "-p", "x", "-n", "100000")
    assert r.returncode == 2 and "100000" in r.stderr and "256" in r.stderr


def test_models_lists_default():
    r = jisu("models")
    assert r.returncode == 0 and "smollm2" in r.stdout and "SmolLM2-135M-Instruct" in r.stdout


def test_run_precise(model):
    """--precise runs the quantized kernels with refined activations; load(precise=...) sets it."""
    r = jisu("run", model, "-p", "hello", "-n", "5", "--temp", "0", "--ignore-eos", "--json", "--precise")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 5
    import jisu as api
    from jisu.kernels import ops

    before = ops.get_act_refine()
    try:
        api.load(model, precise=True)
        assert ops.get_act_refine() == pytest.approx(ops.PRECISE if ops.native_available() else 0.0, rel=1e-6)
        api.load(model, precise=False)
        assert ops.get_act_refine() == 0.0
    finally:
        ops.set_act_refine(before)


@pytest.mark.skipif(not __import__("jisu.kernels.ops", fromlist=["x"]).native_available(),
                    reason="the int8-activation kernels need jisu._kernels")
def test_run_precise_and_fast_reach_the_kernels(tmp_path):
    """On a Q4_0 model whose greedy tokens differ between plain int8 activations (--fast) and
    ~15-bit ones (--precise), the command's tokens are the API's in each mode."""
    import gguf

    import jisu as api
    from jisu.kernels import ops

    path = write_gguf_llama(str(tmp_path / "q4.gguf"), 0, tensor_type=gguf.GGMLQuantizationType.Q4_0)
    before = ops.get_act_refine()
    try:
        want = {flag: api.load(path, **{flag: True}).generate("hello", temperature=0, max_tokens=12,
                                                                 ignore_eos=True).token_ids
                for flag in ("fast", "precise")}
    finally:
        ops.set_act_refine(before)
    assert want["fast"] != want["precise"], "this model no longer tells the two modes apart"
    for flag, ids in want.items():
        r = jisu("run", path, "-p", "hello", "--raw", "-n", "12", "--temp", "0", "--ignore-eos", "--json",
                 f"--{flag}")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["token_ids"] == ids, flag


def test_run_isa(tmp_path):
    """--isa picks the kernels' instruction set: a Q8_0 model's greedy tokens are the same on the
    scalar reference and the best SIMD path (the kernels are bitwise equal); an ISA this CPU does
    not run is a one-line error."""
    import gguf

    path = write_gguf_llama(str(tmp_path / "q8.gguf"), tensor_type=gguf.GGMLQuantizationType.Q8_0)
    args = ("run", path, "-p", "hello", "-n", "6", "--temp", "0", "--ignore-eos", "--json")
    best, scalar = jisu(*args, "--isa", "best"), jisu(*args, "--isa", "scalar")
    assert best.returncode == 0 and scalar.returncode == 0, best.stderr + scalar.stderr
    assert json.loads(best.stdout)["token_ids"] == json.loads(scalar.stdout)["token_ids"]
    import platform

    from jisu.kernels import ops

    other = "avx2" if platform.machine().lower() in ("aarch64", "arm64") else "neon"

    if other not in ops.VERIFIED_ISAS:
        bad = jisu(*args, "--isa", other)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and other in bad.stderr
