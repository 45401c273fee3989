"""An HF folder's byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json) as GGUF
tokenizer metadata: vocabulary, token types, merges, special ids, chat template, and the llama.cpp
pre-tokenizer name whose split the tokenizer's own pre-tokenizer is (else a one-line error)."""
from __future__ import annotations

import json
import os

from ..errors import UnsupportedError
from ..io.tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED

CONVERT = "convert it with llama.cpp's convert_hf_to_gguf.py and export from that GGUF"


def _read(folder: str, name: str) -> dict:
    p = os.path.join(folder, name)
    if not os.path.isfile(p):
        return {}
    with open(p, encoding="utf-8") as f:
        d = json.load(f)
    return d if isinstance(d, dict) else {}


def _pre_name(tj: dict, where: str) -> str:
    """llama.cpp's tokenizer.ggml.pre for tokenizer.json's pre-tokenizer (and normalizer)."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    norm = (tj.get("normalizer") or {}).get("type")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and norm is None:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True) \
            and norm is None:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_SPLIT and norm is None:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT and norm == "NFC":
            return "qwen2"
    raise UnsupportedError(f"{where}: its pre-tokenizer ({'+'.join(map(str, kinds))}) is not one jisu maps to a "
                           f"llama.cpp pre-tokenizer name; {CONVERT}")


def hf_tokenizer_meta(folder: str) -> dict:
    """tokenizer.* GGUF metadata of the HF folder's tokenizer."""
    where = os.path.join(folder, "tokenizer.json")
    tj = _read(folder, "tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedError(f"{where}: only byte-level BPE tokenizers are exported from an HF folder "
                               f"(this one is {model.get('type') or 'missing'}); {CONVERT}")
    pre = _pre_name(tj, where)
    vocab = dict(model.get("vocab") or {})
    added = {a["content"]: a for a in tj.get("added_tokens") or []}
    for text, a in added.items():
        vocab[text] = a["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TOKEN_UNUSED] * n  # ids no token names (padding) stay inert
    for text, i in vocab.items():
        tokens[i] = text
        a = added.get(text)
        types[i] = TOKEN_NORMAL if a is None else (TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tc, cfg = _read(folder, "tokenizer_config.json"), _read(folder, "config.json")
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_bos_token": bool(tc.get("add_bos_token", False))}

    def token_id(key: str):
        t = tc.get(key)
        t = t.get("content") if isinstance(t, dict) else t
        return vocab.get(t) if isinstance(t, str) else None

    for key, gkey, fallback in (("bos_token", "bos_token_id", cfg.get("bos_token_id")),
                                ("eos_token", "eos_token_id", cfg.get("eos_token_id")),
                                ("unk_token", "unknown_token_id", None), ("pad_token", "padding_token_id", None)):
        v = token_id(key)
        if v is None and isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        v = v if v is not None else fallback
        if isinstance(v, int) and 0 <= v < n:
            meta[f"tokenizer.ggml.{gkey}"] = v
    template = tc.get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = template
    return meta
