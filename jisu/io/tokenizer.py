"""Tokenizers: HF `tokenizers` from tokenizer.json, or built from a GGUF vocab (BPE "gpt2" and
SentencePiece "llama" styles); chat templates rendered in a sandboxed Jinja environment."""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from datetime import datetime
from typing import Any, Sequence

from ..errors import InputError, ModelFormatError, TemplateError, UnsupportedError

# Pre-tokenizer split patterns, by the GGUF `tokenizer.ggml.pre` name (the regexes are those the
# models' own tokenizer.json files declare).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}

_WIDTHS = re.compile(r"%[-+ #0-9.*]*?\d{6,}")  # a printf width or precision of a million or more
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """Text <-> token ids, the special ids generation needs, and the chat template."""

    def __init__(self, tok, *, bos_id: int | None, eos_ids: Sequence[int], add_bos: bool,
                 chat_template: str | None, source: str):
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self.source = source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._template = None

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except (TypeError, UnicodeError, ValueError) as e:  # a lone surrogate, a non-string
            raise InputError(_bad_text(text, e)) from None
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    # --- chat -----------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True, **context: Any) -> str:
        """The conversation as the template writes it; `context` adds template variables (`tools`)."""
        if not self.chat_template:
            raise TemplateError(f"{self.source}: the model has no chat template; send raw text instead (--raw)")
        _check_messages(messages)
        import jinja2

        if self._template is None:
            self._template = compile_template(self.chat_template, self.source)
        bos = self.token_text(self.bos_id) if self.bos_id is not None else ""
        eos = self.token_text(self.eos_ids[0]) if self.eos_ids else ""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos or "", eos_token=eos or "", **context)
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"{self.source}: chat template refused by the sandbox ({e})") from None
        except Exception as e:  # TemplateError, UndefinedError, TypeError from user data ...
            raise TemplateError(f"{self.source}: chat template failed ({type(e).__name__}: {e})") from None

    def encode_chat(self, messages: list[dict], **context: Any) -> list[int]:
        # As transformers' apply_chat_template: the template places BOS itself, so none is added.
        return self.encode(self.render_chat(messages, **context), add_bos=False)


def _bad_text(text: Any, e: BaseException) -> str:
    if not isinstance(text, str):
        return f"text to encode must be a string, not {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as u:
        return f"the text is not valid Unicode: {u.reason} ({text[u.start]!r} at character {u.start})"
    return f"the text cannot be tokenized ({type(e).__name__}: {_one_line(e)})"


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise TemplateError("chat: messages must be a non-empty list of {'role': ..., 'content': ...}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TemplateError(f"chat: malformed message {m!r}: needs string 'role' and 'content'")


def compile_template(source_text: str, origin: str):
    """Compile a chat template in an immutable sandbox: no attribute escapes, no mutation of
    globals; what HF templates commonly use (raise_exception, strftime_now, tojson) is provided."""
    from jinja2.exceptions import TemplateError as JinjaTemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(f"{origin}: chat template raised: {message}")

    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source_text)
    except JinjaTemplateError as e:
        raise TemplateError(f"{origin}: chat template does not parse ({_one_line(e)})") from None
    except (SyntaxError, ValueError, TypeError, RecursionError) as e:  # jinja's compiled Python refused
        raise TemplateError(f"{origin}: chat template does not compile ({type(e).__name__}: {_one_line(e)})") \
            from None


MAX_TEMPLATE_VALUE = 1 << 20  # bytes / items one operator of a template may make


def _BoundedSandbox(**kw):
    """The immutable sandbox, with `*`, `**` and `%` bounded: `'x' * 10**10` or `9 ** 9 ** 9` in
    a model file's template would otherwise take the process's memory or hang it."""
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and \
                            len(seq) * n > MAX_TEMPLATE_VALUE:
                        raise SecurityError(f"template value of {len(seq)} x {n} items is too large")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                        right * max(abs(left).bit_length(), 1) > 8 * MAX_TEMPLATE_VALUE:
                    raise SecurityError(f"{left} ** {right} is too large")
            elif operator == "%" and isinstance(left, str) and _WIDTHS.search(left):
                raise SecurityError("a % format width in the template is too large")
            return super().call_binop(context, operator, left, right)

        def call(self, context, obj, *args, **kwargs):  # 'x'.ljust(10**9), '{:999999999}'.format(1)
            if any(isinstance(a, int) and abs(a) > MAX_TEMPLATE_VALUE for a in (*args, *kwargs.values())):
                raise SecurityError(f"a call in the template passes a number over {MAX_TEMPLATE_VALUE}")
            return super().call(context, obj, *args, **kwargs)

        def wrap_str_format(self, value):
            if isinstance(getattr(value, "__self__", None), str) and re.search(r"\d{6,}", value.__self__):
                def refuse(*args, **kwargs):
                    raise SecurityError("a format width in the template is too large")
                return refuse
            return super().wrap_str_format(value)

    return Bounded(**kw)


