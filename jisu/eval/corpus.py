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


def read_text(path: str | os.PathLike | None, min_tokens: int = 1) -> EvalText:
    """The built-in corpus when `path` is None, else the file's text. Every problem is a one-line
    JisuError raised before any model is loaded. A token spans at least one byte in the tokenizers
    jisu reads, so fewer bytes than `min_tokens` cannot fill one chunk."""
    if path is None:
        return builtin_text()
    name = str(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise JisuError(f"{name}: no such text file") from None
    except IsADirectoryError:
        raise JisuError(f"{name}: is a folder, not a text file") from None
    except OSError as e:
        raise JisuError(f"{name}: cannot read ({e.strerror})") from None
    if not data.strip():
        raise JisuError(f"{name}: text file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JisuError(f"{name}: not UTF-8 text (bad byte at offset {e.start})") from None
    if len(data) < min_tokens:
        raise JisuError(f"{name}: text too short for one chunk of {min_tokens} tokens ({len(data)} bytes)")
    return EvalText(name, text)


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
