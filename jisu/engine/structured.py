"""Grammar-constrained decoding through llguidance: the tokenizer bridge, grammar compilation
(JSON Schema, JSON mode, Lark) under size and time caps with errors that name what is wrong, and
the per-request `Constraint` whose token mask the sampler applies to that request's row only."""
from __future__ import annotations

import json
import queue
import re
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import JisuError

MAX_GRAMMAR_BYTES = 256 << 10      # a schema / grammar's text
COMPILE_TIMEOUT_S = 1.0            # wall-clock cap on building a grammar's matcher
_CACHE_SIZE = 64                   # compiled grammars kept (by text and tokenizer): a hostile schema's
#                                    matcher can hold megabytes (256 of them held ~500 MB under fuzzing)

# JSON output is compact and single-line: a small model given free whitespace can emit it forever
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(JisuError):
    """A schema or grammar that cannot be compiled (unsupported keyword, too large, too slow)."""


def llguidance():
    """The llguidance module, or a one-line error naming the package."""
    try:
        import llguidance as llg
    except ImportError:
        raise JisuError("structured output needs the llguidance package (pip install llguidance)") from None
    return llg


def _limits():
    # per-step fuel bounds the worst mask (~14k fuel/ms), initial fuel and grammar size the build
    return llguidance().LLParserLimits(step_lexer_fuel=100_000, initial_lexer_fuel=1_000_000,
                                       max_grammar_size=200_000)


# --- the tokenizer bridge ---------------------------------------------------------------------------
_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer, vocab_size: int | None = None, eos_ids: Sequence[int] = ()):
    """llguidance's tokenizer for jisu's `tokenizer` (io/tokenizer.Tokenizer), built once per
    tokenizer, vocabulary size and EOS set. From the HF `tokenizers` JSON where llguidance takes
    it, else from each token's bytes (`token_bytes`)."""
    llg = llguidance()
    eos = list(eos_ids or tokenizer.eos_ids)
    key = (vocab_size, tuple(eos))
    with _LOCK:
        per = _TOKENIZERS.setdefault(tokenizer, {})
        if key in per:
            return per[key]
    try:
        lt = llg.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size, eos_token=eos or None)
    except Exception:  # noqa: BLE001 - a tokenizer llguidance cannot read as JSON: go by bytes
        wrapper = llg.TokenizerWrapper(_BytesTokenizer(tokenizer, eos))
        lt = llg.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos or None)
    with _LOCK:
        per[key] = lt
    return lt


_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-ins -> the bytes they stand for."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    return _BYTE_DECODER


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for: byte-level BPE stand-ins mapped back to bytes, SentencePiece
    '▁' to a space and <0xNN> byte tokens to their byte; special tokens as their text."""
    text = tokenizer.token_text(token_id) or ""
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", text)
    if m:
        return bytes([int(m.group(1), 16)])
    dec = _byte_decoder()
    if text and all(c in dec for c in text):
        return bytes(dec[c] for c in text)
    return text.replace("▁", " ").encode("utf-8")


class _BytesTokenizer:
    """What llguidance's TokenizerWrapper needs, from jisu's tokenizer: every token's bytes, the
    special ids, and encoding."""

    def __init__(self, tokenizer, eos: list[int]):
        self._t = tokenizer
        self.tokens = [token_bytes(tokenizer, i) for i in range(tokenizer.vocab_size)]
        self.eos_token_id = eos[0] if eos else None
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size)
                                  if i in eos or i == tokenizer.bos_id]

    def __call__(self, s):
        return self._t.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s, add_bos=False)


# --- grammars ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's serialized form; `what` names it in errors ("response_format")."""
    text: str
    what: str = "grammar"


def json_schema_grammar(schema: Any, what: str = "json_schema") -> Grammar:
    """The grammar of JSON documents valid under `schema` (a dict, its JSON text, or True)."""
    llg = llguidance()
    if isinstance(schema, str):
        _check_size(schema, what)
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"{what}: the schema is not valid JSON ({e})") from None
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"{what}: the schema must be a JSON object (got {type(schema).__name__})")
    _check_size(json.dumps(schema), what)
    try:
        return Grammar(llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS), what)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"{what}: {e}") from None


def json_object_grammar(what: str = "response_format") -> Grammar:
    """JSON mode: any JSON object."""
    return json_schema_grammar({"type": "object"}, what)


