"""On-disk store of reference log-probabilities ([chunks, ctx-1, vocab] float32 .npy, memory-mapped,
plus a JSON sidecar), keyed by the reference files' size+mtime, the text hash and the chunking."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np
import torch

FORMAT_VERSION = 2


def default_cache_dir() -> str:
    """$JISU_CACHE_DIR, else $XDG_CACHE_HOME/jisu, else ~/.cache/jisu."""
    if os.environ.get("JISU_CACHE_DIR"):
        return os.environ["JISU_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jisu")


def fingerprint(path: str) -> list[list]:
    """[relative name, size, mtime_ns] for the file, or for every file under the folder: cheap to
    compute and changes whenever a weight file is rewritten."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return [[path, st.st_size, st.st_mtime_ns]]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            full = os.path.join(root, f)
            st = os.stat(full)
            out.append([os.path.relpath(full, path), st.st_size, st.st_mtime_ns])
    return [[path, 0, 0]] + out


def cache_key(reference_path: str, text_sha256: str, chunks: int, ctx: int, path: str = "fp32") -> str:
    """`path`: how the reference was run (its compute path changes the log-probs)."""
    blob = json.dumps({"v": FORMAT_VERSION, "ref": fingerprint(reference_path), "text": text_sha256,
                       "chunks": chunks, "ctx": ctx, "path": path}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class RefStore:
    """Log-probs of the reference, one [ctx-1, vocab] slab per chunk, with the token ids they score."""

    def __init__(self, folder: str, key: str):
        self.folder, self.key = folder, key
        self.npy = os.path.join(folder, f"ref-{key}.npy")
        self.meta = os.path.join(folder, f"ref-{key}.json")
        self._array = None
        self.tokens: list[list[int]] | None = None

    def load(self) -> bool:
        """True when a complete entry exists (the sidecar is written last, so it marks completion)."""
        try:
            with open(self.meta) as f:
                meta = json.load(f)
            array = np.load(self.npy, mmap_mode="r")
        except (OSError, ValueError):
            return False
        tokens = meta.get("tokens")
        if (meta.get("key") != self.key or not tokens or array.dtype != np.float32
                or array.shape[:2] != (len(tokens), len(tokens[0]) - 1)):
            return False
        self._array, self.tokens = array, tokens
        return True

    def write(self, tokens: Sequence[Sequence[int]], slabs, vocab: int, info: dict) -> None:
        """Stream slabs ([ctx-1, vocab] tensors, one per chunk) into the .npy; then the sidecar."""
        os.makedirs(self.folder, exist_ok=True)
        tmp = self.npy + f".{os.getpid()}.tmp"
        shape = (len(tokens), len(tokens[0]) - 1, vocab)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for i, slab in enumerate(slabs):
                out[i] = slab.numpy()
            out.flush()
            del out
            os.replace(tmp, self.npy)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        tmp_meta = self.meta + f".{os.getpid()}.tmp"
        with open(tmp_meta, "w") as f:
            json.dump({"key": self.key, **info, "tokens": [list(map(int, t)) for t in tokens]}, f)
        os.replace(tmp_meta, self.meta)
        if not self.load():
            raise OSError(f"{self.npy}: written reference log-probs do not read back")

    def chunk(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._array[i]))

    def close(self) -> None:
        self._array = None
