"""Tokenizers built from GGUF metadata agree with the reference implementations; streaming
detokenization and chat templates behave."""
from __future__ import annotations

import pydoc_data.topics
import pytest

from jisu.io.tokenizer import StreamDecoder, gguf_tokenizer, load_hf_tokenizer
from tests.fixtures import write_hf_llama

SAMPLES = ["Hello world, this is a test 123!", "  leading spaces and\ttabs\nnew lines\n\n",
           "def f(x):\n    return x ** 2  # code", "Unicode: naïve café — 東京 🚀", "", "a", "12345 67.89",
           "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    text = "\n".join(list(pydoc_data.topics.topics.values())[:40])
    (folder / "train.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(folder / "train.txt"), model_prefix=str(folder / "m"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)  # as Llama's tokenizer.model: no normalization
    return spm.SentencePieceProcessor(model_file=str(folder / "m.model"))


def spm_gguf_metadata(sp) -> dict:
    """GGUF tokenizer keys as llama.cpp's converter writes them for a SentencePiece model."""
    types = []
    for i in range(sp.get_piece_size()):
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    return {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(sp.get_piece_size())],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.unknown_token_id": sp.unk_id(),
            "tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.add_bos_token": True}


def test_sentencepiece_style_matches_sentencepiece(spm_model):
    tok = gguf_tokenizer(spm_gguf_metadata(spm_model), "spm.gguf")
    for text in SAMPLES:
        expected = spm_model.encode(text)
        assert tok.encode(text, add_bos=False) == expected, text
        assert tok.decode(expected) == spm_model.decode(expected), text
    assert tok.encode("hi")[0] == spm_model.bos_id()


def test_gpt2_style_matches_tokenizer_json(tmp_path):
    from tests.fixtures import write_gguf_llama
    from jisu.io.gguf import GGUFFile

    hf = load_hf_tokenizer(write_hf_llama(str(tmp_path / "hf")))
    g = gguf_tokenizer(GGUFFile(write_gguf_llama(str(tmp_path / "t.gguf"))).metadata, "t.gguf")
    for text in SAMPLES + ["<|im_start|>user\nthe theme<|im_end|>"]:
        assert g.encode(text, add_bos=False) == hf.encode(text, add_bos=False), text
        assert g.decode(g.encode(text, add_bos=False)) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert g.encode("<|im_start|>", add_bos=False) == [1]
    assert g.eos_ids == (2,) and g.bos_id == 1


def test_stream_decoder_reassembles_text(spm_model, tmp_path):
    toks = [gguf_tokenizer(spm_gguf_metadata(spm_model), "spm.gguf"),
            load_hf_tokenizer(write_hf_llama(str(tmp_path / "hf")))]
    for tok in toks:
        for text in SAMPLES:
            ids = tok.encode(text, add_bos=False)
            decoder = StreamDecoder(tok)
            pieces = [decoder.push(i) for i in ids]
            assert "".join(pieces) == tok.decode(ids), text
            assert all("\ufffd" not in p for p in pieces)


def test_chat_template_renders(tmp_path):
    tok = load_hf_tokenizer(write_hf_llama(str(tmp_path / "hf")))
    text = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and ids.count(1) == 2  # <|im_start|> as one special token, no extra BOS


def test_reloading_a_tokenizer_reuses_it_and_keeps_no_memory(tmp_path, spm_model):
    """The same tokenizer file or GGUF vocabulary loaded again shares the built `tokenizers` object
    (the library keeps ~0.5 KB of each BPE model that has encoded text after it is dropped); a
    changed file or vocabulary is built afresh, never a stale one."""
    import json

    from jisu.memory import _proc_kib, trim_heap

    folder = write_hf_llama(str(tmp_path / "hf"))
    a, b = load_hf_tokenizer(folder), load_hf_tokenizer(folder)
    assert a._tok is b._tok
    path = tmp_path / "hf" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["added_tokens"].append({"id": max(data["model"]["vocab"].values()) + 1, "content": "<extra>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps(data))
    c = load_hf_tokenizer(folder)
    assert c._tok is not a._tok and c.encode("<extra>", add_bos=False) != a.encode("<extra>", add_bos=False)
    meta = spm_gguf_metadata(spm_model)
    g1, g2 = gguf_tokenizer(meta, "a.gguf"), gguf_tokenizer(dict(meta), "b.gguf")
    assert g1._tok is g2._tok and g2.source == "b.gguf"
    changed = dict(meta, **{"tokenizer.ggml.add_space_prefix": False})
    assert gguf_tokenizer(changed, "c.gguf")._tok is not g1._tok

    def load_and_encode():
        load_hf_tokenizer(folder).encode("the cat sat", add_bos=False)

    for _ in range(200):
        load_and_encode()
    trim_heap(collect=True)
    before = _proc_kib("/proc/self/status", "VmRSS:")
    for _ in range(3000):
        load_and_encode()
    trim_heap(collect=True)
    grown = _proc_kib("/proc/self/status", "VmRSS:") - before
    assert grown < 600 * 1024, f"3000 loads kept {grown} bytes"  # a fresh BPE object each time kept ~3 MB