def lark_grammar(text: str, what: str = "grammar") -> Grammar:
    """A Lark grammar (llguidance's dialect: `%json {...}` embeds a JSON schema)."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError(f"{what}: the grammar must be a non-empty string")
    _check_size(text, what)
    return Grammar(llguidance().LLMatcher.grammar_from_lark(text), what)


def as_grammar(json_schema: Any = None, grammar: Any = None) -> Grammar | None:
    """SamplingParams' `json_schema` / `grammar` (a Grammar, Lark text) as one Grammar, or None."""
    if json_schema is not None and grammar is not None:
        raise GrammarError("give json_schema or grammar, not both")
    if isinstance(grammar, Grammar):
        return grammar
    if grammar is not None:
        return lark_grammar(grammar)
    if json_schema is not None:
        return json_schema_grammar(json_schema)
    return None


def _check_size(text: str, what: str) -> None:
    if len(text) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"{what}: the schema is {len(text)} bytes; the limit is {MAX_GRAMMAR_BYTES}")


# --- compilation ------------------------------------------------------------------------------------
_COMPILED: "OrderedDict[tuple, Any]" = OrderedDict()
_COMPILER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jisu-grammar")


def compile_matcher(grammar: Grammar, lltok, timeout_s: float | None = None):
    """A fresh matcher for `grammar`: built (at most `timeout_s`, default COMPILE_TIMEOUT_S, else
    GrammarError) and cached the first time, deep-copied after."""
    timeout_s = COMPILE_TIMEOUT_S if timeout_s is None else timeout_s
    key = (grammar.text, id(lltok))
    with _LOCK:
        tmpl = _COMPILED.get(key)
        if tmpl is not None:
            _COMPILED.move_to_end(key)
    if tmpl is None:
        llg = llguidance()
        fut = _COMPILER.submit(llg.LLMatcher, lltok, grammar.text, log_level=0, limits=_limits())
        try:
            tmpl = fut.result(timeout=timeout_s)   # the build is bounded by the fuel limits and ends soon
        except FutureTimeout:
            fut.cancel()                           # (still queued: never built)
            raise GrammarError(f"{grammar.what}: compiling the schema took longer than {timeout_s:g} s") from None
        if tmpl.is_error():
            raise GrammarError(describe_error(grammar.what, tmpl.get_error()))
        _check_first_mask(tmpl, lltok, grammar.what)
        with _LOCK:
            _COMPILED[key] = tmpl
            while len(_COMPILED) > _CACHE_SIZE:
                _COMPILED.popitem(last=False)
    return tmpl.deep_copy()


def _check_first_mask(tmpl, lltok, what: str) -> None:
    """A grammar that compiles may still admit no document (`{"$ref": "#"}` recurses forever): its
    first mask, made on a copy, must allow some token."""
    m = tmpl.deep_copy()
    words = np.zeros((lltok.vocab_size + 31) // 32, dtype=np.int32)
    m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
    if m.is_error() or not words.any():
        why = _first_line(m.get_error()) if m.is_error() else "no token can begin it"
        raise GrammarError(f"{what}: the schema admits no document ({why})")


def _first_line(message: str) -> str:
    line = message.strip().splitlines()[0] if message and message.strip() else "invalid grammar"
    return line[:500]


def describe_error(what: str, message: str) -> str:
    """llguidance's compile error as a one-line message naming the keyword where there is one."""
    m = re.search(r"Unimplemented keys: \[(.*?)\]", message)
    if m:
        keys = ", ".join(k.strip().strip('"') for k in m.group(1).split(","))
        return f"{what}: unsupported JSON Schema keyword(s): {keys}"
    return f"{what}: {_first_line(message)}"


def check_grammar(grammar: Grammar, tokenizer, vocab_size: int | None = None, eos_ids: Sequence[int] = ()) -> None:
    """Compile `grammar` for `tokenizer` now (GrammarError if it cannot be); later requests with
    it find it compiled."""
    compile_matcher(grammar, ll_tokenizer(tokenizer, vocab_size, eos_ids))


# --- one request's constraint -------------------------------------------------------------------------
_NEG_INF_BITS = np.uint32(0xFF800000)      # float32 -inf: a forbidden token's addend (0.0 for the others)


class _Masker:
    """One daemon thread that computes handed-over masks. llguidance releases the GIL while it
    computes, so a mask is made while the engine thread runs the rest of its step and the next
    model step (on a machine whose cores the step fills, in the time its pool spends spinning)."""

    def __init__(self):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def submit(self, c: "Constraint") -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._start:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="jisu-mask", daemon=True)
                    self._thread.start()
        self._q.put(c)

    def _run(self) -> None:
        while True:
            self._q.get()._claimed_fill()


_MASKER = _Masker()
OVERLAP_MASKS = True          # compute the next mask on _MASKER (False: on the engine thread, after accept)


