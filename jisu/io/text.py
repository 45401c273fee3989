"""Text for calibration and evaluation: the built-in corpus (Python's pydoc topics, present on
every machine) and its halves, a user's UTF-8 or JSON-lines file read with one-line errors, and
token ids cut into calibration windows or evaluation chunks."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from ..errors import JisuError

BUILTIN = "builtin:pydoc_topics"


@dataclass(frozen=True)
class Text:
    name: str      # file path, or BUILTIN (with "[first half]" / "[second half]" for a half)
    text: str      # the whole text (a .jsonl file's "text" fields joined by blank lines)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def builtin_text() -> Text:
    """Every pydoc topic, in sorted-key order: English prose with code, identical for a given Python."""
    from pydoc_data.topics import topics

    return Text(BUILTIN, "\n\n".join(topics[k] for k in sorted(topics)))


def builtin_halves() -> tuple[Text, Text]:
    """(first half, second half) of the built-in corpus, cut at a line break near the middle:
    compression calibrates on the first and measures on the second."""
    text = builtin_text().text
    cut = text.rfind("\n", 0, len(text) // 2)
    cut = cut if cut > 0 else len(text) // 2
    return Text(BUILTIN + "[first half]", text[:cut]), Text(BUILTIN + "[second half]", text[cut:])


def read_utf8(path: str | os.PathLike, what: str) -> str:
    """A user's text file, checked: it exists, is readable and not a folder, holds more than
    whitespace, has no NUL bytes (binary) and decodes as UTF-8. `what` names it in the errors
    ("calibration", "text", ...); every problem is a one-line JisuError."""
    name = str(path)
    kind = f"{what} file" if what != "text" else "text file"
    try:
        with open(name, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise JisuError(f"{name}: no such {kind}") from None
    except IsADirectoryError:
        raise JisuError(f"{name}: is a folder, not a {kind}") from None
    except OSError as e:
        raise JisuError(f"{name}: cannot read {kind} ({e.strerror})") from None
    if not data.strip():
        raise JisuError(f"{name}: {kind} is empty")
    if b"\x00" in data:
        raise JisuError(f"{name}: {kind} is binary, not text (contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JisuError(f"{name}: {kind} is not UTF-8 text (bad byte at offset {e.start})") from None


def read_text(path: str | os.PathLike | None, what: str = "text", min_tokens: int = 1) -> Text:
    """The built-in corpus when `path` is None, else the file's text: UTF-8 text, or JSON lines
    (.jsonl, one object per line with a string field "text"). Every problem is a one-line JisuError
    raised before any model is loaded. A token spans at least one byte in the tokenizers jisu
    reads, so fewer bytes than `min_tokens` cannot fill one chunk."""
    if path is None:
        return builtin_text()
    name = str(path)
    text = read_utf8(name, what)
    if name.lower().endswith(".jsonl"):
        text = _jsonl_text(name, text)
    if len(text.encode("utf-8")) < min_tokens:
        raise JisuError(f"{name}: text too short for one chunk of {min_tokens} tokens ({len(text.encode())} bytes)")
    return Text(name, text)


def _jsonl_text(name: str, text: str) -> str:
    parts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise JisuError(f"{name}: line {n} is not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise JisuError(f"{name}: line {n} has no string field \"text\"")
        if obj["text"].strip():
            parts.append(obj["text"])
    if not parts:
        raise JisuError(f"{name}: no non-empty \"text\" fields")
    return "\n\n".join(parts)


def read_calibration(path=None) -> Text:
    """Compression's calibration text: the file, or the built-in corpus's first half."""
    return builtin_halves()[0] if path is None else read_text(path, "calibration")


def read_heldout(path=None) -> Text:
    """Compression's held-out text: the file, or the built-in corpus's second half."""
    return builtin_halves()[1] if path is None else read_text(path, "evaluation")


def check_counts(samples: int, seq_len: int) -> None:
    for flag, v in (("--samples", samples), ("--seq-len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise JisuError(f"{flag} must be an integer >= 1 (got {v!r})")
    if seq_len < 2:
        raise JisuError(f"--seq-len must be >= 2 (got {seq_len})")


def calibration_ids(tokenizer, text: Text, samples: int, seq_len: int) -> torch.Tensor:
    """[samples, seq_len] token ids: windows spread evenly over the text (more variety than one
    run from the start). Too little text is an error naming the numbers."""
    check_counts(samples, seq_len)
    ids = tokenizer.encode(text.text, add_bos=False)
    need = samples * seq_len
    if len(ids) < need:
        raise JisuError(f"{text.name}: calibration text has {len(ids)} tokens, fewer than --samples {samples} x "
                        f"--seq-len {seq_len} = {need}; give more text or lower --samples/--seq-len")
    stride = len(ids) // samples
    return torch.tensor([ids[i * stride:i * stride + seq_len] for i in range(samples)], dtype=torch.long)


def chunk_ids(ids: list[int], chunks: int, ctx: int, name: str) -> tuple[list[list[int]], str | None]:
    """The first `chunks` x `ctx` token ids, cut into chunks; fewer chunks (with a note) when the
    text is shorter, a JisuError when it cannot fill even one."""
    if ctx < 2:
        raise JisuError(f"--ctx must be >= 2 (got {ctx})")
    if chunks < 1:
        raise JisuError(f"--chunks must be >= 1 (got {chunks})")
    available = len(ids) // ctx
    if available == 0:
        raise JisuError(f"{name}: text too short for one chunk of {ctx} tokens ({len(ids)} tokens)")
    note = None
    if available < chunks:
        note = f"{name}: {len(ids)} tokens fill only {available} of {chunks} chunks of {ctx}; using {available}"
        chunks = available
    return [ids[i * ctx:(i + 1) * ctx] for i in range(chunks)], note


def heldout_ids(tokenizer, text: Text, chunks: int, ctx: int) -> tuple[torch.Tensor, list[str]]:
    """chunk_ids of the whole held-out text as a [chunks, ctx] tensor, with the notes."""
    cut, note = chunk_ids(tokenizer.encode(text.text, add_bos=False), chunks, ctx, text.name)
    return torch.tensor(cut, dtype=torch.long), [note] if note else []


def encode_prefix(encode, text: str, need: int, margin: int = 64) -> list[int]:
    """Token ids of the start of `text`, at least `need` + `margin` of them when the text has that
    many. Tokenizing all of a large text takes seconds, so growing line-aligned prefixes are
    tokenized instead; the margin keeps the cut's effect past the ids that are used."""
    size = max(4096, 8 * (need + margin))
    while size < len(text):
        cut = text.rfind("\n", 0, size)
        ids = encode(text[:cut if cut > size // 2 else size])
        if len(ids) >= need + margin:
            return ids
        size *= 2
    return encode(text)
