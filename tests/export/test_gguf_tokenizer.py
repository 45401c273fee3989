"""The exported tokenizer metadata: llama.cpp tokenizes ~1,000 varied lines exactly as jisu does
(the default model's BPE vocabulary with its "smollm" pre-tokenizer), and keeps the chat template."""
import numpy as np
import pytest

from jisu.config import ModelConfig
from jisu.export.check import import_llama_cpp
from jisu.export.gguf import write_gguf


def _lines() -> list[str]:
    from jisu.io.text import builtin_text

    prose = [ln for ln in builtin_text().text.splitlines() if ln.strip()][::7][:850]
    extra = ["Ünïcödé àccents — and “quotes” ‘here’", "数字 12345 and 3.14159, 1e-9, 0x1F", "emoji 🙂🚀👍🏽 mixed",
             "tabs\tand   runs   of    spaces", "  leading and trailing  ", "URL https://example.com/a?b=c&d=e#f",
             "code: def f(x): return x**2  # comment", "Ελληνικά, русский, العربية, עברית, हिन्दी", "a" * 300,
             "!!!???...;;;:::", "CamelCaseWordsAndsnake_case_words", "'s 't 're 've 'm 'll 'd", "\u00a0nbsp\u2009thin"]
    return prose + [f"{e} {i}" for i in range(12) for e in extra]


def test_llama_cpp_tokenizes_like_jisu(default_gguf, tmp_path):
    llama_cpp = import_llama_cpp()
    if llama_cpp is None:
        pytest.skip("llama-cpp-python is not installed")
    from jisu.io.artifact import gguf_tokenizer_meta
    from jisu.io.tokenizer import gguf_tokenizer

    meta = gguf_tokenizer_meta(default_gguf)
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta.get("tokenizer.chat_template")
    cfg = ModelConfig(arch="llama", vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=64,
                      intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32)
    rng = np.random.default_rng(0)
    r = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float32)  # noqa: E731
    tensors = [("token_embd.weight", r(cfg.vocab_size, 64), "F32"), ("output_norm.weight", np.ones(64, np.float32), "F32"),
               ("blk.0.attn_norm.weight", np.ones(64, np.float32), "F32"), ("blk.0.ffn_norm.weight", np.ones(64, np.float32), "F32"),
               ("blk.0.attn_q.weight", r(64, 64), "F32"), ("blk.0.attn_k.weight", r(32, 64), "F32"),
               ("blk.0.attn_v.weight", r(32, 64), "F32"), ("blk.0.attn_output.weight", r(64, 64), "F32"),
               ("blk.0.ffn_gate.weight", r(128, 64), "F32"), ("blk.0.ffn_up.weight", r(128, 64), "F32"),
               ("blk.0.ffn_down.weight", r(64, 128), "F32")]
    path = str(tmp_path / "tok.gguf")
    write_gguf(path, cfg, meta, tensors, file_type=0, name="tok")
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    assert llm.metadata.get("tokenizer.ggml.pre") == "smollm"
    assert llm.metadata.get("tokenizer.chat_template") == meta["tokenizer.chat_template"]
    tok = gguf_tokenizer(meta, path)
    lines = _lines()
    assert len(lines) >= 1000
    bad = [ln for ln in lines if tok.encode(ln, add_bos=False) != llm.tokenize(ln.encode(), add_bos=False, special=False)]
    assert bad == []


def _hf_folder_of(default_gguf, folder) -> dict:
    """The default model's tokenizer saved as an HF folder (tokenizer.json + tokenizer_config.json)."""
    import json
    import os

    from jisu.io.artifact import gguf_tokenizer_meta
    from jisu.io.tokenizer import gguf_tokenizer

    meta = gguf_tokenizer_meta(default_gguf)
    tok = gguf_tokenizer(meta, default_gguf)
    os.makedirs(folder, exist_ok=True)
    tok._tok.save(os.path.join(folder, "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": meta["tokenizer.chat_template"], "add_bos_token": False,
                   "bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]],
                   "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]]}, f)
    return meta


def test_hf_folder_tokenizer_becomes_the_same_gguf_metadata(default_gguf, tmp_path):
    from jisu.export.hf_tokenizer import hf_tokenizer_meta

    meta = _hf_folder_of(default_gguf, str(tmp_path / "hf"))
    got = hf_tokenizer_meta(str(tmp_path / "hf"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"):
        assert list(got[key]) == list(meta[key]) if isinstance(meta[key], list) else got[key] == meta[key], key


def test_hf_folder_tokenizer_tokenizes_in_llama_cpp_like_jisu(default_gguf, tmp_path):
    llama_cpp = import_llama_cpp()
    if llama_cpp is None:
        pytest.skip("llama-cpp-python is not installed")
    from jisu.export.hf_tokenizer import hf_tokenizer_meta
    from jisu.io.tokenizer import load_hf_tokenizer

    folder = str(tmp_path / "hf")
    _hf_folder_of(default_gguf, folder)
    meta = hf_tokenizer_meta(folder)
    cfg = ModelConfig(arch="llama", vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=64,
                      intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32)
    rng = np.random.default_rng(0)
    r = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float32)  # noqa: E731
    one = np.ones(64, np.float32)
    tensors = [("token_embd.weight", r(cfg.vocab_size, 64), "F32"), ("output_norm.weight", one, "F32"),
               ("blk.0.attn_norm.weight", one, "F32"), ("blk.0.ffn_norm.weight", one, "F32"),
               ("blk.0.attn_q.weight", r(64, 64), "F32"), ("blk.0.attn_k.weight", r(32, 64), "F32"),
               ("blk.0.attn_v.weight", r(32, 64), "F32"), ("blk.0.attn_output.weight", r(64, 64), "F32"),
               ("blk.0.ffn_gate.weight", r(128, 64), "F32"), ("blk.0.ffn_up.weight", r(128, 64), "F32"),
               ("blk.0.ffn_down.weight", r(64, 128), "F32")]
    path = str(tmp_path / "hf.gguf")
    write_gguf(path, cfg, meta, tensors, file_type=0, name="hf")
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    hf = load_hf_tokenizer(folder)
    lines = _lines()
    bad = [ln for ln in lines if hf.encode(ln, add_bos=False) != llm.tokenize(ln.encode(), add_bos=False, special=False)]
    assert bad == []


def test_unmapped_pre_tokenizer_is_one_line(tmp_path):
    import json

    from jisu.errors import UnsupportedError
    from jisu.export.hf_tokenizer import hf_tokenizer_meta

    tj = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UnsupportedError, match="convert_hf_to_gguf") as e:
        hf_tokenizer_meta(str(tmp_path))
    assert "\n" not in str(e.value)
