"""A source model for streaming compression: its matrices stay in the file (GGUF memmap or
safetensors) as SourceWeight handles that decode to float32 when used, one at a time, so no
float32 copy of the whole model is ever held; 1-D tensors (norms, biases) are read at once."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import ModelFormatError

ROW_BLOCK_ELEMS = 1 << 22  # rows decoded per block for row lookups and row-sliced quantization


class SourceWeight:
    """A source matrix [N, K] in its file. dequantize(): its float32 values (the load transform
    applied); rows(idx) / row_range(r0, r1): some rows, decoded a block at a time; linear(x):
    x @ W^T; source_format(): the lossless logical format of a GGUF Q8_0/Q4_0/Q4_1 matrix (or None)."""

    def __init__(self, shape, read: Callable[[int, int], torch.Tensor], transform=None,
                 fmt: Optional[Callable] = None, release: Optional[Callable] = None):
        self.shape = tuple(int(d) for d in shape)
        self.N, self.K = self.shape
        self._read = read            # (r0, r1) -> float32 rows [r1 - r0, K], before the transform
        self._transform = transform  # the architecture's load transform of the whole matrix
        self._fmt = fmt
        self._release = release

    def dequantize(self) -> torch.Tensor:
        w = self._read(0, self.N)
        if self._transform is not None:
            w = self._transform(w)
        if self._release is not None:
            self._release()
        return w

    def row_range(self, r0: int, r1: int) -> torch.Tensor:
        if self._transform is not None:
            return self.dequantize()[r0:r1]
        return self._read(r0, r1)

    def blocks(self, lo: int = 0, hi: Optional[int] = None):
        """(r0, r1, float32 rows) over rows [lo, hi) (default: all), a block of rows at a time."""
        hi = self.N if hi is None else hi
        step = max(1, ROW_BLOCK_ELEMS // max(self.K, 1))
        for r0 in range(lo, hi, step):
            yield r0, min(hi, r0 + step), self.row_range(r0, min(hi, r0 + step))
        if self._release is not None:
            self._release()

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 rows idx (any shape) -> [*idx.shape, K]; only the blocks holding them are decoded."""
        flat = idx.reshape(-1).long()
        out = torch.empty(flat.numel(), self.K)
        if self._transform is not None:
            out[:] = self.dequantize()[flat]
            return out.view(*idx.shape, self.K)
        if flat.numel() == 0:
            return out.view(*idx.shape, self.K)
        for r0, r1, w in self.blocks(int(flat.min()), int(flat.max()) + 1):
            hit = (flat >= r0) & (flat < r1)
            if hit.any():
                out[hit] = w[flat[hit] - r0]
        return out.view(*idx.shape, self.K)

    def linear(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        return F.linear(x, self.dequantize(), bias)

    def source_format(self):
        return None if self._fmt is None else self._fmt()


def _gguf_weights(path: str, cfg, g, arch) -> dict:
    from ..io.gguf import hf_name
    from ..io.gguf_packed import PACKABLE, _transform_rows, gguf_format
    from ..io.gguf_quants import dequantize

    weights = {}
    for name, t in g.tensors.items():
        target = hf_name(name, cfg.arch)
        if target is None:
            continue
        fn = arch.load_transform(cfg, "gguf", target)
        if len(t.shape) != 2:
            w = g.dequantize(name)
            weights[target] = fn(w) if fn is not None else w
            g.release(name)
            continue
        N, K = t.shape
        row_bytes = t.data.nbytes // N

        def read(r0, r1, t=t, name=name, K=K, row_bytes=row_bytes):
            raw = t.data.reshape(-1).view("uint8")[r0 * row_bytes:r1 * row_bytes]
            w = dequantize(raw, t.qtype, (r1 - r0, K))
            g.release(name, (r0 * row_bytes, (r1 - r0) * row_bytes))
            return w

        def fmt(t=t, fn=fn, name=name):
            f = gguf_format(t)
            f = f if fn is None else _transform_rows(f, fn)
            g.release(name)
            return f

        weights[target] = SourceWeight((N, K), read, fn, fmt if t.qtype in PACKABLE else None,
                                       lambda name=name: g.release(name))
    return weights


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _hf_weights(cfg, files: list[str], arch) -> dict:
    from ..io.hf import SafetensorsFile

    weights = {}
    for path in files:
        f = SafetensorsFile(path)
        header, base = f.header, f.base
        small = []
        for name, info in header.items():
            if name == "__metadata__" or not (name.startswith("model.") or name in ("lm_head.weight", "rope_freqs")):
                continue
            shape, dtype = info["shape"], _ST_DTYPES.get(info["dtype"])
            if len(shape) != 2 or dtype is None:
                small.append(name)
                continue
            N, K = shape
            start = base + info["data_offsets"][0]
            row_bytes = K * dtype.itemsize

            def read(r0, r1, path=path, start=start, K=K, dtype=dtype, row_bytes=row_bytes):
                n = (r1 - r0) * row_bytes
                buf = bytearray(n)
                with open(path, "rb") as f:
                    f.seek(start + r0 * row_bytes)
                    if f.readinto(buf) != n:
                        raise ModelFormatError(f"{path}: truncated tensor data")
                return torch.frombuffer(buf, dtype=dtype).view(r1 - r0, K).to(torch.float32)

            weights[name] = SourceWeight((N, K), read, arch.load_transform(cfg, "hf", name))
        for name in small:
            t = f.get_tensor(name).float()
            fn = arch.load_transform(cfg, "hf", name)
            weights[name] = fn(t) if fn is not None else t
    return weights


def load_streamed(source, progress: bool = False):
    """(config, weights by HF name, tokenizer) of a GGUF or HF source: matrices as SourceWeight
    handles, everything else as float32 tensors (as jisu.io.sources.load_weights gives them)."""
    from ..io.sources import TOKENIZER_ARRAYS, _check_weights
    from ..models import archs

    if source.kind == "gguf":
        from ..io.gguf import GGUFFile, gguf_config
        from ..io.tokenizer import gguf_tokenizer

        g = GGUFFile(source.path)
        cfg = gguf_config(g)
        tokenizer = gguf_tokenizer(g.metadata, source.path)
        for key in TOKENIZER_ARRAYS:
            g.metadata.pop(key, None)
        weights = _gguf_weights(source.path, cfg, g, archs()[cfg.arch])
    elif source.kind == "hf":
        from ..io.hf import hf_config, safetensors_files
        from ..io.tokenizer import load_hf_tokenizer

        cfg = hf_config(source.path)
        tokenizer = load_hf_tokenizer(source.path)
        weights = _hf_weights(cfg, safetensors_files(source.path), archs()[cfg.arch])
    else:
        raise ValueError(f"streaming needs a GGUF or HF source, not {source.kind}")
    _check_weights(cfg, weights, source)
    return cfg, weights, tokenizer


def source_bytes(path: str) -> int:
    """The size of a model file, or of a folder's files."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
               if os.path.isfile(os.path.join(path, n)) and not n.startswith("."))
