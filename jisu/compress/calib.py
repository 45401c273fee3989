"""Calibration and held-out text for compression.

Built-in corpus: Python's `pydoc_data.topics.topics` values joined in sorted-key order (present
on every Python, identical for a given version). Compression calibrates on its first half and
measures quality on its second half, so the reported figures are never on calibration text.
A user file is UTF-8 text (.txt or anything else) or JSON lines (.jsonl, one object per line with
a string field "text"). Every problem is one JisuError line, raised before any model work.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from ..errors import JisuError

BUILTIN = "builtin:pydoc_topics"


@dataclass(frozen=True)
class CalibText:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def builtin_corpus() -> str:
    from ..eval.corpus import builtin_text

    return builtin_text().text


def builtin_halves() -> tuple[CalibText, CalibText]:
    """(first half, second half) of the built-in corpus, cut at a line break near the middle."""
    text = builtin_corpus()
    cut = text.rfind("\n", 0, len(text) // 2)
    cut = cut if cut > 0 else len(text) // 2
    return CalibText(BUILTIN + "[first half]", text[:cut]), CalibText(BUILTIN + "[second half]", text[cut:])


def read_text_file(path, what: str = "calibration") -> CalibText:
    """A user's .txt / .jsonl file, checked: exists, readable, not empty, UTF-8, not binary."""
    from ..eval.corpus import read_utf8

    name = str(path)
    text = read_utf8(name, what)
    if name.lower().endswith(".jsonl"):
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
        text = "\n\n".join(parts)
    return CalibText(name, text)


def read_calibration(path=None) -> CalibText:
    return builtin_halves()[0] if path is None else read_text_file(path, "calibration")


def read_heldout(path=None) -> CalibText:
    return builtin_halves()[1] if path is None else read_text_file(path, "evaluation")


def check_counts(samples: int, seq_len: int) -> None:
    for flag, v in (("--samples", samples), ("--seq-len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise JisuError(f"{flag} must be an integer >= 1 (got {v!r})")
    if seq_len < 2:
        raise JisuError(f"--seq-len must be >= 2 (got {seq_len})")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False)


def calibration_ids(tokenizer, text: CalibText, samples: int, seq_len: int) -> torch.Tensor:
    """[samples, seq_len] token ids: windows spread evenly over the text (more variety than one
    run from the start). Too little text is an error naming the numbers."""
    check_counts(samples, seq_len)
    ids = _encode(tokenizer, text.text)
    need = samples * seq_len
    if len(ids) < need:
        raise JisuError(f"{text.name}: calibration text has {len(ids)} tokens, fewer than --samples {samples} x "
                        f"--seq-len {seq_len} = {need}; give more text or lower --samples/--seq-len")
    stride = len(ids) // samples
    return torch.tensor([ids[i * stride:i * stride + seq_len] for i in range(samples)], dtype=torch.long)


def heldout_ids(tokenizer, text: CalibText, chunks: int, ctx: int) -> tuple[torch.Tensor, list[str]]:
    """The first `chunks` x `ctx` tokens of the held-out text as [chunks, ctx] (fewer chunks, with
    a note, when the text is shorter; an error when it cannot fill one)."""
    if chunks < 1 or ctx < 2:
        raise JisuError(f"evaluation needs chunks >= 1 and ctx >= 2 (got {chunks} x {ctx})")
    ids = _encode(tokenizer, text.text)
    have = len(ids) // ctx
    if have == 0:
        raise JisuError(f"{text.name}: evaluation text has {len(ids)} tokens, too short for one chunk of {ctx}")
    notes = []
    if have < chunks:
        notes.append(f"{text.name}: {len(ids)} tokens fill only {have} of {chunks} chunks of {ctx}; using {have}")
        chunks = have
    return torch.tensor([ids[i * ctx:(i + 1) * ctx] for i in range(chunks)], dtype=torch.long), notes


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_sha256(path: str) -> tuple[str, dict]:
    """sha256 of a model file, or of a folder's files (sha256 over 'name sha' lines) + per file."""
    if os.path.isfile(path):
        return file_sha256(path), {}
    files = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and not name.startswith("."):
            files[name] = file_sha256(full)
    combined = hashlib.sha256("".join(f"{n} {s}\n" for n, s in files.items()).encode()).hexdigest()
    return combined, files