class Constraint:
    """One request's matcher. The mask of the next token is started as soon as the previous token
    is accepted (llguidance, ~25 us, GIL released) on the mask thread, so that it is made while the
    engine thread goes on with its step; `mask_` takes it (making it itself if the mask thread has
    not started on it) and writes -inf into that request's logits row in place (the bits expanded
    and added in two numpy passes, no row copies)."""

    def __init__(self, grammar: Grammar, tokenizer, vocab_size: int, eos_ids: Sequence[int] = (),
                 overlap: bool | None = None):
        lltok = ll_tokenizer(tokenizer, vocab_size, eos_ids)
        self.matcher = compile_matcher(grammar, lltok)
        self.vocab_size = vocab_size
        self.words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.overlap = OVERLAP_MASKS if overlap is None else overlap
        # a pending mask is made by whichever thread claims it first: the mask thread, or the
        # engine thread when it needs the mask before the mask thread got to it (a busy machine)
        self._claim = threading.Lock()      # free only while a mask is pending and unclaimed
        self._claim.acquire()
        self._ready = threading.Lock()      # held while a mask is pending
        self._pending = False
        self._failure: BaseException | None = None
        self._fill()                        # the first mask: here (the request is being added)

    def _fill(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)

    def _claimed_fill(self) -> None:
        """The mask thread's part: the pending mask, unless the engine thread claimed it."""
        if not self._claim.acquire(blocking=False):
            return                          # made already (or being made) by the engine thread
        try:
            self._fill()
        except BaseException as e:  # noqa: BLE001 - handed to the request's next use of its mask
            self._failure = e
        finally:
            self._ready.release()

    def prepare(self) -> None:
        """Start computing the next token's mask (on the mask thread when overlapping)."""
        self._wait()
        if self.overlap:
            self._ready.acquire()
            self._pending = True
            self._claim.release()
            _MASKER.submit(self)
        else:
            self._fill()

    def _wait(self) -> None:
        """The pending mask is ready (and the matcher free to use): made here if still unclaimed,
        else waited for."""
        if not self._pending:
            return
        if self._claim.acquire(blocking=False):
            try:
                self._fill()
            finally:
                self._ready.release()
        self._ready.acquire()
        self._ready.release()
        self._pending = False
        if self._failure is not None:
            e, self._failure = self._failure, None
            raise GrammarError(f"grammar matcher failed: {type(e).__name__}: {_first_line(str(e))}")

    def _check(self) -> None:
        self._wait()
        if self.matcher.is_error():
            raise GrammarError(f"grammar matcher failed: {_first_line(self.matcher.get_error())}")

    def allowed(self) -> np.ndarray:
        """[V] bool: the tokens the grammar allows next."""
        self._check()
        return np.unpackbits(self.words.view(np.uint8), bitorder="little")[:self.vocab_size].view(bool)

    def mask_(self, row: np.ndarray) -> None:
        """Set every token the grammar forbids to -inf in `row` ([V] float32, in place): the
        forbidden bits expanded to 0 / -inf and added (x + 0 = x exactly; x + -inf = -inf)."""
        self._check()
        n = min(row.shape[-1], self.words.size * 32)
        forbidden = np.unpackbits((~self.words).view(np.uint8), bitorder="little", count=n)
        row[:n] += np.multiply(forbidden, _NEG_INF_BITS, dtype=np.uint32).view(np.float32)
        if row.shape[-1] > n:
            row[n:] = -np.inf                          # past the grammar's vocabulary: nothing allowed

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [V] with every token the grammar forbids at -inf (a new tensor). In numpy, on
        this thread: a torch op this size wakes the intra-op pool, which on a busy machine waits
        tens of ms for its threads."""
        out = logits.detach().float().cpu().numpy().astype(np.float32, copy=True)
        self.mask_(out)
        return torch.from_numpy(out)

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token (EOS included) and start the next mask."""
        self._wait()
        if not self.matcher.consume_token(int(token_id)):
            raise GrammarError(f"grammar matcher rejected token {token_id}: {_first_line(self.matcher.get_error())}")
        self.prepare()   # (once the grammar is complete, the mask allows EOS only)

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more but EOS."""
        self._wait()
        return self.matcher.is_stopped()


def accepts(grammar: Grammar, tokenizer, text: str, vocab_size: int | None = None) -> bool:
    """Whether `text`, tokenized as the model would, is a complete document of `grammar`."""
    m = compile_matcher(grammar, ll_tokenizer(tokenizer, vocab_size))
    ids = tokenizer.encode(text, add_bos=False)
    return m.try_consume_tokens(ids) == len(ids) and not m.is_error() and m.is_accepting()
