"""Evaluation text: the built-in corpus (Python's pydoc topics, present on every machine) or a
UTF-8 file, validated up front, and cut into fixed chunks of token ids."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from ..errors import JisuError

BUILTIN_NAME = "builtin:pydoc_topics"


@dataclass(frozen=True)
class EvalText:
    name: str      # file path, or BUILTIN_NAME
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def builtin_text() -> EvalText:
    """Every pydoc topic, in sorted-key order: English prose with code, identical for a given Python."""
    from pydoc_data.topics import topics

    return EvalText(BUILTIN_NAME, "\n\n".join(topics[k] for k in sorted(topics)))


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


def read_text(path: str | os.PathLike | None, min_tokens: int = 1) -> EvalText:
    """The built-in corpus when `path` is None, else the file's text. Every problem is a one-line
    JisuError raised before any model is loaded. A token spans at least one byte in the tokenizers
    jisu reads, so fewer bytes than `min_tokens` cannot fill one chunk."""
    if path is None:
        return builtin_text()
    text = read_utf8(path, "text")
    if len(text.encode("utf-8")) < min_tokens:
        raise JisuError(f"{path}: text too short for one chunk of {min_tokens} tokens ({len(text.encode())} bytes)")
    return EvalText(str(path), text)


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