# --- construction ---------------------------------------------------------------------------

def load_hf_tokenizer(folder: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    from .hf import read_json

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise ModelFormatError(f"{folder}: no tokenizer.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        tok = _reuse(hashlib.blake2b(raw, digest_size=20).digest(), lambda: HFTokenizer.from_str(raw.decode("utf-8")))
    except Exception as e:
        raise ModelFormatError(f"{path}: cannot load tokenizer ({_one_line(e)})") from None
    tcfg_path = os.path.join(folder, "tokenizer_config.json")
    tcfg = read_json(tcfg_path) if os.path.exists(tcfg_path) else {}
    template = tcfg.get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)

    def token_id(value: Any) -> int | None:
        if isinstance(value, dict):
            value = value.get("content")
        return tok.token_to_id(value) if isinstance(value, str) else None

    cfg_path = os.path.join(folder, "config.json")
    cfg = read_json(cfg_path) if os.path.exists(cfg_path) else {}
    gen_path = os.path.join(folder, "generation_config.json")
    gen = read_json(gen_path) if os.path.exists(gen_path) else {}
    bos = token_id(tcfg.get("bos_token"))
    if bos is None:
        bos = cfg.get("bos_token_id")
    eos: list[int] = []
    for source in (gen.get("eos_token_id"), cfg.get("eos_token_id"), token_id(tcfg.get("eos_token"))):
        for e in source if isinstance(source, list) else [source]:
            if isinstance(e, int) and e not in eos:
                eos.append(e)
    add_bos = bool(tcfg.get("add_bos_token", False))
    return Tokenizer(tok, bos_id=bos, eos_ids=eos, add_bos=add_bos, chat_template=template, source=folder)


def gguf_tokenizer(meta: dict[str, Any], source: str) -> Tokenizer:
    """Build a `tokenizers` tokenizer from GGUF metadata (tokenizer.ggml.*). Every field is checked
    for its type and range first; what the library still refuses (a merge of tokens outside the
    vocabulary, ...) is a ModelFormatError naming the file."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    tokens = _checked_list(meta, "tokens", source, str)
    if not tokens:
        raise ModelFormatError(f"{source}: GGUF has no tokenizer vocabulary")
    types = _checked_list(meta, "token_type", source, int, len(tokens)) or [TOKEN_NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelFormatError(f"{source}: tokenizer.chat_template is a {type(template).__name__}, not text")

    def special_id(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(tokens):
            raise ModelFormatError(f"{source}: tokenizer.ggml.{key}={v!r} is outside the vocabulary of {len(tokens)}")
        return v

    def build():
        if kind == "gpt2":
            merges = [tuple(m.split(" ", 1)) for m in _checked_list(meta, "merges", source, str)]
            # both halves and what they merge into must be tokens (the tokenizers library panics, after
            # printing a Rust backtrace, on a merged string longer than every token of the vocabulary)
            bad = next((i for i, m in enumerate(merges)
                        if len(m) != 2 or m[0] not in vocab or m[1] not in vocab or m[0] + m[1] not in vocab), None)
            if bad is not None:
                m = merges[bad]
                what = ("is not two tokens of the vocabulary" if len(m) != 2 or m[0] not in vocab or m[1] not in vocab
                        else f"makes {m[0] + m[1]!r}, which is not a token of the vocabulary")
                raise ModelFormatError(f"{source}: tokenizer.ggml.merges[{bad}] = {' '.join(m)!r} {what}")
            tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
            pre = meta.get("tokenizer.ggml.pre", "default")
            if not isinstance(pre, str):
                raise ModelFormatError(f"{source}: tokenizer.ggml.pre is a {type(pre).__name__}, not a name")
            if pre in _SPLITS:
                tok.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            elif pre == "smollm":
                tok.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
            else:
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            if pre in ("qwen2", "deepseek-r1-qwen"):
                tok.normalizer = normalizers.NFC()
            tok.decoder = decoders.ByteLevel()
        elif kind == "llama":
            scores = _checked_list(meta, "scores", source, (int, float), len(tokens)) or [0.0] * len(tokens)
            unk = special_id("unknown_token_id")
            tok = HFTokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), byte_fallback=True,
                                         fuse_unk=True, unk_token=tokens[unk] if unk is not None else None))
            prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
            steps = ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
            tok.normalizer = normalizers.Sequence(steps)
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                            + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        else:
            raise UnsupportedError(f"{source}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")

        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                if ty == TOKEN_USER_DEFINED]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
        return tok

    key = _key(kind, tokens, types, meta.get("tokenizer.ggml.merges"), meta.get("tokenizer.ggml.pre"),
               meta.get("tokenizer.ggml.scores"), meta.get("tokenizer.ggml.unknown_token_id"),
               meta.get("tokenizer.ggml.add_space_prefix"))
    try:
        tok = _reuse(key, build)
    except (ModelFormatError, UnsupportedError):
        raise
    except BaseException as e:  # the library's Exception, TypeError, or a Rust panic (a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise ModelFormatError(f"{source}: the tokenizer cannot be built from tokenizer.ggml.* "
                               f"({type(e).__name__}: {_one_line(e)})") from None
    bos = special_id("bos_token_id")
    eos = [e for e in (special_id("eos_token_id"), special_id("eot_token_id"), special_id("eom_token_id"))
           if e is not None]
    return Tokenizer(tok, bos_id=bos, eos_ids=list(dict.fromkeys(eos)),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                     chat_template=template, source=source)


# The most recently built `tokenizers` object, by a hash of what it was built from. Loading the same
# model again (a server reloading it, tests, a fuzzer) reuses it: jisu never changes a built one, and
# the library keeps ~1 KB of every BPE model that has encoded text after the model is dropped
# (tokenizers 0.23: its word cache; `cache_capacity=0` avoids it at the cost of the cache), so
# 430,000 loads of one small model grew a process by ~130 MiB. One entry: a dropped model's tokenizer is
# held until another is built, never more than one.
_LAST: list = [None, None]
_LAST_LOCK = threading.Lock()


def _key(*parts: Any) -> bytes | None:
    try:
        text = json.dumps(parts, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):  # not JSON-like: built afresh, not shared
        return None
    return hashlib.blake2b(text.encode("ascii"), digest_size=20).digest()


def _reuse(key: bytes | None, build):
    with _LAST_LOCK:
        if key is not None and _LAST[0] == key:
            return _LAST[1]
    tok = build()
    if key is not None:
        with _LAST_LOCK:
            _LAST[:] = [key, tok]
    return tok


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _checked_list(meta: dict[str, Any], key: str, source: str, kind, length: int | None = None) -> list:
    """tokenizer.ggml.<key> as a list whose items are all `kind` (of `length` items where given);
    [] when absent. Text must be encodable as UTF-8 (a JSON copy can hold lone surrogates)."""
    value = meta.get(f"tokenizer.ggml.{key}")
    if value is None:
        return []
    what = f"{source}: tokenizer.ggml.{key}"
    if not isinstance(value, list):
        raise ModelFormatError(f"{what} is a {type(value).__name__}, not an array")
    bad = next((i for i, v in enumerate(value) if not isinstance(v, kind) or isinstance(v, bool)), None)
    if bad is not None:
        raise ModelFormatError(f"{what}[{bad}] is a {type(value[bad]).__name__} ({value[bad]!r:.40})")
    if length is not None and len(value) != length:
        raise ModelFormatError(f"{what} has {len(value)} entries for {length} tokens")
    if kind is str:
        try:
            "".join(value).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ModelFormatError(f"{what} holds text that is not valid Unicode ({e.reason})") from None
    return value


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges: every split of a vocabulary piece into two pieces, ranked by the
    score of the merged piece (SentencePiece merges the highest-scoring pair first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] not in (TOKEN_NORMAL, TOKEN_USER_DEFINED) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


class StreamDecoder:
    """Turns token ids into text deltas as they arrive, holding back a partial UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        # Seed with the prompt's tail so leading spaces of the first token decode correctly.
        self.ids = list(prompt_ids[-4:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prev = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(prev) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(prev):]
